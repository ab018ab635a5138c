"""The status a capture publishes on its resource: phase, conditions and figures, computed
from the previous status and what the workflow reports (pure; the control activity reads,
computes and patches).

Conditions (metav1.Condition): `JobCreated`, `Captured`, `Uploaded`, `Ready`. A condition
keeps its `lastTransitionTime` while its status stays the same. `Failed` is sticky: once a
resource failed, later reports of the same capture do not move it (a new resource does).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from api.quarantine import QuarantineEntry
from api.reasons import Phase, Reason
from api.resources import CaptureStatus, Condition, QuarantineStatus, WorkflowLink

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


def next_status(previous: CaptureStatus | None, report: Report, *, now: datetime) -> CaptureStatus:
    """The status after `report`, or `previous` unchanged where it is already Failed."""
    if previous is not None and previous.phase == Phase.FAILED and report.phase != Phase.FAILED:
        return previous
    before = {c.type: c for c in previous.conditions} if previous else {}
    keep = previous or CaptureStatus()
    conditions = []
    for kind, ok, reason, message in _conditions(report, report.job_name or keep.job_name):
        status = "True" if ok else "False"
        old = before.get(kind)
        since = old.last_transition_time if old is not None and old.status == status else now
        conditions.append(
            Condition(
                type=kind,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=since,
                observed_generation=report.generation,
            )
        )
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
        return None
    if status.phase == Phase.FAILED:
        return "Warning", "CaptureFailed"
    if status.phase == Phase.READY:
        return "Normal", "CaptureSucceeded"
    if before == Phase.PENDING:
        return "Normal", "CaptureStarted"
    return None
