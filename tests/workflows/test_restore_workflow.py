"""RestoreWorkflow with stand-in activities: eager node step, status after, fallback on failure."""

from __future__ import annotations

import uuid

from temporalio import activity
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from activities.contracts import RestoredWorkload, RestoreInput, StatusInput
from api.naming import node_task_queue
from api.reasons import Phase
from workflows.contracts import RestoreRequest
from workflows.restore import RestoreWorkflow

CKPT = "96429b2725761a09"


async def _run(client: Client, restore_fn: object) -> tuple[list[StatusInput], object]:
    statuses: list[StatusInput] = []

    @activity.defn(name="publish_status")
    async def publish(request: StatusInput) -> None:
        statuses.append(request)

    suffix = uuid.uuid4().hex[:8]
    node, control = f"node-{suffix}", f"control-{suffix}"
    request = RestoreRequest(name="w", checkpoint_id=CKPT, node=node, control_task_queue=control)
    async with (
        Worker(client, task_queue=control, activities=[publish]),
        Worker(
            client,
            task_queue=node_task_queue(node),
            workflows=[RestoreWorkflow],
            activities=[restore_fn],
        ),
    ):
        handle = await client.start_workflow(
            RestoreWorkflow.run,
            request,
            id=f"restore/test/w/{suffix}",
            task_queue=node_task_queue(node),
        )
        try:
            return statuses, await handle.result()
        except WorkflowFailureError as err:
            return statuses, err


async def test_restored_then_published(client: Client) -> None:
    @activity.defn(name="restore_checkpoint")
    async def restore(request: RestoreInput) -> RestoredWorkload:
        assert activity.info().task_queue.startswith("warmstart-node-")
        stages = {"criu-restore": 0.04}
        return RestoredWorkload(pid=77, version="20261124T000000Z-abcdef", stage_seconds=stages)

    statuses, result = await _run(client, restore)
    assert getattr(result, "pid", None) == 77
    assert [s.phase for s in statuses] == [Phase.RESTORED]
    assert statuses[0].version == "20261124T000000Z-abcdef"


async def test_failure_falls_back_with_reason(client: Client) -> None:
    @activity.defn(name="restore_checkpoint")
    async def restore(request: RestoreInput) -> RestoredWorkload:
        message = "criu/pages-1.img is missing"
        raise ApplicationError(message, type="DigestMismatch", non_retryable=True)

    statuses, err = await _run(client, restore)
    assert isinstance(err, WorkflowFailureError)
    assert isinstance(err.cause, ApplicationError) and err.cause.type == "DigestMismatch"
    [status] = statuses
    assert (status.phase, status.reason) == (Phase.FELL_BACK, "DigestMismatch")
    assert "pages-1.img" in status.message


def test_restore_is_not_retried() -> None:
    from workflows.policies import restore_options

    assert restore_options(30).retry.maximum_attempts == 1
