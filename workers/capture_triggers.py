"""Later runs of a resource's capture (decision 0043): the Temporal Schedule of a
Checkpoint with `spec.schedule`, and a run on demand when its `capture-now` annotation
changes. Each run is a CaptureWorkflow of its own, `capture/<ns>/<name>/<uid>/<run>`, whose
request says what triggered it; the watcher calls these."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Any

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
    ScheduleUpdate,
    ScheduleUpdateInput,
    WorkflowHandle,
)
from temporalio.service import RPCError, RPCStatusCode

from api.naming import (
    CAPTURE_WORKFLOW,
    ON_DEMAND_RUN,
    SCHEDULED_RUN,
    capture_schedule_id,
    recapture_workflow_id,
)
from api.reasons import Phase
from api.resources import CaptureSchedule
from workers.operations import first_capture_id, start_capture
from workflows import visibility
from workflows.contracts import CaptureRequest

# A run missed while the server was down starts if it is at most this late; older ones
# are skipped (the next one comes).
CATCHUP_WINDOW = timedelta(minutes=10)


def schedule_id(request: CaptureRequest) -> str:
    ref = request.resource
    assert ref is not None, "schedules are for resources"
    return capture_schedule_id(namespace=ref.namespace, name=ref.name, key=ref.uid)


def capture_schedule(request: CaptureRequest, spec: CaptureSchedule) -> Schedule:
    """A run of the capture at each time of `spec.cron`; a run still going when the next is
    due makes that one skip. Temporal appends each run's time to its workflow ID."""
    scheduled = request.model_copy(update={"trigger": "schedule"})
    action = ScheduleActionStartWorkflow(
        CAPTURE_WORKFLOW,
        scheduled,
        id=recapture_workflow_id(first_capture_id(request), SCHEDULED_RUN),
        task_queue=request.control_task_queue,
        static_summary=f"scheduled capture {request.name} ({request.checkpoint_id})",
        typed_search_attributes=visibility.start_attributes(
            namespace=request.namespace,
            checkpoint_id=request.checkpoint_id,
            node="",
            phase=Phase.PENDING,
        ),
    )
    return Schedule(
        action=action,
        spec=ScheduleSpec(cron_expressions=[spec.cron], time_zone_name=spec.time_zone),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP, catchup_window=CATCHUP_WINDOW),
        state=ScheduleState(
            paused=spec.paused,
            note=f"spec.schedule of {request.namespace}/{request.name}",
        ),
    )


async def ensure_capture_schedule(
    client: Client, request: CaptureRequest, spec: CaptureSchedule
) -> str:
    """Create the resource's Schedule, or update it to `spec` and `request`; its ID."""
    schedule, sid = capture_schedule(request, spec), schedule_id(request)
    try:
        await client.create_schedule(sid, schedule)
    except ScheduleAlreadyRunningError:

        def replace(_: ScheduleUpdateInput) -> ScheduleUpdate:
            return ScheduleUpdate(schedule=schedule)

        await client.get_schedule_handle(sid).update(replace)
    return sid


async def delete_capture_schedule(client: Client, request: CaptureRequest) -> bool:
    """Delete the resource's Schedule; False where there was none."""
    try:
        await client.get_schedule_handle(schedule_id(request)).delete()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return True


def on_demand_run(token: str) -> str:
    """The run an annotation value names: one run per value, whatever its characters."""
    return f"{ON_DEMAND_RUN}-{hashlib.sha256(token.encode()).hexdigest()[:12]}"


async def capture_now(
    client: Client, request: CaptureRequest, token: str
) -> WorkflowHandle[Any, Any]:
    """A run now, for annotation value `token` (the same value twice is one run)."""
    demanded = request.model_copy(update={"trigger": "annotation"})
    return await start_capture(client, demanded, run=on_demand_run(token))
