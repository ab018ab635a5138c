"""The API-side activities the workflows call on the control queue, defined once.

Workflows name these definitions (`execute_activity_method(ControlActivities.publish_status,
...)`); each control worker registers the implementation for its mode under the same
activity names: `LocalControlActivities` (state directory) in local mode, the Kubernetes
implementation (Checkpoint resources) on a cluster.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from temporalio import activity

from activities.contracts import (
    ClaimInput,
    JobInput,
    JobRef,
    NodeSelectorInput,
    PodObservation,
    PodQuery,
    StatusInput,
)


class ControlActivities(ABC):
    @activity.defn
    @abstractmethod
    async def claim_checkpoint_id(self, request: ClaimInput) -> None:
        """Claim the checkpoint ID for this resource; IdentityConflictError if another owns it."""

    @activity.defn
    @abstractmethod
    async def publish_status(self, request: StatusInput) -> None:
        """Publish the pipeline's phase, reason and figures where users look for them."""


class ClusterControlActivities(ControlActivities):
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
