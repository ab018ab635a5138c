"""Phases, condition types and reasons shared by workflows, status and events."""

from enum import StrEnum


class Phase(StrEnum):
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
    """CamelCase reasons for conditions, failures and events (also ApplicationError types)."""

    INVALID_SPEC = "InvalidSpec"
    NODE_LOST = "NodeLost"
    DUMP_FAILED = "DumpFailed"
    RESTORE_FAILED = "RestoreFailed"
    DIGEST_MISMATCH = "DigestMismatch"
    IDENTITY_CONFLICT = "IdentityConflict"
    WORKLOAD_EXITED = "WorkloadExited"
    WORKLOAD_NOT_READY = "WorkloadNotReady"
    INCOMPATIBLE = "Incompatible"
    CHECKPOINT_NOT_FOUND = "CheckpointNotFound"
    CANCELLED = "Cancelled"
    CAPTURED = "Captured"
    RESTORED = "Restored"


class Sentinel(StrEnum):
    """Files of the sentinel protocol in a container's control directory."""

    READY_FOR_SNAPSHOT = "ready-for-snapshot"
    SNAPSHOT_COMPLETE = "snapshot-complete"
    RESTORE_COMPLETE = "restore-complete"
    RESTORE_FAILED = "restore-failed"


def gms_save_sentinel(pod_uid: str) -> str:
    return f"gms-save-complete-{pod_uid}"


def gms_load_sentinel(pod_uid: str) -> str:
    return f"gms-load-complete-{pod_uid}"
