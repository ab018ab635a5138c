"""Request, result and query contracts of the workflows."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from activities.contracts import ContainerTarget, PrefetchResult, RemoteStorage, ResourceRef
from api.contract import Contract
from api.identity import CheckpointIdentity, checkpoint_id
from api.limits import PathElement, ReadySeconds, ShortSeconds
from api.naming import CONTROL_TASK_QUEUE, LOCAL_NAMESPACE, LOCAL_NODE, require_path_element
from api.reasons import Phase
from api.workload import LocalWorkload


class ClusterTarget(Contract):
    """What a cluster capture dumps: the container of the capture Job's pod (a Checkpoint)
    or of a running pod (a PodSnapshot, which names the pod and its UID)."""

    container: PathElement = "main"
    pod_name: str = ""
    pod_uid: str = ""
    gms: bool = False
    # How long the pod may take to be scheduled and warmed up (the Job's deadline).
    deadline_seconds: ReadySeconds = 3600.0
    # How often the workflow reads the pod itself when no signal came (a watcher outage).
    read_every_seconds: ShortSeconds = 30.0


class CaptureRequest(Contract):
    """Capture a checkpoint. Local mode: `workload` is launched on `node` by its node worker.
    On a cluster: `resource` is the Checkpoint or PodSnapshot, `cluster` what to dump, and
    the node is the one the pod runs on (learned, so `node` is empty)."""

    namespace: PathElement = LOCAL_NAMESPACE
    name: PathElement
    identity: CheckpointIdentity
    checkpoint_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    node: str = LOCAL_NODE
    workload: LocalWorkload | None = None
    resource: ResourceRef | None = None
    cluster: ClusterTarget | None = None
    control_task_queue: str = CONTROL_TASK_QUEUE
    # How long a node step may wait for the node's worker before the node counts as lost.
    node_timeout_seconds: ShortSeconds = 120.0
    # Local mode: the workload keeps serving after the capture (no snapshot-complete, not
    # stopped); a cluster PodSnapshot always does.
    leave_running: bool = False
    # Published there after the commit (the `upload` step); absent: the node's root is the store.
    storage: RemoteStorage | None = None
    # With `storage`: once Ready, the caches of the nodes these label maps select are warmed.
    prefetch_node_selectors: list[dict[str, str]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_mode(self) -> CaptureRequest:
        if (self.workload is None) == (self.resource is None):
            raise ValueError("a capture has either a local workload or a cluster resource")
        if self.resource is not None and self.cluster is None:
            raise ValueError("a cluster capture needs its target (cluster)")
        if self.workload is not None and not self.node:
            raise ValueError("a local capture names its node")
        return self

    @field_validator("node")
    @classmethod
    def _node_name(cls, value: str) -> str:
        return require_path_element(value, what="node") if value else value

    @classmethod
    def local(
        cls,
        workload: LocalWorkload,
        identity: CheckpointIdentity,
        *,
        node: str = LOCAL_NODE,
        control_task_queue: str = CONTROL_TASK_QUEUE,
        leave_running: bool = False,
        storage: RemoteStorage | None = None,
    ) -> CaptureRequest:
        """The capture of a local workload, named after it, with the ID of `identity`."""
        return cls(
            name=workload.name,
            identity=identity,
            checkpoint_id=checkpoint_id(identity),
            node=node,
            workload=workload,
            control_task_queue=control_task_queue,
            leave_running=leave_running,
            storage=storage,
        )


class CaptureResult(Contract):
    checkpoint_id: str
    version: str
    node: str
    storage_uri: str
    size_bytes: int
    step_seconds: dict[str, float]


class RestoreRequest(Contract):
    namespace: PathElement = LOCAL_NAMESPACE
    name: PathElement
    checkpoint_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    version: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]*$")  # newest when empty
    node: PathElement = LOCAL_NODE
    answer_timeout_seconds: ShortSeconds = 120.0
    control_task_queue: str = CONTROL_TASK_QUEUE
    # On a cluster: the restore-target pod's standby container (name is the pod's name);
    # `answer_timeout_seconds` is then the restore's deadline, past which it starts cold.
    pod: ContainerTarget | None = None
    gms_sentinel: str = ""
    # Where the version is fetched from when the node does not hold it (its cache).
    storage: RemoteStorage | None = None
    # Local mode: the restored process's new environment (Dynamo's restore context names
    # only; on a cluster the standby container's own environment is used).
    env: dict[str, str] = Field(default_factory=dict)


class RestoreResult(Contract):
    checkpoint_id: str
    version: str
    pid: int
    node: str
    stage_seconds: dict[str, float]  # inside the node's one restore activity
    step_seconds: dict[str, float]  # of the workflow


class Progress(Contract):
    """What the `progress` query returns: the current step and how long steps took."""

    step: str
    phase: Phase
    checkpoint_id: str = ""
    version: str = ""
    node: str = ""
    step_seconds: dict[str, float] = Field(default_factory=dict)
    error: str = ""


class PrefetchRequest(Contract):
    """Warm these nodes' caches with a version of a checkpoint (newest when empty)."""

    checkpoint_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    version: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]*$")
    storage: RemoteStorage
    nodes: list[PathElement] = Field(min_length=1)
    node_timeout_seconds: ShortSeconds = 120.0
    control_task_queue: str = CONTROL_TASK_QUEUE


class NodePrefetch(Contract):
    node: str
    result: PrefetchResult | None = None
    error: str = ""  # why this node is not warmed (its reason first)


class PrefetchReport(Contract):
    nodes: list[NodePrefetch]
