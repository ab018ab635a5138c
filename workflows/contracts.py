"""Request, result and query contracts of the workflows."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from api.identity import CheckpointIdentity
from api.naming import CONTROL_TASK_QUEUE, LOCAL_NAMESPACE, LOCAL_NODE
from api.reasons import Phase
from api.workload import LocalWorkload


class Contract(BaseModel):
    model_config = ConfigDict(frozen=True)


class CaptureRequest(Contract):
    """Capture a checkpoint. Local mode: `workload` is launched on `node` by its node worker."""

    namespace: str = LOCAL_NAMESPACE
    name: str
    identity: CheckpointIdentity
    checkpoint_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    node: str = LOCAL_NODE
    workload: LocalWorkload
    control_task_queue: str = CONTROL_TASK_QUEUE
    # How long a node step may wait for the node's worker before the node counts as lost.
    node_timeout_seconds: float = Field(default=120.0, gt=0)


class CaptureResult(Contract):
    checkpoint_id: str
    version: str
    node: str
    storage_uri: str
    size_bytes: int
    step_seconds: dict[str, float]


class RestoreRequest(Contract):
    namespace: str = LOCAL_NAMESPACE
    name: str
    checkpoint_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    version: str = ""
    node: str = LOCAL_NODE
    answer_timeout_seconds: float = Field(default=120.0, gt=0)
    control_task_queue: str = CONTROL_TASK_QUEUE


class RestoreResult(Contract):
    checkpoint_id: str
    version: str
    pid: int
    node: str
    phase_seconds: dict[str, float]
    step_seconds: dict[str, float]


class Progress(Contract):
    """What the `progress` query returns: where the pipeline is and how long steps took."""

    step: str
    phase: Phase
    checkpoint_id: str = ""
    version: str = ""
    node: str = ""
    step_seconds: dict[str, float] = Field(default_factory=dict)
    error: str = ""
