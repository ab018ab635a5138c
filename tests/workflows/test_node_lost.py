"""A node whose worker never picks up its step: the capture fails with NodeLost."""

from __future__ import annotations

import uuid

import pytest
from temporalio import activity
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from activities.contracts import ClaimInput, StatusInput
from api.identity import CheckpointIdentity
from api.reasons import Phase
from api.workload import LocalWorkload
from workflows.capture import CaptureWorkflow
from workflows.contracts import CaptureRequest


async def test_capture_on_a_node_without_worker_fails_node_lost(client: Client) -> None:
    statuses: list[StatusInput] = []

    @activity.defn(name="claim_checkpoint_id")
    async def claim(request: ClaimInput) -> None:
        pass

    @activity.defn(name="publish_status")
    async def publish(request: StatusInput) -> None:
        statuses.append(request)

    control = f"control-{uuid.uuid4().hex[:8]}"
    identity = CheckpointIdentity(model="m/lost", backend_framework="vllm")
    workload = LocalWorkload(name="lost", command=("serve",), cwd="/")
    request = CaptureRequest.local(
        workload, identity, node=f"gone-{uuid.uuid4().hex[:8]}", control_task_queue=control
    ).model_copy(update={"node_timeout_seconds": 1})
    worker = Worker(
        client, task_queue=control, workflows=[CaptureWorkflow], activities=[claim, publish]
    )
    async with worker:
        with pytest.raises(WorkflowFailureError) as err:
            await client.execute_workflow(
                CaptureWorkflow.run,
                request,
                id=f"capture/test/lost/{uuid.uuid4()}",
                task_queue=control,
            )
    cause = err.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "NodeLost"
    assert request.node in cause.message
    [failed] = statuses
    assert (failed.phase, failed.reason) == (Phase.FAILED, "NodeLost")
