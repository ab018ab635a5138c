"""The one error tree of warmstart. Every expected failure is a `WarmstartError` carrying a
`Reason`; activities raise them, the worker maps them once into Temporal `ApplicationError`s
(`activities.errors`), the CLI maps them once into messages and exit codes.

WarmstartError                      reason (api.reasons.Reason)      retried by Temporal
├── InvalidSpecError (ValueError)   InvalidSpec                      no   (CLI exit 2)
│   └── InvalidNameError            InvalidSpec                      no   (CLI exit 2)
├── IdentityConflictError           IdentityConflict                 no
├── CheckpointNotFoundError         CheckpointNotFound               no
├── DigestMismatchError             DigestMismatch                   no
├── IncompatibleError               Incompatible                     no
├── QuarantinedError                Quarantined                      no   (failed here before)
├── WorkloadExitedError             WorkloadExited                   no
├── WorkloadNotReadyError           WorkloadNotReady                 no
├── AlreadyRunningError             AlreadyRunning                   no   (one live instance)
├── DumpFailedError                 DumpFailed                       no
├── RestoreFailedError              RestoreFailed                    no
├── VerifyFailedError               VerifyFailed                     no   (a capture's test restore)
├── StorageError                    StorageFailed                    no   (bucket, credentials)
├── NotFoundError                   InvalidSpec                      no   (a Kubernetes object: 404)
├── ForbiddenError                  Forbidden                        no   (401, 403: token, RBAC)
├── ConflictError                   Unavailable                      yes  (409: read again, retry)
├── GpuError                        InternalError                    no   (mapped where raised:
│                                                                     DumpFailed, RestoreFailed)
├── UnavailableError                Unavailable                      yes  (server, binary absent)
│   └── ExpiredError                Unavailable                      yes  (410: a watch lists again)
└── PipelineFailedError             the failed step's reason         -    (a workflow's outcome)
"""

from __future__ import annotations

from typing import ClassVar

from api.reasons import Reason


class WarmstartError(Exception):
    """Base of expected failures; `reason` says which, the message names object and state."""

    default_reason: ClassVar[Reason] = Reason.INTERNAL
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, reason: Reason | None = None) -> None:
        super().__init__(message)
        self.reason: Reason = reason or self.default_reason

    @property
    def message(self) -> str:
        return str(self)


class InvalidSpecError(WarmstartError, ValueError):
    """A spec that cannot be accepted; the message names the field and the reason.

    A ValueError so that pydantic validators report it as a field error.
    """

    default_reason = Reason.INVALID_SPEC


class InvalidNameError(InvalidSpecError):
    """A name that is not a safe path element."""


class IdentityConflictError(WarmstartError):
    """The checkpoint ID is owned by another resource."""

    default_reason = Reason.IDENTITY_CONFLICT


class CheckpointNotFoundError(WarmstartError):
    """No committed checkpoint (or version) matches."""

    default_reason = Reason.CHECKPOINT_NOT_FOUND


class DigestMismatchError(WarmstartError):
    """An artifact is missing, truncated or altered; the message names the file."""

    default_reason = Reason.DIGEST_MISMATCH


class IncompatibleError(WarmstartError):
    """The checkpoint cannot run on this node: the message names each mismatch (CPU
    architecture, kernel, CRIU, GPU count, model or driver)."""

    default_reason = Reason.INCOMPATIBLE


class QuarantinedError(WarmstartError):
    """The checkpoint failed to restore on this node class before; it starts cold until
    the quarantine is cleared."""

    default_reason = Reason.QUARANTINED


class WorkloadExitedError(WarmstartError):
    """The workload ended before it was ready; the message carries its status and output."""

    default_reason = Reason.WORKLOAD_EXITED


class WorkloadNotReadyError(WarmstartError):
    """The workload did not become ready within its budget."""

    default_reason = Reason.WORKLOAD_NOT_READY


class AlreadyRunningError(WarmstartError):
    """A local workload already runs (or is being restored): one live instance per name."""

    default_reason = Reason.ALREADY_RUNNING


class DumpFailedError(WarmstartError):
    """CRIU could not dump, or the dump could not be committed."""

    default_reason = Reason.DUMP_FAILED


class RestoreFailedError(WarmstartError):
    """CRIU could not restore, or the restored process did not answer."""

    default_reason = Reason.RESTORE_FAILED


class VerifyFailedError(WarmstartError):
    """A verified capture's test restore of its new version did not answer; the message
    carries the restore's own reason. The version is never offered."""

    default_reason = Reason.VERIFY_FAILED


class StorageError(WarmstartError):
    """The checkpoint storage refused a request that retrying cannot fix: a bucket that
    does not exist, rejected credentials, access denied; the message names bucket or object."""

    default_reason = Reason.STORAGE_FAILED


class NotFoundError(WarmstartError):
    """The Kubernetes object a call names does not exist (404); the message names it. Callers
    that expect it (a resource deleted meanwhile, a Job already gone) map it to what it means
    there."""

    default_reason = Reason.INVALID_SPEC


class ForbiddenError(WarmstartError):
    """The API server refused our credentials (401) or their rights (403); the message names
    the verb, the kind and the namespace. Retrying cannot help until the deployment is fixed."""

    default_reason = Reason.FORBIDDEN


class ConflictError(WarmstartError):
    """The object changed meanwhile or already exists (409). Callers read it again and retry
    (or adopt what exists); `exists` tells an AlreadyExists apart from a stale write."""

    default_reason = Reason.UNAVAILABLE
    retryable = True

    def __init__(self, message: str, *, exists: bool = False) -> None:
        super().__init__(message)
        self.exists = exists


class GpuError(WarmstartError):
    """The GPU driver refused a call (CUDA's checkpoint API) or has none. Raised by
    `activities.gpu` and mapped at its boundary: a dump step raises DumpFailedError, a
    restore step RestoreFailedError (which the quarantine sees), from this one."""


class UnavailableError(WarmstartError):
    """Something the command needs is not there: a Temporal server, the criu binary."""

    default_reason = Reason.UNAVAILABLE
    retryable = True


class ExpiredError(UnavailableError):
    """A watch's resourceVersion (or a list's continue token) is too old for the API server
    (410 Gone): the watch lists again."""


class PipelineFailedError(WarmstartError):
    """A capture or restore workflow failed; `reason` is that of the step that failed."""
