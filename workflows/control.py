"""Control-queue steps both workflows take: publishing the pipeline's status."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.contracts import StatusInput
    from activities.control import ControlActivities
    from workflows import policies


async def publish_status(status: StatusInput, *, task_queue: str) -> None:
    """Publish `status` where users look for it (the resource's status on a cluster)."""
    await workflow.execute_activity_method(
        ControlActivities.publish_status,
        status,
        task_queue=task_queue,
        start_to_close_timeout=policies.CONTROL.start_to_close,
        retry_policy=policies.CONTROL.retry,
        summary=f"publish {status.phase.value}",
    )
