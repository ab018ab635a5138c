"""Expected activity failures, raised as Temporal ApplicationErrors the workflow can branch on.

ApplicationError(type=<api.reasons.Reason>)
├── non-retryable: WorkloadExited, WorkloadNotReady, DumpFailed, DigestMismatch,
│                  CheckpointNotFound, IdentityConflict, Incompatible, RestoreFailed,
│                  InvalidSpec
└── anything else (OSError, timeouts) is retried by the activity's retry policy
"""

from __future__ import annotations

from temporalio.exceptions import ApplicationError

from api.reasons import Reason


def fatal(reason: Reason, message: str) -> ApplicationError:
    """An error retrying cannot fix; `type` carries the reason for the workflow and status."""
    return ApplicationError(message, type=str(reason), non_retryable=True)
