"""Client operations on pipelines: start, follow and look up captures and restores.

Everything here talks to Temporal only (typed workflow handles, visibility with the
registered search attributes, queries, results); checkpoints themselves come from the
catalog (`activities.storage.catalog`), since histories expire and checkpoints do not.

Workflows are started by their registered type names, with the handles typed by the
workflow classes: importing the workflow modules would import every activity module
into the CLI, tenths of a second on the restore path (docs/decisions/0007).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Protocol, TypeVar

from temporalio.client import (
    Client,
    WorkflowExecution,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowQueryFailedError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.service import RPCError

from activities.contracts import Heartbeat, PipelineKind, RemoteStorage
from api.errors import PipelineFailedError
from api.naming import (
    CAPTURE_WORKFLOW,
    PREFETCH_WORKFLOW,
    PROGRESS_QUERY,
    RESTORE_WORKFLOW,
    capture_workflow_id,
    node_task_queue,
    recapture_workflow_id,
    restore_workflow_id,
)
from api.reasons import Phase, Reason, as_reason
from workflows import visibility
from workflows.contracts import (
    CaptureRequest,
    CaptureResult,
    PrefetchReport,
    PrefetchRequest,
    Progress,
    RestoreRequest,
    RestoreResult,
)

if TYPE_CHECKING:
    from api.identity import CheckpointIdentity
    from api.workload import LocalWorkload
    from workers.settings import Settings
    from workflows.capture import CaptureWorkflow
    from workflows.restore import RestoreWorkflow

W = TypeVar("W")
T = TypeVar("T")
_QUERY_TIMEOUT = timedelta(seconds=2)
_WORKFLOW_TYPES: dict[PipelineKind, str] = {
    "capture": CAPTURE_WORKFLOW,
    "restore": RESTORE_WORKFLOW,
}


@dataclass(frozen=True)
class LiveProgress:
    """What a follower sees: the workflow's progress plus its running activity's heartbeat."""

    progress: Progress
    activity: str = ""
    heartbeat: Heartbeat | None = None


@dataclass(frozen=True)
class PipelineRecord:
    """A capture or restore as Temporal knows it (visibility, result or failure)."""

    kind: PipelineKind
    name: str
    checkpoint_id: str
    workflow_id: str
    run_id: str
    status: str  # Temporal's execution status: RUNNING, COMPLETED, FAILED, ...
    phase: str  # WarmstartPhase
    reason: str = ""
    message: str = ""
    step: str = ""  # the current step of a running pipeline
    step_seconds: dict[str, float] | None = None
    started_at: datetime | None = None
    closed_at: datetime | None = None


def remote_storage(settings: Settings) -> RemoteStorage | None:
    """The remote store the settings name, if any (else the node's root is the store)."""
    return settings.storage.location()


def local_capture_request(
    settings: Settings,
    workload: LocalWorkload,
    identity: CheckpointIdentity,
    *,
    leave_running: bool = False,
    verify: bool = False,
    verify_answer_seconds: float = 120.0,
) -> CaptureRequest:
    """The capture of a local workload on this node (settings name the node and queue);
    `verify`: a test restore of the new version must answer before it is offered."""
    return CaptureRequest.local(
        workload,
        identity,
        node=settings.node.name,
        control_task_queue=settings.node.control_task_queue,
        leave_running=leave_running,
        storage=remote_storage(settings),
        verify=verify,
        verify_answer_seconds=verify_answer_seconds,
    )


def first_capture_id(request: CaptureRequest) -> str:
    """The ID of the first capture of `request.name`: per name and checkpoint ID (local
    mode), per resource UID (cluster)."""
    key = request.resource.uid if request.resource is not None else request.checkpoint_id
    return capture_workflow_id(namespace=request.namespace, name=request.name, key=key)


async def start_capture(
    client: Client, request: CaptureRequest, *, run: str = ""
) -> WorkflowHandle[CaptureWorkflow, CaptureResult]:
    """Start (or join) the capture of `request.name`: one workflow per name and checkpoint ID
    (local mode), one per resource UID (cluster), which never runs twice: a resource whose
    capture ended is not captured again by the same run. `run` names a later run of a
    resource's capture (its own ID under the first's, decision 0043)."""
    workflow_id = first_capture_id(request)
    if run:
        workflow_id = recapture_workflow_id(workflow_id, run)
    reuse = (
        WorkflowIDReusePolicy.REJECT_DUPLICATE
        if request.resource is not None
        else WorkflowIDReusePolicy.ALLOW_DUPLICATE
    )
    return await client.start_workflow(
        CAPTURE_WORKFLOW,
        request,
        result_type=CaptureResult,
        id=workflow_id,
        task_queue=request.control_task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=reuse,
        static_summary=f"capture {request.name} ({request.checkpoint_id})",
        search_attributes=visibility.start_attributes(
            namespace=request.namespace,
            checkpoint_id=request.checkpoint_id,
            node=request.node,
            phase=Phase.PENDING,
        ),
    )


async def prefetch(client: Client, request: PrefetchRequest) -> PrefetchReport:
    """Warm the nodes' caches (PrefetchWorkflow on the control queue) and wait for them."""
    report: PrefetchReport = await client.execute_workflow(
        PREFETCH_WORKFLOW,
        request,
        result_type=PrefetchReport,
        id=f"prefetch/{request.checkpoint_id}/{uuid.uuid4().hex[:12]}",
        task_queue=request.control_task_queue,
        static_summary=f"prefetch {request.checkpoint_id} on {', '.join(request.nodes)}",
    )
    return report


async def start_restore(
    client: Client, request: RestoreRequest, *, key: str = ""
) -> WorkflowHandle[RestoreWorkflow, RestoreResult]:
    """Start a restore on the node's own queue (the node worker runs it and its activity).

    Eager start is requested: when this client also runs the node worker (the node worker
    on a cluster, the demo locally) the first workflow task runs here without a matching hop;
    otherwise the server schedules it as usual. `key`: the pod's UID on a cluster (one
    restore per pod, ever: a second start is refused); locally a fresh UUID.
    """
    workflow_id = restore_workflow_id(
        namespace=request.namespace, name=request.name, key=key or str(uuid.uuid4())
    )
    return await client.start_workflow(
        RESTORE_WORKFLOW,
        request,
        result_type=RestoreResult,
        id=workflow_id,
        task_queue=node_task_queue(request.node),
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        static_summary=(
            f"restore {request.name} from {request.checkpoint_id}"
            if request.refusal is None
            else f"refused: {request.name} starts cold"
        ),
        search_attributes=visibility.start_attributes(
            namespace=request.namespace,
            checkpoint_id=request.checkpoint_id,
            node=request.node,
            phase=Phase.RESTORING,
        ),
        request_eager_start=True,
    )


async def query_progress(
    handle: WorkflowHandle[W, T], *, rpc_timeout: timedelta | None = None
) -> Progress:
    """The pipeline's `progress` query (capture and restore answer it alike), typed."""
    progress: Progress = await handle.query(
        PROGRESS_QUERY, result_type=Progress, rpc_timeout=rpc_timeout
    )
    return progress


async def observe(client: Client, handle: WorkflowHandle[W, T]) -> LiveProgress:
    """The current step (query) and the pending activity's last heartbeat (describe)."""
    progress = await query_progress(handle)
    description = await handle.describe()
    for pending in description.raw_description.pending_activities:
        heartbeat = None
        if pending.heartbeat_details.payloads:
            [heartbeat] = await client.data_converter.decode(
                pending.heartbeat_details.payloads[:1], [Heartbeat]
            )
        return LiveProgress(progress, pending.activity_type.name, heartbeat)
    return LiveProgress(progress)


async def follow(
    client: Client,
    handle: WorkflowHandle[W, T],
    on_progress: Callable[[LiveProgress], None],
    *,
    every: float = 0.5,
) -> T:
    """The workflow's result, reporting progress about every `every` seconds; a failed
    workflow raises PipelineFailedError with the reason of the step that failed."""
    result = asyncio.ensure_future(handle.result())
    # The first look comes after `every`: a pipeline that ends sooner (a restore, usually)
    # costs its worker no query task.
    while not (await asyncio.wait([result], timeout=every))[0]:
        # A query can race with completion; the result tells the truth.
        with contextlib.suppress(RPCError, WorkflowQueryFailedError):
            on_progress(await observe(client, handle))
    try:
        return result.result()
    except WorkflowFailureError as err:
        raise pipeline_failure(err) from None


def pipeline_failure(err: WorkflowFailureError) -> PipelineFailedError:
    cause = err.cause
    if isinstance(cause, CancelledError):
        return PipelineFailedError("cancelled", reason=Reason.CANCELLED)
    if isinstance(cause, ApplicationError):
        reason = as_reason(cause.type) or Reason.INTERNAL
        return PipelineFailedError(cause.message, reason=reason)
    return PipelineFailedError(str(cause or err), reason=Reason.INTERNAL)


class _Timed(Protocol):
    @property
    def step_seconds(self) -> dict[str, float]: ...


Timed = TypeVar("Timed", bound=_Timed)


async def latest_pipeline(
    client: Client, kind: PipelineKind, *, namespace: str, name: str
) -> PipelineRecord | None:
    """The newest capture or restore of `name` in Temporal's visibility, or None."""
    query = (
        f"WorkflowType = '{_WORKFLOW_TYPES[kind]}' AND {visibility.NAMESPACE.name} = "
        f"'{namespace}' AND WorkflowId STARTS_WITH '{kind}/{namespace}/{name}/'"
    )
    async for execution in client.list_workflows(query, limit=1):
        return await _record(client, execution)
    return None


async def recent_pipelines(
    client: Client, *, namespace: str, status: str | None = None, limit: int = 20
) -> list[PipelineRecord]:
    """Captures and restores of `namespace`, newest first; `status` is Temporal's execution
    status to keep (Running, Failed, Completed, ...), all when None."""
    query = f"{visibility.NAMESPACE.name} = '{namespace}'"
    if status:
        query += f" AND ExecutionStatus = '{status}'"
    return [await _record(client, e) async for e in client.list_workflows(query, limit=limit)]


async def _record(client: Client, execution: WorkflowExecution) -> PipelineRecord:
    """What visibility says of a run, plus the reason and steps of its result or failure."""
    kind: PipelineKind = "capture" if execution.workflow_type == CAPTURE_WORKFLOW else "restore"
    parts = execution.id.split("/")  # <kind>/<namespace>/<name>/<key>
    record = PipelineRecord(
        kind=kind,
        name=parts[2] if len(parts) == 4 else execution.id,
        checkpoint_id=execution.typed_search_attributes.get(visibility.CHECKPOINT_ID) or "",
        workflow_id=execution.id,
        run_id=execution.run_id,
        status=execution.status.name if execution.status else "UNKNOWN",
        phase=execution.typed_search_attributes.get(visibility.PHASE) or "",
        started_at=execution.start_time,
        closed_at=execution.close_time,
    )
    if kind == "capture":
        capture: WorkflowHandle[CaptureWorkflow, CaptureResult] = client.get_workflow_handle(
            execution.id, run_id=execution.run_id, result_type=CaptureResult
        )
        return await _with_outcome(record, capture, execution.status, Reason.CAPTURED)
    restore: WorkflowHandle[RestoreWorkflow, RestoreResult] = client.get_workflow_handle(
        execution.id, run_id=execution.run_id, result_type=RestoreResult
    )
    return await _with_outcome(record, restore, execution.status, Reason.RESTORED)


async def _with_outcome(
    record: PipelineRecord,
    handle: WorkflowHandle[W, Timed],
    status: WorkflowExecutionStatus | None,
    success: Reason,
) -> PipelineRecord:
    """Add the reason and step timings of a closed run (from its result or its failure), or
    the current step of a running one (from its `progress` query, when a worker answers)."""
    if status == WorkflowExecutionStatus.RUNNING:
        with contextlib.suppress(RPCError, WorkflowQueryFailedError):
            now = await query_progress(handle, rpc_timeout=_QUERY_TIMEOUT)
            return replace(record, step=now.step, step_seconds=dict(now.step_seconds))
        return record
    if status == WorkflowExecutionStatus.COMPLETED:
        done = await handle.result()
        return replace(record, reason=success, step_seconds=dict(done.step_seconds))
    if status == WorkflowExecutionStatus.FAILED:
        try:
            await handle.result()
        except WorkflowFailureError as err:
            failure = pipeline_failure(err)
            return replace(record, reason=failure.reason, message=failure.message)
    return record
