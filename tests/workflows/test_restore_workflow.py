"""RestoreWorkflow with stand-in activities: eager node step, status after, fallback on failure."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from temporalio import activity
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from activities.contracts import RestoreInput, RestoreResult, StatusInput
from api.identity import CheckpointIdentity
from api.manifest import CriuInfo, HostInfo, Manifest, SourceInfo
from api.naming import node_task_queue
from api.reasons import Phase
from workflows.contracts import RestoreRequest
from workflows.restore import RestoreWorkflow

CKPT = "96429b2725761a09"


def _manifest() -> Manifest:
    return Manifest(
        checkpoint_id=CKPT, version="20261124T000000Z-abcdef",
        identity=CheckpointIdentity(model="m", backend_framework="vllm"),
        created_at=datetime(2026, 11, 24, tzinfo=UTC),
        source=SourceInfo(node="n", namespace="local", name="w"),
        criu=CriuInfo(version="4.2.1"), host=HostInfo(kernel="6", arch="x86_64"), files=(),
    )  # fmt: skip


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
        Worker(client, task_queue=node_task_queue(node), workflows=[RestoreWorkflow],
               activities=[restore_fn]),
    ):  # fmt: skip
        handle = await client.start_workflow(
            RestoreWorkflow.run, request, id=f"restore/test/w/{suffix}",
            task_queue=node_task_queue(node),
        )  # fmt: skip
        try:
            return statuses, await handle.result()
        except WorkflowFailureError as err:
            return statuses, err


async def test_restored_then_published(client: Client) -> None:
    @activity.defn(name="restore_checkpoint")
    async def restore(request: RestoreInput) -> RestoreResult:
        assert activity.info().task_queue.startswith("warmstart-node-")
        return RestoreResult(pid=77, manifest=_manifest(), version_dir="/v",
                             phase_seconds={"criu-restore": 0.04})  # fmt: skip

    statuses, result = await _run(client, restore)
    assert getattr(result, "pid", None) == 77
    assert [s.phase for s in statuses] == [Phase.RESTORED]
    assert statuses[0].version == "20261124T000000Z-abcdef"


async def test_failure_falls_back_with_reason(client: Client) -> None:
    @activity.defn(name="restore_checkpoint")
    async def restore(request: RestoreInput) -> RestoreResult:
        raise ApplicationError("criu/pages-1.img is missing", type="DigestMismatch",
                               non_retryable=True)  # fmt: skip

    statuses, err = await _run(client, restore)
    assert isinstance(err, WorkflowFailureError)
    assert isinstance(err.cause, ApplicationError) and err.cause.type == "DigestMismatch"
    [status] = statuses
    assert (status.phase, status.reason) == (Phase.FELL_BACK, "DigestMismatch")
    assert "pages-1.img" in status.message


def test_restore_is_not_retried() -> None:
    from workflows.policies import restore_options

    assert restore_options(30).retry.maximum_attempts == 1
