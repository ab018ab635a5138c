"""Hostile or malformed start requests: whoever reaches Temporal can start our workflows by
name with any payload. Each is refused at once with the validation message naming the
field, the run fails (no workflow task retried for ever), and no step was scheduled."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from api.naming import (
    CAPTURE_WORKFLOW,
    CATALOG_WORKFLOW,
    PREFETCH_WORKFLOW,
    RESTORE_WORKFLOW,
)
from api.retention import RETENTION_WORKFLOW
from workflows.capture import CaptureWorkflow
from workflows.catalog import CatalogWorkflow
from workflows.prefetch import PrefetchWorkflow
from workflows.restore import RestoreWorkflow
from workflows.retention import RetentionWorkflow

pytestmark = pytest.mark.timeout(60)

CASES: list[tuple[str, Any, str]] = [
    (CAPTURE_WORKFLOW, {"name": "../../etc", "checkpoint_id": "0123456789abcdef"}, "name"),
    (CAPTURE_WORKFLOW, {"name": "llama", "checkpoint_id": "zz"}, "checkpoint_id"),
    (CAPTURE_WORKFLOW, "not an object", "CaptureRequest"),
    (
        CAPTURE_WORKFLOW,
        {
            "name": "llama",
            "identity": {"model": "m", "backend_framework": "vllm"},
            "checkpoint_id": "0123456789abcdef",
            "source": {"mode": "elsewhere"},
        },
        "source",
    ),
    (
        RESTORE_WORKFLOW,
        {"name": "llama", "checkpoint_id": "0123456789abcdef", "node": "../x"},
        "node",
    ),
    (
        RESTORE_WORKFLOW,
        {"name": "llama", "checkpoint_id": "0123456789abcdef", "answer_timeout_seconds": 1e300},
        "answer_timeout_seconds",
    ),
    (PREFETCH_WORKFLOW, {"checkpoint_id": 7}, "PrefetchRequest"),
    (RETENTION_WORKFLOW, {"policies": "all"}, "RetentionRequest"),
    (CATALOG_WORKFLOW, {"action": "rm -rf /"}, "Catalog"),
]


@pytest.mark.parametrize(("workflow", "payload", "named"), CASES)
async def test_a_malformed_start_request_is_refused_at_once(
    client: Client, workflow: str, payload: Any, named: str
) -> None:
    queue = f"hostile-{uuid.uuid4().hex[:8]}"
    workflows = [CaptureWorkflow, RestoreWorkflow, PrefetchWorkflow, RetentionWorkflow]
    async with Worker(client, task_queue=queue, workflows=[*workflows, CatalogWorkflow]):
        handle = await client.start_workflow(
            workflow, payload, id=f"hostile/{uuid.uuid4()}", task_queue=queue
        )
        with pytest.raises(WorkflowFailureError) as failed:
            await asyncio.wait_for(handle.result(), 20)
    cause = failed.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "ValidationError"
    assert named in str(cause)
    history = await handle.fetch_history()
    assert not any(e.HasField("activity_task_scheduled_event_attributes") for e in history.events)
    assert not any(
        e.HasField("start_child_workflow_execution_initiated_event_attributes")
        for e in history.events
    )
