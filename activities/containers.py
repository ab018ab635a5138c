"""The node-side activities of a cluster capture, defined once: the capture workflow names
these definitions, and a node worker registers the implementation for its container
runtime under the same activity names (containerd first; CRI-O behind the same interface).

Each finds the container on its own node from the pod's UID and container name (the
runtime's API, namespace `k8s.io`), so no node paths travel through the workflow.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from temporalio import activity

from activities.contracts import (
    CommitResult,
    ContainerCommitInput,
    ContainerDumpInput,
    ContainerRestoreInput,
    ContainerSentinelInput,
    ContainerTarget,
    GmsSavedInput,
    RestoredContainer,
)


class ContainerActivities(ABC):
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
