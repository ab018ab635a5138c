"""Capture before a drain (decision 0044), pure: which pods a cordon captures, the
PodSnapshot that captures one, and whether an eviction of such a pod waits for it.

A pod opts in with `warmstart.dev/capture-on-drain: "true"` (the container: the one
`warmstart.dev/target-container` names, else the first), optionally with
`warmstart.dev/drain-deadline-seconds`. Once its node is cordoned and the pod is running
with that container Ready, the watcher creates the PodSnapshot `snapshot_for` shapes, named
after the pod's name and UID (a second cordon or a restarted watcher finds it there). The
webhook holds the pod's evictions (HTTP 429, which `kubectl drain` retries) while that
PodSnapshot is neither Ready nor Failed and its deadline, counted from its creation, has
not passed; before the PodSnapshot is made, while the pod is one a cordon captures, for
at most its deadline counted from the cordon (as the node's managedFields date it, else
from the first eviction the webhook held).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from api.errors import InvalidSpecError
from api.reasons import Phase
from api.resources import API_VERSION, GROUP, TARGET_CONTAINER_ANNOTATION

CAPTURE_ON_DRAIN_ANNOTATION = f"{GROUP}/capture-on-drain"
DRAIN_DEADLINE_ANNOTATION = f"{GROUP}/drain-deadline-seconds"
# On the drain PodSnapshot: the pod it captures (a UID is always a valid label value).
DRAIN_POD_UID_LABEL = f"{GROUP}/drain-pod-uid"
DEFAULT_DEADLINE_SECONDS = 300
MIN_DEADLINE_SECONDS, MAX_DEADLINE_SECONDS = 10, 3600
_NAME_PART = 40  # of the pod's name in the PodSnapshot's: the whole stays a label value
_FINISHED = {Phase.READY.value, Phase.FAILED.value}


@dataclass(frozen=True)
class DrainCapture:
    """What a pod opted in for: its container captured, evictions held at most
    `deadline_seconds` from the PodSnapshot's creation."""

    namespace: str
    pod_name: str
    pod_uid: str
    container: str
    deadline_seconds: int

    @property
    def snapshot_name(self) -> str:
        return snapshot_name(self.pod_name, self.pod_uid)


def drain_capture(pod: Mapping[str, Any]) -> DrainCapture | None:
    """What `pod` opted in for; None when it did not. InvalidSpecError, naming the
    annotation, when it asks wrongly."""
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    who = f"pod {meta.get('namespace', '')}/{meta.get('name', '')}"
    value = annotations.get(CAPTURE_ON_DRAIN_ANNOTATION)
    if value is None or value == "false":
        return None
    if value != "true":
        raise InvalidSpecError(
            f'{who}: annotation {CAPTURE_ON_DRAIN_ANNOTATION} is {value!r}; "true" or "false"'
        )
    containers = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
    container = annotations.get(TARGET_CONTAINER_ANNOTATION) or (containers or [""])[0]
    if container not in containers:
        raise InvalidSpecError(
            f"{who}: annotation {TARGET_CONTAINER_ANNOTATION} names {container!r}, which is "
            f"not a container of the pod (containers: {containers})"
        )
    return DrainCapture(
        namespace=meta.get("namespace") or "default",
        pod_name=meta.get("name") or "",
        pod_uid=meta.get("uid") or "",
        container=container,
        deadline_seconds=_deadline(annotations.get(DRAIN_DEADLINE_ANNOTATION), who=who),
    )


def _deadline(raw: str | None, *, who: str) -> int:
    if raw is None:
        return DEFAULT_DEADLINE_SECONDS
    seconds = int(raw) if raw.isdigit() else -1
    if not MIN_DEADLINE_SECONDS <= seconds <= MAX_DEADLINE_SECONDS:
        raise InvalidSpecError(
            f"{who}: annotation {DRAIN_DEADLINE_ANNOTATION} is {raw!r}; a whole number of "
            f"seconds from {MIN_DEADLINE_SECONDS} to {MAX_DEADLINE_SECONDS}"
        )
    return seconds


def cordoned(node: Mapping[str, Any] | None) -> bool:
    """Whether the node is cordoned (`spec.unschedulable`)."""
    return bool(((node or {}).get("spec") or {}).get("unschedulable"))


def capturable(pod: Mapping[str, Any], capture: DrainCapture) -> bool:
    """Whether the pod can be captured now: bound to a node, Running, not being deleted,
    its container Ready."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp") or not (pod.get("spec") or {}).get("nodeName"):
        return False
    if status.get("phase") != "Running":
        return False
    return any(
        c.get("name") == capture.container and c.get("ready") is True
        for c in status.get("containerStatuses") or []
    )


def snapshot_name(pod_name: str, pod_uid: str) -> str:
    """The drain PodSnapshot's name: the pod's name (its first 40 characters), then a hash
    of its UID, so a pod re-created under the same name gets a PodSnapshot of its own."""
    part = pod_name[:_NAME_PART].rstrip("-.")
    return f"{part}-drain-{hashlib.sha256(pod_uid.encode()).hexdigest()[:10]}"


def snapshot_for(capture: DrainCapture) -> dict[str, Any]:
    """The PodSnapshot that captures the pod before it is evicted. No identity: the
    checkpoint ID is the hash of the pod's UID and container (decision 0044 says why a pod
    restored from a Checkpoint does not take that Checkpoint's). Not owned by the pod: the
    eviction deletes the pod, and the capture's record must outlive it."""
    return {
        "apiVersion": API_VERSION,
        "kind": "PodSnapshot",
        "metadata": {
            "name": capture.snapshot_name,
            "namespace": capture.namespace,
            "labels": {DRAIN_POD_UID_LABEL: capture.pod_uid},
            "annotations": {DRAIN_DEADLINE_ANNOTATION: str(capture.deadline_seconds)},
        },
        "spec": {
            "source": {
                "podRef": {
                    "name": capture.pod_name,
                    "uid": capture.pod_uid,
                    "containers": [capture.container],
                }
            }
        },
    }


def eviction_hold(
    pod: Mapping[str, Any],
    *,
    node: Mapping[str, Any] | None,
    snapshot: Mapping[str, Any] | None,
    now: datetime,
    held_since: datetime | None = None,
) -> str | None:
    """Why an eviction of `pod` waits now, or None when it may go ahead. It waits while
    its drain PodSnapshot (`snapshot`, None: not made) is neither Ready nor Failed, until
    the deadline counted from its creation; and, before the watcher has made it, while the
    pod is one a cordon of its node (`node`) captures, until the deadline counted from the
    cordon: the earlier of the write that cordoned it (`cordoned_since`) and `held_since`,
    when the asker first held this pod's eviction (None: now, this is the first). A pod
    that asks wrongly is not held: its capture never starts."""
    try:
        capture = drain_capture(pod)
    except InvalidSpecError:
        return None
    if capture is None:
        return None
    who = f"pod {capture.namespace}/{capture.pod_name}"
    if snapshot is None:
        if not cordoned(node) or not capturable(pod, capture):
            return None
        since = min(t for t in (cordoned_since(node), held_since, now) if t is not None)
        until = since + timedelta(seconds=capture.deadline_seconds)
        if now >= until:
            return None
        return (
            f"{who}: waiting for its capture before drain to start (PodSnapshot "
            f"{capture.snapshot_name}, made by warmstart-controller); eviction waits at most "
            f"until {_text(until)}"
        )
    phase = (snapshot.get("status") or {}).get("phase") or Phase.PENDING.value
    if phase in _FINISHED:
        return None
    deadline = _snapshot_deadline(snapshot)
    if deadline is None or now >= deadline:
        return None
    return (
        f"{who}: its capture before drain is {phase} (PodSnapshot {capture.snapshot_name}); "
        f"eviction waits until it is Ready or Failed, at most until {_text(deadline)}"
    )


def cordoned_since(node: Mapping[str, Any] | None) -> datetime | None:
    """When the cordoned node's `spec.unschedulable` was last written, as the API server
    recorded it (the time of the managedFields entry that owns the field); None when the
    node is not cordoned or no entry says. A later write by the same manager moves it on:
    the hold it bounds stays bounded by that write's time."""
    if not cordoned(node):
        return None
    times = [
        _time(entry.get("time"))
        for entry in ((node or {}).get("metadata") or {}).get("managedFields") or []
        if "f:unschedulable" in (((entry.get("fieldsV1") or {}).get("f:spec")) or {})
    ]
    known = [t for t in times if t is not None]
    return max(known) if known else None


def _time(raw: Any) -> datetime | None:
    """An RFC 3339 time of the API server (with its zone); None when it is not one."""
    if not raw:
        return None
    try:
        found = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    except ValueError:
        return None
    return found if found.tzinfo is not None else None


def _text(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _snapshot_deadline(snapshot: Mapping[str, Any]) -> datetime | None:
    """Creation time plus the deadline the PodSnapshot carries; None when either is missing
    or unreadable (the eviction then goes ahead: a hold must end)."""
    meta = snapshot.get("metadata") or {}
    raw = (meta.get("annotations") or {}).get(DRAIN_DEADLINE_ANNOTATION, "")
    start = _time(meta.get("creationTimestamp"))
    if not raw.isdigit() or start is None:
        return None
    return start + timedelta(seconds=min(int(raw), MAX_DEADLINE_SECONDS))
