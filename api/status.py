"""The status a capture publishes on its resource: phase, conditions and figures, computed
from the previous status and what the workflow reports (pure; the control activity reads,
computes and patches).

Conditions (metav1.Condition): `JobCreated`, `Captured`, `Uploaded`, `Ready`. A condition
keeps its `lastTransitionTime` while its status stays the same. `Failed` is sticky: once a
resource failed, later reports of the same capture do not move it (a new resource does, and
so does a later run of its capture).

A later run of a resource's capture (a schedule's, an annotation's: decision 0043) never
takes a Ready resource's version away while it runs: the phase stays Ready and the
version the pods restore stays the one published, the run shows in the `Recapturing`
condition, and only a run that reaches Ready replaces the version. One that fails leaves
the published version as it was, its reason on `Recapturing` and in `message`.

`verifying` (decision 0045) is shown only while a report carries it: the version a verified
capture's verification pod restores, and that pod's UID; the next report takes it off.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from api.quarantine import QuarantineEntry
from api.reasons import Phase, Reason
from api.resources import (
    CaptureStatus,
    Condition,
    QuarantineStatus,
    VerifyingStatus,
    WorkflowLink,
)

_ORDER = [Phase.PENDING, Phase.CREATING, Phase.CAPTURING, Phase.UPLOADING, Phase.READY]


@dataclass(frozen=True)
class Report:
    """What the workflow reports at one step."""

    phase: Phase
    reason: Reason
    message: str = ""
    checkpoint_id: str = ""
    node_name: str = ""
    job_name: str = ""
    version: str = ""
    size_bytes: int = 0
    storage_uri: str = ""
    manifest_sha256: str = ""
    step_seconds: dict[str, float] = field(default_factory=dict)
    workflow: WorkflowLink | None = None
    generation: int = 0
    recapture: bool = False  # a later run of the resource's capture
    # A verified capture's verification pod restoring its version (shown while it lasts:
    # any later report without it takes it off the status).
    verifying: VerifyingStatus | None = None


def _reached(phase: Phase, at_least: Phase) -> bool:
    return phase in _ORDER and _ORDER.index(phase) >= _ORDER.index(at_least)


def _conditions(report: Report, job_name: str) -> list[tuple[str, bool, str, str]]:
    """(type, status, reason, message) of each condition after `report`."""
    phase, failed = report.phase, report.phase == Phase.FAILED
    why = report.reason.value
    out = [
        ("JobCreated", True, "JobCreated", f"Job {job_name}"),
        ("Captured", _reached(phase, Phase.UPLOADING), why, ""),
        ("Uploaded", phase == Phase.READY, why, ""),
        ("Ready", phase == Phase.READY, why, report.message if failed else ""),
    ]
    if not job_name:
        out = out[1:]  # a PodSnapshot, or a capture that has not created its Job (yet)
    return out


RECAPTURING = "Recapturing"


def next_status(previous: CaptureStatus | None, report: Report, *, now: datetime) -> CaptureStatus:
    """The status after `report`, or `previous` unchanged where it is already Failed (a
    first run's reports; a later run's move it on)."""
    serving = previous is not None and previous.phase == Phase.READY and bool(previous.version)
    if report.recapture and serving:
        assert previous is not None
        return _recapture_status(previous, report, now=now)
    if (
        previous is not None
        and previous.phase == Phase.FAILED
        and report.phase != Phase.FAILED
        and not report.recapture
    ):
        return previous
    return _progress(previous, report, now=now)


def _recapture_status(previous: CaptureStatus, report: Report, *, now: datetime) -> CaptureStatus:
    """A later run's report on a resource with a published version: only Ready replaces it."""
    run = report.workflow.id if report.workflow is not None else "a later capture"
    if report.phase == Phase.READY:
        status = _progress(previous, report, now=now)
        return _with_condition(
            status, RECAPTURING, False, Reason.CAPTURED.value, f"{run}: {report.version}", now
        )
    if report.phase == Phase.FAILED:
        update = {"message": f"{run} failed: {report.message}", "verifying": None}
        status = previous.model_copy(update=update)
        return _with_condition(status, RECAPTURING, False, report.reason.value, report.message, now)
    return _with_condition(
        previous.model_copy(update={"verifying": report.verifying}),
        RECAPTURING,
        True,
        report.reason.value,
        f"{run}: {report.phase.value}",
        now,
    )


def _with_condition(
    status: CaptureStatus, kind: str, ok: bool, reason: str, message: str, now: datetime
) -> CaptureStatus:
    """`status` with condition `kind` set."""
    old = next((c for c in status.conditions if c.type == kind), None)
    condition = _condition(old, kind, ok, reason, message, now, status.observed_generation)
    others = [c for c in status.conditions if c.type != kind]
    return status.model_copy(update={"conditions": [*others, condition]})


def _condition(
    old: Condition | None,
    kind: str,
    ok: bool,
    reason: str,
    message: str,
    now: datetime,
    generation: int,
) -> Condition:
    """Condition `kind`, keeping `old`'s transition time while its status stays the same."""
    value = "True" if ok else "False"
    since = old.last_transition_time if old is not None and old.status == value else now
    return Condition(
        type=kind,
        status=value,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )


def _progress(previous: CaptureStatus | None, report: Report, *, now: datetime) -> CaptureStatus:
    """The status after a report of the capture in progress (the phase moves)."""
    before = {c.type: c for c in previous.conditions} if previous else {}
    keep = previous or CaptureStatus()
    conditions = [
        _condition(before.get(kind), kind, ok, reason, message, now, report.generation)
        for kind, ok, reason, message in _conditions(report, report.job_name or keep.job_name)
    ]
    return CaptureStatus(
        phase=report.phase,
        message=report.message,
        conditions=conditions,
        checkpoint_id=report.checkpoint_id or keep.checkpoint_id,
        node_name=report.node_name or keep.node_name,
        job_name=report.job_name or keep.job_name,
        version=report.version or keep.version,
        size_bytes=report.size_bytes or keep.size_bytes,
        storage_uri=report.storage_uri or keep.storage_uri,
        manifest_sha256=report.manifest_sha256 or keep.manifest_sha256,
        step_seconds={**keep.step_seconds, **report.step_seconds},
        workflow=report.workflow or keep.workflow,
        observed_generation=report.generation,
        verifying=report.verifying,
        quarantine=keep.quarantine,
    )


def quarantine_status(entries: Iterable[QuarantineEntry]) -> list[QuarantineStatus]:
    """The quarantines in effect as a status shows them (pending evidence is left out)."""
    return [
        QuarantineStatus(
            version=entry.version,
            node_class=entry.node_class.describe(),
            nodes=list(entry.nodes or (entry.node,)),
            reason=entry.reason,
            message=entry.message[:512],
            since=entry.since,
            expires=entry.expires,
        )
        for entry in entries
        if entry.active
    ]


def event_for(previous: CaptureStatus | None, status: CaptureStatus) -> tuple[str, str] | None:
    """The Event (type, reason) a status change deserves, if any."""
    before = previous.phase if previous is not None else Phase.PENDING
    if status.phase == before:
        return _recapture_event(previous, status)
    if status.phase == Phase.FAILED:
        return "Warning", "CaptureFailed"
    if status.phase == Phase.READY:
        return "Normal", "CaptureSucceeded"
    if before == Phase.PENDING:
        return "Normal", "CaptureStarted"
    return None


def _recapture_event(
    previous: CaptureStatus | None, status: CaptureStatus
) -> tuple[str, str] | None:
    """A later run's Event, from its `Recapturing` condition's transition."""
    now = next((c for c in status.conditions if c.type == RECAPTURING), None)
    if now is None:
        return None
    before = next(
        (c for c in (previous.conditions if previous else []) if c.type == RECAPTURING), None
    )
    if before is not None and (before.status, before.reason) == (now.status, now.reason):
        return None
    if now.status == "True":
        return (
            None
            if before is not None and before.status == "True"
            else ("Normal", "RecaptureStarted")
        )
    if now.reason == Reason.CAPTURED.value:
        return "Normal", "CaptureSucceeded"
    return "Warning", "RecaptureFailed"
