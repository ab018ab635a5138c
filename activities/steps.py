"""Declarations of the activities the workflows schedule on node and control queues (beside
`activities.containers.ContainerActivities` and `activities.control.ControlActivities`):
abstract classes whose `@activity.defn` methods give each activity its name and contract.

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
    CheckpointVersions,
    CommitInput,
    CommitResult,
    DeleteVersionInput,
    DeleteVersionResult,
    DiscardInput,
    DumpInput,
    LaunchInput,
    LaunchResult,
    ListVersionsInput,
    PrefetchInput,
    PrefetchResult,
    ProtectedInput,
    ProtectedVersions,
    RestoredWorkload,
    RestoreInput,
    SentinelInput,
    StopInput,
    SweepInput,
    SweepResult,
    UploadInput,
    UploadResult,
    UploadSweepInput,
    UploadSweepResult,
)


class LocalProcessSteps(ABC):
    """A workload run as a local process (local mode): `activities.local`."""

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
    """CRIU dumps of local processes: `activities.criu`."""

    @activity.defn
    @abstractmethod
    async def dump_checkpoint(self, request: DumpInput) -> None:
        """CRIU-dump the workload's tree into fresh staging, heartbeating bytes written."""


class SentinelSteps(ABC):
    """The sentinel protocol on the node: `activities.sentinels`."""

    @activity.defn
    @abstractmethod
    async def write_sentinel(self, request: SentinelInput) -> None:
        """Write a sentinel into the workload's control directory, atomically."""


class StorageSteps(ABC):
    """Committing, publishing and discarding versions on the node: `activities.storage`."""

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


class RestoreSteps(ABC):
    """The local restore as one activity: `activities.restore`."""

    @activity.defn
    @abstractmethod
    async def restore_checkpoint(self, request: RestoreInput) -> RestoredWorkload:
        """Verify, prepare, CRIU restore and hand over; `restore-failed` on any failure."""


class PrefetchSteps(ABC):
    """Warming a node's cache: `activities.sources`."""

    @activity.defn
    @abstractmethod
    async def prefetch_version(self, request: PrefetchInput) -> PrefetchResult:
        """Fetch a version from remote storage into this node's cache."""


class RetentionSteps(ABC):
    """Retention over the shared store and its remote location: `activities.retention`."""

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
