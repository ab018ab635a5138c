"""Later runs of a resource's capture, the pure parts (decision 0043): the schedule's cron
checked by name, each run's own Job, the status a later run publishes, and which run a
capture pod's signals go to."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from api.jobs import JobSettings, capture_job, job_name
from api.reasons import Phase, Reason
from api.resources import CAPTURE_WORKFLOW_ANNOTATION, CaptureSchedule, Checkpoint, check_cron
from api.status import RECAPTURING, Report, event_for, next_status
from workers.watcher import signalled_run

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
FIRST = "capture/inference/llama/uid-1"


def resource(**spec: Any) -> Checkpoint:
    template = {"spec": {"containers": [{"name": "main", "image": "vllm/vllm-openai:v0.8.0"}]}}
    return Checkpoint.model_validate(
        {
            "metadata": {"name": "llama", "namespace": "inference", "uid": "uid-1"},
            "spec": {
                "identity": {"model": "m", "backendFramework": "vllm"},
                "job": {"podTemplateSpec": template},
                **spec,
            },
        }
    )


@pytest.mark.parametrize(
    ("cron", "kept"),
    [
        ("0 */6 * * *", "0 */6 * * *"),
        ("  30 2 * * MON-FRI ", "30 2 * * MON-FRI"),
        ("*/15 1-5 1,15 jan-jun 0", "*/15 1-5 1,15 jan-jun 0"),
        ("@daily", "@daily"),
    ],
)
def test_cron_expressions_that_are_taken(cron: str, kept: str) -> None:
    assert check_cron(cron) == kept


@pytest.mark.parametrize(
    ("cron", "says"),
    [
        ("0 * * *", "has 4 fields; it needs 5"),
        ("61 * * * *", "cron minute '61' is not in 0-59"),
        ("0 0 0 * *", "cron day of month '0' is not in 1-31"),
        ("0 0 * FOO *", "cron month 'FOO' is not in 1-12"),
        ("5-1 * * * *", "range '5-1' runs backwards"),
        ("*/0 * * * *", "has a step of 0"),
        ("0 0 * * 1;2", "is not *, N, N-M or one with /STEP"),
        ("@every 5m", "cron macro '@every 5m' is not one of"),
    ],
)
def test_cron_expressions_refused_by_name(cron: str, says: str) -> None:
    with pytest.raises(ValueError, match=None) as err:
        check_cron(cron)
    assert says in str(err.value)


def test_a_schedule_on_a_checkpoint_is_checked_with_its_time_zone() -> None:
    ok = resource(schedule={"cron": "0 3 * * *", "timeZone": "Europe/Berlin"})
    assert ok.spec.schedule == CaptureSchedule(cron="0 3 * * *", time_zone="Europe/Berlin")
    with pytest.raises(ValidationError, match="'Mars/Olympus' is not an IANA time zone"):
        resource(schedule={"cron": "0 3 * * *", "timeZone": "Mars/Olympus"})
    with pytest.raises(ValidationError, match="cron hour '24' is not in 0-23"):
        resource(schedule={"cron": "0 24 * * *"})


def test_each_later_run_gets_a_job_of_its_own_named_on_the_job_and_its_pod() -> None:
    ckpt = resource()
    assert job_name(ckpt) == job_name(ckpt, workflow_id=FIRST) == f"llama-{ckpt.checkpoint_id}"
    scheduled = f"{FIRST}/scheduled-2026-12-06T12:00:00Z"
    demanded = f"{FIRST}/on-demand-0123456789ab"
    names = {job_name(ckpt, workflow_id=w) for w in (FIRST, scheduled, demanded)}
    assert len(names) == 3 and all(len(n) <= 63 for n in names)
    long = resource().model_copy(
        update={"metadata": ckpt.metadata.model_copy(update={"name": "x" * 63})}
    )
    assert len(job_name(long, workflow_id=scheduled)) <= 63
    job = capture_job(ckpt, version="v", settings=JobSettings(), workflow_id=scheduled)
    assert job["metadata"]["name"] == job_name(ckpt, workflow_id=scheduled)
    assert job["metadata"]["annotations"][CAPTURE_WORKFLOW_ANNOTATION] == scheduled
    pod = job["spec"]["template"]["metadata"]["annotations"]
    assert pod[CAPTURE_WORKFLOW_ANNOTATION] == scheduled


def report(phase: Phase, reason: Reason = Reason.IN_PROGRESS, **fields: Any) -> Report:
    return Report(phase=phase, reason=reason, checkpoint_id="96429b2725761a09", **fields)


def ready_status() -> Any:
    status = None
    for phase in (Phase.CREATING, Phase.CAPTURING, Phase.UPLOADING):
        status = next_status(status, report(phase, job_name="llama-1"), now=T0)
    return next_status(
        status,
        report(Phase.READY, Reason.CAPTURED, version="v1", manifest_sha256="a" * 64),
        now=T0,
    )


def test_a_later_run_keeps_the_published_version_until_it_is_ready() -> None:
    from api.resources import WorkflowLink

    ready = ready_status()
    assert (ready.phase, ready.version) == (Phase.READY, "v1")
    run = WorkflowLink(id=f"{FIRST}/on-demand-x")
    later = T0 + timedelta(minutes=5)
    going = next_status(
        ready, report(Phase.CAPTURING, recapture=True, workflow=run, job_name="j2"), now=later
    )
    assert (going.phase, going.version, going.manifest_sha256) == (Phase.READY, "v1", "a" * 64)
    cond = {c.type: c for c in going.conditions}[RECAPTURING]
    assert (cond.status, cond.reason, cond.last_transition_time) == ("True", "InProgress", later)
    assert run.id in cond.message
    assert event_for(ready, going) == ("Normal", "RecaptureStarted")
    again = next_status(going, report(Phase.UPLOADING, recapture=True, workflow=run), now=later)
    assert event_for(going, again) is None

    done = next_status(
        again,
        report(
            Phase.READY,
            Reason.CAPTURED,
            version="v2",
            manifest_sha256="b" * 64,
            recapture=True,
            workflow=run,
        ),
        now=later,
    )
    assert (done.phase, done.version, done.manifest_sha256) == (Phase.READY, "v2", "b" * 64)
    cond = {c.type: c for c in done.conditions}[RECAPTURING]
    assert (cond.status, cond.reason) == ("False", "Captured")
    assert event_for(again, done) == ("Normal", "CaptureSucceeded")


def test_a_later_run_that_fails_leaves_the_published_version() -> None:
    ready = ready_status()
    going = next_status(ready, report(Phase.CREATING, recapture=True), now=T0)
    failed = next_status(
        going,
        report(
            Phase.FAILED, Reason.WORKLOAD_EXITED, message="container main exited 3", recapture=True
        ),
        now=T0,
    )
    assert (failed.phase, failed.version, failed.manifest_sha256) == (Phase.READY, "v1", "a" * 64)
    cond = {c.type: c for c in failed.conditions}[RECAPTURING]
    assert (cond.status, cond.reason, cond.message) == (
        "False",
        "WorkloadExited",
        "container main exited 3",
    )
    assert "container main exited 3" in failed.message
    assert event_for(going, failed) == ("Warning", "RecaptureFailed")


def test_a_later_run_of_a_failed_resource_moves_it_on() -> None:
    failed = next_status(None, report(Phase.FAILED, Reason.WORKLOAD_EXITED, message="x"), now=T0)
    # The first run's late reports do not move a Failed resource ...
    assert next_status(failed, report(Phase.CAPTURING), now=T0) == failed
    # ... a later run's do, up to Ready.
    going = next_status(failed, report(Phase.CAPTURING, recapture=True), now=T0)
    assert going.phase == Phase.CAPTURING
    done = next_status(
        going, report(Phase.READY, Reason.CAPTURED, version="v2", recapture=True), now=T0
    )
    assert (done.phase, done.version, done.message) == (Phase.READY, "v2", "")
    assert event_for(going, done) == ("Normal", "CaptureSucceeded")


def pod(annotation: str | None, *, namespace: str = "inference") -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": "llama-x1",
        "namespace": namespace,
        "labels": {"warmstart.dev/checkpoint": "llama", "warmstart.dev/checkpoint-uid": "uid-1"},
    }
    if annotation is not None:
        meta["annotations"] = {CAPTURE_WORKFLOW_ANNOTATION: annotation}
    return {"metadata": meta}


def test_a_capture_pod_signals_the_run_it_names_only_if_it_is_its_resources() -> None:
    assert signalled_run(pod(None)) == FIRST
    assert signalled_run(pod(FIRST)) == FIRST
    assert signalled_run(pod(f"{FIRST}/scheduled-2026")) == f"{FIRST}/scheduled-2026"
    # A pod cannot steer signals to another resource's capture, nor another namespace's.
    assert signalled_run(pod("capture/inference/other/uid-2")) == FIRST
    assert signalled_run(pod("capture/inference/llama/uid-10")) == FIRST
    assert signalled_run(pod(f"{FIRST}/x", namespace="tenant-b")) == (
        "capture/tenant-b/llama/uid-1"
    )
