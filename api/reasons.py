"""Phases, reasons and sentinel names shared by workflows, status, errors and the CLI."""

from enum import StrEnum


class Phase(StrEnum):
    """Where a checkpoint or restore stands (resource status, `WarmstartPhase` search attribute).

    Not to be confused with a workflow *step* (claim, dump, ...) or a *stage* inside the one
    restore activity (verify, prepare, criu-restore, await-answer).
    """

    PENDING = "Pending"
    CREATING = "Creating"
    CAPTURING = "Capturing"
    UPLOADING = "Uploading"
    READY = "Ready"
    FAILED = "Failed"
    RESTORING = "Restoring"
    RESTORED = "Restored"
    FELL_BACK = "FellBack"


class Reason(StrEnum):
    """CamelCase reasons of conditions, failures and events; the `type` of ApplicationErrors."""

    INVALID_SPEC = "InvalidSpec"
    NODE_LOST = "NodeLost"
    DUMP_FAILED = "DumpFailed"
    RESTORE_FAILED = "RestoreFailed"
    VERIFY_FAILED = "VerifyFailed"
    DIGEST_MISMATCH = "DigestMismatch"
    IDENTITY_CONFLICT = "IdentityConflict"
    WORKLOAD_EXITED = "WorkloadExited"
    WORKLOAD_NOT_READY = "WorkloadNotReady"
    ALREADY_RUNNING = "AlreadyRunning"
    INCOMPATIBLE = "Incompatible"
    QUARANTINED = "Quarantined"
    CHECKPOINT_NOT_FOUND = "CheckpointNotFound"
    CANCELLED = "Cancelled"
    STEP_TIMED_OUT = "StepTimedOut"
    STORAGE_FAILED = "StorageFailed"
    FORBIDDEN = "Forbidden"
    UNAVAILABLE = "Unavailable"
    INTERNAL = "InternalError"
    CAPTURED = "Captured"
    IN_PROGRESS = "InProgress"
    RESTORED = "Restored"


def as_reason(value: str | None) -> Reason | None:
    """The Reason named `value` (an ApplicationError's type), or None if it is not one."""
    try:
        return Reason(value) if value else None
    except ValueError:
        return None


class Sentinel(StrEnum):
    """Files of the sentinel protocol in a container's control directory."""

    READY_FOR_SNAPSHOT = "ready-for-snapshot"
    SNAPSHOT_COMPLETE = "snapshot-complete"
    RESTORE_COMPLETE = "restore-complete"
    RESTORE_FAILED = "restore-failed"
    # Written by warmstart's standby as it starts waiting for its restore (the node may
    # restore into it from then on, without waiting for the kubelet to report it running).
    STANDBY_WAITING = "standby-waiting"
