"""Declarations of the activities the workflows schedule on node and control queues, all in
one place: abstract classes whose `@activity.defn` methods give each activity its name and
contract.

Workflows import these and `activities.contracts` only, never an implementation: importing a
workflow module then loads no storage, CRIU, Kubernetes or compression library (a test
checks it). Each implementation subclasses its declaration, and the workers
(`workers/compose.py`, `workers/retention.py`) register the implementation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from temporalio import activity

from activities.contracts import (
    AwaitReadyInput,
    CatalogAnswer,
    CatalogQuery,
    CheckpointVersions,
    ClaimInput,
    CommitInput,
    CommitResult,
    ContainerCommitInput,
    ContainerDumpInput,
    ContainerRestoreInput,
    ContainerSentinelInput,
    ContainerTarget,
    DeleteVersionInput,
    DeleteVersionResult,
    DiscardInput,
    DumpInput,
    GmsSavedInput,
    JobInput,
    JobRef,
    LaunchInput,
    LaunchResult,
    ListVersionsInput,
    NodeSelectorInput,
    PodObservation,
    PodQuery,
    PrefetchInput,
    PrefetchResult,
    ProtectedInput,
    ProtectedVersions,
    ReleaseInput,
    RestoredContainer,
    RestoredWorkload,
    RestoreInput,
    SentinelInput,
    StatusInput,
    StopInput,
    SweepInput,
    SweepResult,
    UploadInput,
    UploadResult,
    UploadSweepInput,
    UploadSweepResult,
    VerificationObservation,
    VerificationPod,
    VerificationPodInput,
    VerificationQuery,
    VerifyInput,
    VerifyResult,
)


class LocalProcessSteps(ABC):
    """A workload run as a local process (local mode): `activities.local.process`."""

    @activity.defn
    @abstractmethod
    async def launch_workload(self, request: LaunchInput) -> LaunchResult:
        """Start the workload detached, as init of its own PID namespace."""

    @activity.defn
    @abstractmethod
    async def await_workload_ready(self, request: AwaitReadyInput) -> None:
        """Wait for `ready-for-snapshot` (or the readiness probe) while the workload lives."""

    @activity.defn
    @abstractmethod
    async def stop_workload(self, request: StopInput) -> None:
        """Stop the workload launched for a capture (a grace period, then SIGKILL)."""


class DumpSteps(ABC):
    """CRIU dumps of local processes: `activities.criu.command`."""

    @activity.defn
    @abstractmethod
    async def dump_checkpoint(self, request: DumpInput) -> None:
        """CRIU-dump the workload's tree into fresh staging, heartbeating bytes written."""


class SentinelSteps(ABC):
    """The sentinel protocol on the node: `activities.host.sentinels`."""

    @activity.defn
    @abstractmethod
    async def write_sentinel(self, request: SentinelInput) -> None:
        """Write a sentinel into the workload's control directory, atomically."""


class StorageSteps(ABC):
    """Committing, publishing and discarding versions on the node: `activities.storage.store`."""

    @activity.defn
    @abstractmethod
    async def commit_checkpoint(self, request: CommitInput) -> CommitResult:
        """Write the manifest last and publish the staged version atomically."""

    @activity.defn
    @abstractmethod
    async def upload_version(self, request: UploadInput) -> UploadResult:
        """Publish a version committed on this node to remote storage."""

    @activity.defn
    @abstractmethod
    async def discard_staging(self, request: DiscardInput) -> None:
        """Remove a capture's staging, whatever it holds."""

    @activity.defn
    @abstractmethod
    async def release_version(self, request: ReleaseInput) -> None:
        """Offer a version committed held back unverified: its verification pod restored it
        (a verified cluster capture; decision 0045)."""


class RestoreSteps(ABC):
    """The local restore as one activity: `activities.local.restore`."""

    @activity.defn
    @abstractmethod
    async def restore_checkpoint(self, request: RestoreInput) -> RestoredWorkload:
        """Verify, prepare, CRIU restore and hand over; `restore-failed` on any failure."""


class VerifySteps(ABC):
    """A verified capture's test restore on the capturing node: `activities.local.verify`."""

    @activity.defn
    @abstractmethod
    async def verify_version(self, request: VerifyInput) -> VerifyResult:
        """Restore the version just committed (held back unverified) into a throwaway
        process, await its answer, stop it and leave nothing of it behind; then offer the
        version. VerifyFailedError, with the restore's reason, when it does not answer."""


class PrefetchSteps(ABC):
    """Warming a node's cache: `activities.storage.sources`."""

    @activity.defn
    @abstractmethod
    async def prefetch_version(self, request: PrefetchInput) -> PrefetchResult:
        """Fetch a version from remote storage into this node's cache."""


class RetentionSteps(ABC):
    """Retention over the shared store and its remote location: `activities.storage.retention`."""

    @activity.defn
    @abstractmethod
    async def list_checkpoint_versions(self, request: ListVersionsInput) -> CheckpointVersions:
        """The committed versions of the checkpoint root."""

    @activity.defn
    @abstractmethod
    async def protected_versions(self, request: ProtectedInput) -> ProtectedVersions:
        """Versions that running restores or Ready resources use."""

    @activity.defn
    @abstractmethod
    async def delete_version(self, request: DeleteVersionInput) -> DeleteVersionResult:
        """Delete one version of the checkpoint root, manifest first."""

    @activity.defn
    @abstractmethod
    async def sweep_orphans(self, request: SweepInput) -> SweepResult:
        """Remove old staging, half-deleted versions and stale quarantine entries."""

    @activity.defn
    @abstractmethod
    async def list_remote_versions(self, request: ListVersionsInput) -> CheckpointVersions:
        """The committed versions of the remote location."""

    @activity.defn
    @abstractmethod
    async def delete_remote_version(self, request: DeleteVersionInput) -> DeleteVersionResult:
        """Delete one version of the remote location, manifest first."""

    @activity.defn
    @abstractmethod
    async def sweep_remote_uploads(self, request: UploadSweepInput) -> UploadSweepResult:
        """Abort incomplete multipart uploads older than the limit."""


class CatalogSteps(ABC):
    """Control queue: the catalog and quarantine of the store the control worker mounts
    (`activities.storage.queries`), answered for the CLI."""

    @activity.defn
    @abstractmethod
    async def answer_catalog(self, request: CatalogQuery) -> CatalogAnswer:
        """List, find or describe committed versions; list or clear quarantine entries."""


class ControlSteps(ABC):
    @activity.defn
    @abstractmethod
    async def claim_checkpoint_id(self, request: ClaimInput) -> None:
        """Claim the checkpoint ID for this resource; IdentityConflictError if another owns it."""

    @activity.defn
    @abstractmethod
    async def publish_status(self, request: StatusInput) -> None:
        """Publish the pipeline's phase, reason and figures where users look for them."""


class ClusterControlSteps(ControlSteps):
    """The control activities only a cluster has: the capture Job and its pod."""

    @activity.defn
    @abstractmethod
    async def create_capture_job(self, request: JobInput) -> str:
        """Create (or adopt) the capture Job of a Checkpoint; returns its name."""

    @activity.defn
    @abstractmethod
    async def read_capture_pod(self, request: PodQuery) -> PodObservation:
        """The capture pod as the API server has it (the fallback for missed signals)."""

    @activity.defn
    @abstractmethod
    async def delete_capture_job(self, request: JobRef) -> None:
        """Delete the capture Job and its pod; one already gone is fine."""

    @activity.defn
    @abstractmethod
    async def nodes_matching(self, request: NodeSelectorInput) -> list[str]:
        """Names of the nodes whose labels include all of one of the selectors, sorted."""

    @activity.defn
    @abstractmethod
    async def create_verification_pod(self, request: VerificationPodInput) -> VerificationPod:
        """Create (or adopt) the verification pod of a verified capture's version: the
        Checkpoint's template shaped as its restore target, on the capturing node."""

    @activity.defn
    @abstractmethod
    async def read_verification_pod(self, request: VerificationQuery) -> VerificationObservation:
        """The verification pod's restore status and readiness as the API server has them."""

    @activity.defn
    @abstractmethod
    async def delete_verification_pod(self, request: VerificationQuery) -> None:
        """Delete the verification pod; one already gone is fine."""


class ContainerSteps(ABC):
    @activity.defn
    @abstractmethod
    async def await_gms_saved(self, request: GmsSavedInput) -> None:
        """Wait for `gms-save-complete-<podUID>` in the container's control directory."""

    @activity.defn
    @abstractmethod
    async def dump_container(self, request: ContainerDumpInput) -> None:
        """CRIU-dump the container's process tree (with its rootfs diff) into staging; a
        leave-running dump never leaves the source frozen."""

    @activity.defn
    @abstractmethod
    async def commit_container(self, request: ContainerCommitInput) -> CommitResult:
        """Write the manifest last and publish the staged version atomically."""

    @activity.defn
    @abstractmethod
    async def write_container_sentinel(self, request: ContainerSentinelInput) -> None:
        """Write a sentinel into the container's control directory (through its root,
        never following links planted there)."""

    @activity.defn
    @abstractmethod
    async def stop_standby(self, request: ContainerTarget) -> None:
        """Stop the image's own standby of a restore target that fell back (SIGKILL to the
        container's init): the kubelet restarts the container, which then starts cold."""

    @activity.defn
    @abstractmethod
    async def restore_container(self, request: ContainerRestoreInput) -> RestoredContainer:
        """Restore a checkpoint into the pod's standby container, phases by heartbeat:
        verify (compatibility, quarantine, digests) → await the GMS loader → prepare the
        container → CRIU restore into its namespaces → CUDA restore → `restore-complete`.
        Any failure writes `restore-failed` (the standby starts cold) and raises."""
