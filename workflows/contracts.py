"""Request, result and query contracts of the workflows."""

from __future__ import annotations

from pydantic import Field

from api.contract import Contract
from api.identity import CheckpointIdentity, checkpoint_id
from api.limits import PathElement, ShortSeconds
from api.naming import CONTROL_TASK_QUEUE, LOCAL_NAMESPACE, LOCAL_NODE
from api.reasons import Phase
from api.workload import LocalWorkload


class CaptureRequest(Contract):
    """Capture a checkpoint. Local mode: `workload` is launched on `node` by its node worker."""

    namespace: PathElement = LOCAL_NAMESPACE
    name: PathElement
    identity: CheckpointIdentity
    checkpoint_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    node: PathElement = LOCAL_NODE
    workload: LocalWorkload
    control_task_queue: str = CONTROL_TASK_QUEUE
    # How long a node step may wait for the node's worker before the node counts as lost.
    node_timeout_seconds: ShortSeconds = 120.0

    @classmethod
    def local(
        cls,
        workload: LocalWorkload,
        identity: CheckpointIdentity,
        *,
        node: str = LOCAL_NODE,
        control_task_queue: str = CONTROL_TASK_QUEUE,
    ) -> CaptureRequest:
        """The capture of a local workload, named after it, with the ID of `identity`."""
        return cls(
            name=workload.name,
            identity=identity,
            checkpoint_id=checkpoint_id(identity),
            node=node,
            workload=workload,
            control_task_queue=control_task_queue,
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
