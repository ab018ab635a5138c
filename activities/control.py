"""The API-side activities the workflows call on the control queue, defined once.

Workflows name these definitions (`execute_activity_method(ControlActivities.publish_status,
...)`); each control worker registers the implementation for its mode under the same
activity names: `LocalControlActivities` (state directory) in local mode, the Kubernetes
implementation (Checkpoint resources) on a cluster.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from temporalio import activity

from activities.contracts import ClaimInput, StatusInput


class ControlActivities(ABC):
    @activity.defn
    @abstractmethod
    async def claim_checkpoint_id(self, request: ClaimInput) -> None:
        """Claim the checkpoint ID for this resource; IdentityConflictError if another owns it."""

    @activity.defn
    @abstractmethod
    async def publish_status(self, request: StatusInput) -> None:
        """Publish the pipeline's phase, reason and figures where users look for them."""
