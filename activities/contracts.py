"""Input and output contracts of activities: frozen models, one pair per activity."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from api.identity import CheckpointIdentity
from api.manifest import Manifest
from api.reasons import Phase, Sentinel
from api.workload import LocalWorkload


class Contract(BaseModel):
    model_config = ConfigDict(frozen=True)


class ClaimInput(Contract):
    checkpoint_id: str
    namespace: str
    name: str


class StatusInput(Contract):
    """A status record for a Checkpoint (cluster) or a local capture/restore (local mode)."""

    kind: str = Field(pattern=r"^(capture|restore)$")
    namespace: str
    name: str
    phase: Phase
    checkpoint_id: str = ""
    version: str = ""
    node: str = ""
    reason: str = ""
    message: str = ""
    storage_uri: str = ""
    size_bytes: int = 0
    step_seconds: dict[str, float] = Field(default_factory=dict)
    workflow_id: str = ""
    run_id: str = ""


class LaunchInput(Contract):
    workload: LocalWorkload
    checkpoint_id: str


class LaunchResult(Contract):
    pid: int
    start_ticks: int = 0
    control_dir: str
    log_path: str
    exit_status_path: str


class AwaitReadyInput(Contract):
    workload: LocalWorkload
    launch: LaunchResult


class AwaitReadyResult(Contract):
    waited_seconds: float


class StopInput(Contract):
    pid: int
    start_ticks: int = 0  # when set, a PID that started at another time is not ours: left alone
    grace_seconds: float = 5.0


class DumpInput(Contract):
    checkpoint_id: str
    name: str
    pid: int


class DumpResult(Contract):
    staging_dir: str
    size_bytes: int
    seconds: float


class CommitInput(Contract):
    staging_dir: str
    checkpoint_id: str
    version: str
    identity: CheckpointIdentity
    node: str
    namespace: str
    workload: LocalWorkload
    launch: LaunchResult


class CommitResult(Contract):
    version_dir: str
    storage_uri: str
    size_bytes: int
    file_count: int


class DiscardInput(Contract):
    staging_dir: str


class SentinelInput(Contract):
    control_dir: str
    sentinel: Sentinel
    content: str = "done\n"


class RestoreInput(Contract):
    checkpoint_id: str
    version: str = ""
    name: str
    answer_timeout_seconds: float = Field(default=120.0, gt=0)


class RestoreResult(Contract):
    pid: int
    manifest: Manifest
    version_dir: str
    phase_seconds: dict[str, float]
