"""Client-side operations on the pipelines: start, follow and look up captures and restores."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from temporalio.client import Client, WorkflowHandle, WorkflowQueryFailedError
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError

from activities.storage import CheckpointStore
from api.manifest import Manifest
from api.naming import capture_workflow_id, is_checkpoint_id, node_task_queue, restore_workflow_id
from api.reasons import Phase
from workflows import visibility
from workflows.capture import CaptureWorkflow
from workflows.contracts import CaptureRequest, Progress, RestoreRequest
from workflows.restore import RestoreWorkflow

tracer = trace.get_tracer(__name__)


class CheckpointLookupError(LookupError):
    """A name or checkpoint ID with no committed checkpoint."""


@dataclass(frozen=True)
class Snapshot:
    """What a follower sees: the workflow's progress plus its running activity's heartbeat."""

    progress: Progress
    activity: str = ""
    heartbeat: dict[str, Any] | None = None


async def start_capture(client: Client, request: CaptureRequest) -> WorkflowHandle[Any, Any]:
    """Start (or join) the capture of `request.name`: one workflow per name and checkpoint ID."""
    workflow_id = capture_workflow_id(
        namespace=request.namespace, name=request.name, key=request.checkpoint_id
    )
    with tracer.start_as_current_span(f"capture {request.namespace}/{request.name}"):
        return await client.start_workflow(
            CaptureWorkflow.run,
            request,
            id=workflow_id,
            task_queue=request.control_task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            static_summary=f"capture {request.name} ({request.checkpoint_id})",
        )


async def start_restore(client: Client, request: RestoreRequest) -> WorkflowHandle[Any, Any]:
    """Start a restore on the node's own queue (the node worker runs it and its activity).

    Eager start is requested: when this client also runs the node worker (the node worker
    on a cluster, the demo locally) the first workflow task runs here without a matching hop;
    otherwise the server schedules it as usual.
    """
    workflow_id = restore_workflow_id(
        namespace=request.namespace, name=request.name, key=str(uuid.uuid4())
    )
    with tracer.start_as_current_span(f"restore {request.namespace}/{request.name}"):
        return await client.start_workflow(
            RestoreWorkflow.run,
            request,
            id=workflow_id,
            task_queue=node_task_queue(request.node),
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            static_summary=f"restore {request.name} from {request.checkpoint_id}",
            search_attributes=visibility.start_attributes(
                namespace=request.namespace,
                checkpoint_id=request.checkpoint_id,
                node=request.node,
                phase=Phase.RESTORING,
            ),
            request_eager_start=True,
        )


async def snapshot(client: Client, handle: WorkflowHandle[Any, Any]) -> Snapshot:
    """The current step (query) and the pending activity's last heartbeat (describe)."""
    progress = await handle.query("progress", result_type=Progress)
    description = await handle.describe()
    for pending in description.raw_description.pending_activities:
        details: dict[str, Any] | None = None
        if pending.heartbeat_details.payloads:
            decoded = await client.data_converter.decode(pending.heartbeat_details.payloads)
            details = decoded[0] if decoded and isinstance(decoded[0], dict) else None
        return Snapshot(progress, pending.activity_type.name, details)
    return Snapshot(progress)


async def follow(
    client: Client,
    handle: WorkflowHandle[Any, Any],
    on_snapshot: Callable[[Snapshot], None],
    *,
    every: float = 0.5,
) -> Any:
    """Wait for the result, reporting progress about every `every` seconds."""
    result = asyncio.ensure_future(handle.result())
    while not result.done():
        # A query can race with completion; the result tells the truth.
        with contextlib.suppress(RPCError, WorkflowQueryFailedError):
            on_snapshot(await snapshot(client, handle))
        await asyncio.wait([result], timeout=every)
    return result.result()


def resolve_checkpoint(store: CheckpointStore, ref: str) -> Manifest:
    """The newest committed checkpoint named `ref`, or with checkpoint ID `ref`."""
    manifests = store.manifests()
    if is_checkpoint_id(ref):
        matches = [m for m in manifests if m.checkpoint_id == ref]
    else:
        matches = [m for m in manifests if m.source.name == ref]
    if not matches:
        known = ", ".join(sorted({m.source.name for m in manifests})) or "none"
        raise CheckpointLookupError(
            f"no committed checkpoint named or with ID {ref!r} in {store.root} (known: {known})"
        )
    return matches[0]
