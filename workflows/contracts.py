"""Request, result and query contracts of the workflows."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from activities.contracts import ContainerTarget, PrefetchResult, RemoteStorage, ResourceRef
from api.contract import Contract
from api.identity import CheckpointIdentity, checkpoint_id
from api.limits import PathElement, ReadySeconds, ShortSeconds
from api.naming import CONTROL_TASK_QUEUE, LOCAL_NAMESPACE, LOCAL_NODE, require_path_element
from api.reasons import Phase, Reason
from api.workload import LocalWorkload

# What started a later run of a resource's capture; "" is its first run.
CaptureTrigger = Literal["", "schedule", "annotation"]


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


class LocalCapture(Contract):
    """Local mode: a workload this node's worker launches, awaits and dumps by PID."""

    mode: Literal["local"] = "local"
    workload: LocalWorkload
    # The workload keeps serving after the capture (no snapshot-complete, not stopped).
    leave_running: bool = False

    @property
    def keeps_serving(self) -> bool:
        return self.leave_running


class ClusterCapture(Contract):
    """On a cluster: the container of the capture Job's pod (a Checkpoint) or of a running
    pod (a PodSnapshot, which keeps serving); the node is learned from the pod."""

    mode: Literal["cluster"] = "cluster"
    resource: ResourceRef
    target: ClusterTarget

    @property
    def keeps_serving(self) -> bool:
        return self.resource.kind == "PodSnapshot"


CaptureSource = Annotated[LocalCapture | ClusterCapture, Field(discriminator="mode")]


class CaptureRequest(Contract):
    """Capture a checkpoint of `source` (its mode is its type)."""

    namespace: PathElement = LOCAL_NAMESPACE
    name: PathElement
    identity: CheckpointIdentity
    checkpoint_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    node: str = LOCAL_NODE  # local mode's node; empty on a cluster until the pod's is learned
    source: CaptureSource
    control_task_queue: str = CONTROL_TASK_QUEUE
    # How long a node step may wait for the node's worker before the node counts as lost.
    node_timeout_seconds: ShortSeconds = 120.0
    # Published there after the commit (the `upload` step); absent: the node's root is the store.
    storage: RemoteStorage | None = None
    # With `storage`: once Ready, the caches of the nodes these label maps select are warmed.
    prefetch_node_selectors: list[dict[str, str]] = Field(default_factory=list)
    prefetch_nodes_at_once: int = Field(default=0, ge=0)  # see PrefetchRequest
    # What started a later run of a resource's capture (`schedule`, `annotation`; decision
    # 0043); empty for its first run. A later run never unpublishes a Ready version.
    trigger: CaptureTrigger = ""
    # Verified checkpoints (decision 0045): the new version is restored once on the
    # capturing node and must answer within `verify_answer_seconds` before it is offered
    # (locally a throwaway process; on a cluster a verification pod, which must be Ready).
    verify: bool = False
    verify_answer_seconds: ShortSeconds = 120.0

    @model_validator(mode="before")
    @classmethod
    def _recorded_shape(cls, data: Any) -> Any:
        """Runs recorded before the modes were types carry `workload` and `leave_running`, or
        `resource` and `cluster`, beside the other fields: read them as `source`."""
        if not isinstance(data, dict) or "source" in data:
            return data
        data = dict(data)
        workload, leave = data.pop("workload", None), data.pop("leave_running", False)
        resource, cluster = data.pop("resource", None), data.pop("cluster", None)
        if workload is not None:
            data["source"] = {"mode": "local", "workload": workload, "leave_running": leave}
        elif resource is not None:
            data["source"] = {"mode": "cluster", "resource": resource, "target": cluster}
        return data

    @model_validator(mode="after")
    def _local_node(self) -> CaptureRequest:
        if isinstance(self.source, LocalCapture) and not self.node:
            raise ValueError("a local capture names its node")
        return self

    @model_validator(mode="after")
    def _verifiable(self) -> CaptureRequest:
        if not self.verify:
            return self
        if self.source.keeps_serving:
            raise ValueError(
                "verify: a capture that leaves its workload running cannot be verified (its "
                "test restore would share the live workload's control directory, output "
                "file and ports; a PodSnapshot's pod keeps its devices)"
            )
        return self

    @field_validator("node")
    @classmethod
    def _node_name(cls, value: str) -> str:
        return require_path_element(value, what="node") if value else value

    @property
    def resource(self) -> ResourceRef | None:
        """The cluster resource captured, if any (what status is published on)."""
        return self.source.resource if isinstance(self.source, ClusterCapture) else None

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
        verify: bool = False,
        verify_answer_seconds: float = 120.0,
    ) -> CaptureRequest:
        """The capture of a local workload, named after it, with the ID of `identity`."""
        return cls(
            verify=verify,
            verify_answer_seconds=verify_answer_seconds,
            name=workload.name,
            identity=identity,
            checkpoint_id=checkpoint_id(identity),
            node=node,
            source=LocalCapture(workload=workload, leave_running=leave_running),
            control_task_queue=control_task_queue,
            storage=storage,
        )


class CaptureResult(Contract):
    checkpoint_id: str
    version: str
    node: str
    storage_uri: str
    size_bytes: int
    step_seconds: dict[str, float]


class Refusal(Contract):
    """Why a node refuses to restore into a pod (before anything is read): the pod starts
    cold with this reason."""

    reason: Reason
    message: str


class RestoreRequest(Contract):
    namespace: PathElement = LOCAL_NAMESPACE
    name: PathElement
    # Empty only in a refusal: then the pod names no checkpoint the node would restore.
    checkpoint_id: str = Field(pattern=r"^([0-9a-f]{16})?$")
    version: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]*$")  # newest when empty
    node: PathElement = LOCAL_NODE
    # Local mode: how long the restored workload may take to answer.
    answer_timeout_seconds: ShortSeconds = 120.0
    control_task_queue: str = CONTROL_TASK_QUEUE
    # On a cluster: the restore-target pod's standby container (name is the pod's name),
    # and the restore's deadline, past which the pod starts cold.
    pod: ContainerTarget | None = None
    deadline_seconds: ShortSeconds = 1800.0
    gms_sentinel: str = ""
    # Where the version is fetched from when the node does not hold it (its cache).
    storage: RemoteStorage | None = None
    # On a cluster: the SHA-256 of the version's manifest its Checkpoint recorded; a version
    # with another manifest, wherever stored, is refused ("": not recorded, unchecked).
    manifest_sha256: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")
    # Local mode: the restored process's new environment (Dynamo's restore context names
    # only; on a cluster the standby container's own environment is used).
    env: dict[str, str] = Field(default_factory=dict)
    # On a cluster: the node refused the pod (its claims are not its Checkpoint's, or that
    # cannot be read); nothing is restored, the pod starts cold.
    refusal: Refusal | None = None
    # On a cluster: a verified capture's verification pod (decision 0045), which restores the
    # version its capture holds back on this node.
    unverified: bool = False

    @model_validator(mode="before")
    @classmethod
    def _recorded_deadline(cls, data: Any) -> Any:
        """Pod restores recorded before the deadline had its own field used
        `answer_timeout_seconds` for it."""
        if isinstance(data, dict) and data.get("pod") and "deadline_seconds" not in data:
            data = {**data, "deadline_seconds": data.get("answer_timeout_seconds", 120.0)}
        return data

    @model_validator(mode="after")
    def _checkpoint_unless_refused(self) -> RestoreRequest:
        if not self.checkpoint_id and self.refusal is None:
            raise ValueError("checkpoint_id: a 16-hex checkpoint ID is needed")
        if self.refusal is not None and self.pod is None:
            raise ValueError("refusal: only a pod's restore is refused by its node")
        return self


class RestoreResult(Contract):
    checkpoint_id: str
    version: str
    pid: int
    node: str
    stage_seconds: dict[str, float]  # inside the node's one restore activity
    step_seconds: dict[str, float]  # of the workflow
    # Restores in CRIU on the node when this one entered, itself included (0: not counted,
    # a container restore or a history from before decision 0040).
    criu_running: int = 0


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
    # How many nodes fetch at once (0: all at once): the bucket then serves at most this
    # many downloads of the version at a time, each node's bytes once (decision 0042).
    nodes_at_once: int = Field(default=0, ge=0)


class NodePrefetch(Contract):
    node: str
    result: PrefetchResult | None = None
    error: str = ""  # why this node is not warmed (its reason first)


class PrefetchReport(Contract):
    nodes: list[NodePrefetch]
