"""Capture before a drain, the pure parts: which pods a cordon captures, the PodSnapshot
shaped for one, and the answer to an eviction."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from api.drain import (
    CAPTURE_ON_DRAIN_ANNOTATION,
    DEFAULT_DEADLINE_SECONDS,
    DRAIN_DEADLINE_ANNOTATION,
    DRAIN_POD_UID_LABEL,
    DrainCapture,
    capturable,
    cordoned,
    cordoned_since,
    drain_capture,
    eviction_hold,
    snapshot_for,
    snapshot_name,
)
from api.errors import InvalidSpecError
from api.resources import TARGET_CONTAINER_ANNOTATION, PodSnapshot

UID = "0f6a7d3e-5b1c-4e8a-9d2f-1a2b3c4d5e6f"
CREATED = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def pod(
    annotations: dict[str, str] | None = None,
    *,
    phase: str = "Running",
    ready: bool = True,
    node: str = "gpu-1",
    containers: tuple[str, ...] = ("main", "sidecar"),
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "llama-0",
            "namespace": "inference",
            "uid": UID,
            "annotations": {CAPTURE_ON_DRAIN_ANNOTATION: "true"}
            if annotations is None
            else annotations,
        },
        "spec": {"nodeName": node, "containers": [{"name": c} for c in containers]},
        "status": {
            "phase": phase,
            "containerStatuses": [
                {"name": "sidecar", "ready": True},
                {"name": "main", "ready": ready},
            ],
        },
    }


CORDON_WRITTEN = "2026-12-06T11:59:00Z"
CORDONED = {
    "metadata": {
        "name": "gpu-1",
        "managedFields": [
            {  # the kubelet's status: not the cordon
                "manager": "kubelet",
                "operation": "Update",
                "time": "2026-12-06T12:30:00Z",
                "fieldsV1": {"f:status": {"f:conditions": {}}},
            },
            {
                "manager": "kubectl-cordon",
                "operation": "Update",
                "time": CORDON_WRITTEN,
                "fieldsV1": {"f:spec": {"f:unschedulable": {}}},
            },
        ],
    },
    "spec": {"unschedulable": True},
}
SCHEDULABLE = {"metadata": {"name": "gpu-1"}, "spec": {}}


def snapshot(phase: str | None, *, deadline: str = "300") -> dict[str, Any]:
    return {
        "metadata": {
            "name": snapshot_name("llama-0", UID),
            "creationTimestamp": CREATED.isoformat().replace("+00:00", "Z"),
            "annotations": {DRAIN_DEADLINE_ANNOTATION: deadline},
        },
        **({"status": {"phase": phase}} if phase is not None else {}),
    }


def test_a_pod_opts_in_with_the_annotation_for_its_first_container_by_default() -> None:
    assert drain_capture(pod()) == DrainCapture(
        namespace="inference",
        pod_name="llama-0",
        pod_uid=UID,
        container="main",
        deadline_seconds=DEFAULT_DEADLINE_SECONDS,
    )
    chosen = pod({CAPTURE_ON_DRAIN_ANNOTATION: "true", TARGET_CONTAINER_ANNOTATION: "sidecar"})
    assert drain_capture(chosen) is not None
    assert drain_capture(chosen).container == "sidecar"  # type: ignore[union-attr]
    timed = pod({CAPTURE_ON_DRAIN_ANNOTATION: "true", DRAIN_DEADLINE_ANNOTATION: "900"})
    assert drain_capture(timed).deadline_seconds == 900  # type: ignore[union-attr]


def test_a_pod_without_the_annotation_or_with_false_is_not_captured() -> None:
    assert drain_capture(pod({})) is None
    assert drain_capture(pod({CAPTURE_ON_DRAIN_ANNOTATION: "false"})) is None


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        (
            {CAPTURE_ON_DRAIN_ANNOTATION: "yes"},
            "pod inference/llama-0: annotation warmstart.dev/capture-on-drain is 'yes'; "
            '"true" or "false"',
        ),
        (
            {CAPTURE_ON_DRAIN_ANNOTATION: "true", TARGET_CONTAINER_ANNOTATION: "gone"},
            "pod inference/llama-0: annotation warmstart.dev/target-container names 'gone', "
            "which is not a container of the pod (containers: ['main', 'sidecar'])",
        ),
        (
            {CAPTURE_ON_DRAIN_ANNOTATION: "true", DRAIN_DEADLINE_ANNOTATION: "5"},
            "pod inference/llama-0: annotation warmstart.dev/drain-deadline-seconds is '5'; "
            "a whole number of seconds from 10 to 3600",
        ),
        (
            {CAPTURE_ON_DRAIN_ANNOTATION: "true", DRAIN_DEADLINE_ANNOTATION: "1h"},
            "pod inference/llama-0: annotation warmstart.dev/drain-deadline-seconds is '1h'; "
            "a whole number of seconds from 10 to 3600",
        ),
    ],
)
def test_a_pod_that_asks_wrongly_is_told_which_annotation(
    annotations: dict[str, str], message: str
) -> None:
    with pytest.raises(InvalidSpecError) as err:
        drain_capture(pod(annotations))
    assert str(err.value) == message


def test_only_a_running_pod_whose_container_is_ready_is_capturable() -> None:
    wanted = drain_capture(pod())
    assert wanted is not None
    assert capturable(pod(), wanted)
    assert not capturable(pod(phase="Pending"), wanted)
    assert not capturable(pod(node=""), wanted)
    deleting = pod()
    deleting["metadata"]["deletionTimestamp"] = "2026-12-06T12:00:00Z"
    assert not capturable(deleting, wanted)
    # The sidecar being Ready does not make the main container so.
    assert not capturable(pod(ready=False), wanted)


def test_a_node_is_cordoned_when_unschedulable() -> None:
    assert cordoned(CORDONED)
    assert not cordoned(SCHEDULABLE)
    assert not cordoned(None)


def test_a_cordon_is_dated_by_the_write_that_owns_spec_unschedulable() -> None:
    assert cordoned_since(CORDONED) == datetime(2026, 12, 6, 11, 59, tzinfo=UTC)
    assert cordoned_since(SCHEDULABLE) is None
    undated = {"metadata": {"name": "gpu-1"}, "spec": {"unschedulable": True}}
    assert cordoned_since(undated) is None
    # Two managers wrote it: the later write.
    twice = copy.deepcopy(CORDONED)
    twice["metadata"]["managedFields"].append(
        {"time": "2026-12-06T11:59:30Z", "fieldsV1": {"f:spec": {"f:unschedulable": {}}}}
    )
    assert cordoned_since(twice) == datetime(2026, 12, 6, 11, 59, 30, tzinfo=UTC)
    # A time that is not one counts for nothing.
    garbled = copy.deepcopy(CORDONED)
    garbled["metadata"]["managedFields"][1]["time"] = "yesterday"
    assert cordoned_since(garbled) is None


def test_the_snapshot_is_named_by_pod_name_and_uid_and_is_a_valid_podsnapshot() -> None:
    wanted = drain_capture(pod())
    assert wanted is not None
    body = snapshot_for(wanted)
    assert body == snapshot_for(wanted)  # deterministic: no clock, no randomness
    name = body["metadata"]["name"]
    assert name.startswith("llama-0-drain-") and len(name) == len("llama-0-drain-") + 10
    assert snapshot_name("llama-0", "another-uid") != name
    # A long pod name is cut, never leaving a dash or dot before "-drain-".
    long_name = snapshot_name("a" * 39 + "-b" * 30, UID)
    assert long_name.startswith("a" * 39 + "-drain-") and len(long_name) <= 63
    resource = PodSnapshot.model_validate(body)
    assert resource.metadata.namespace == "inference"
    assert resource.metadata.labels == {DRAIN_POD_UID_LABEL: UID}
    assert resource.metadata.annotations == {DRAIN_DEADLINE_ANNOTATION: "300"}
    assert resource.spec.source.pod_ref.model_dump() == {
        "name": "llama-0",
        "uid": UID,
        "containers": ["main"],
    }
    assert resource.spec.identity is None
    assert "ownerReferences" not in body["metadata"]  # outlives the evicted pod


def test_an_eviction_waits_while_the_capture_runs_until_its_deadline() -> None:
    during = CREATED + timedelta(seconds=10)
    for phase in (None, "Pending", "Creating", "Capturing", "Uploading"):
        hold = eviction_hold(pod(), node=CORDONED, snapshot=snapshot(phase), now=during)
        assert hold is not None
        assert hold.startswith("pod inference/llama-0: its capture before drain is ")
        assert hold.endswith(
            "eviction waits until it is Ready or Failed, at most until 2026-12-06T12:05:00Z"
        )
    after = CREATED + timedelta(seconds=300)
    assert eviction_hold(pod(), node=CORDONED, snapshot=snapshot("Capturing"), now=after) is None
    longer = snapshot("Capturing", deadline="900")
    assert eviction_hold(pod(), node=CORDONED, snapshot=longer, now=after) is not None


def test_an_eviction_goes_ahead_once_the_capture_ended() -> None:
    during = CREATED + timedelta(seconds=10)
    for phase in ("Ready", "Failed"):
        assert eviction_hold(pod(), node=CORDONED, snapshot=snapshot(phase), now=during) is None


def test_a_hold_always_ends() -> None:
    """A PodSnapshot without a readable deadline or creation time holds nothing; a deadline
    written larger than the bound counts as the bound."""
    during = CREATED + timedelta(seconds=10)
    assert (
        eviction_hold(
            pod(), node=CORDONED, snapshot=snapshot("Capturing", deadline="soon"), now=during
        )
        is None
    )
    undated = snapshot("Capturing")
    del undated["metadata"]["creationTimestamp"]
    assert eviction_hold(pod(), node=CORDONED, snapshot=undated, now=during) is None
    huge = snapshot("Capturing", deadline="999999")
    an_hour_on = CREATED + timedelta(seconds=3600)
    assert eviction_hold(pod(), node=CORDONED, snapshot=huge, now=an_hour_on) is None


def test_before_the_snapshot_is_made_only_a_capturable_pod_on_a_cordoned_node_waits() -> None:
    now = CREATED
    hold = eviction_hold(pod(), node=CORDONED, snapshot=None, now=now)
    assert hold == (
        "pod inference/llama-0: waiting for its capture before drain to start "
        f"(PodSnapshot {snapshot_name('llama-0', UID)}, made by warmstart-controller); "
        "eviction waits at most until 2026-12-06T12:04:00Z"
    )
    assert eviction_hold(pod(), node=SCHEDULABLE, snapshot=None, now=now) is None
    assert eviction_hold(pod(), node=None, snapshot=None, now=now) is None
    assert eviction_hold(pod(ready=False), node=CORDONED, snapshot=None, now=now) is None


def test_before_the_snapshot_is_made_the_hold_ends_at_the_deadline_from_the_cordon() -> None:
    """A controller that never makes the PodSnapshot (away, or refused in a namespace that
    did not opt in) holds a drain no longer than the pod's deadline."""
    cordon = datetime(2026, 12, 6, 11, 59, tzinfo=UTC)
    later = cordon + timedelta(seconds=DEFAULT_DEADLINE_SECONDS)
    assert eviction_hold(pod(), node=CORDONED, snapshot=None, now=later) is None
    just_before = later - timedelta(seconds=1)
    assert eviction_hold(pod(), node=CORDONED, snapshot=None, now=just_before) is not None
    # Where no write dates the cordon (an API server without managedFields), the first
    # eviction held starts the count.
    undated = {"metadata": {"name": "gpu-1"}, "spec": {"unschedulable": True}}
    first = eviction_hold(pod(), node=undated, snapshot=None, now=cordon)
    assert first is not None and first.endswith("at most until 2026-12-06T12:04:00Z")
    assert eviction_hold(pod(), node=undated, snapshot=None, now=later, held_since=cordon) is None
    # The earlier of the two counts.
    early = cordon - timedelta(seconds=60)
    assert (
        eviction_hold(pod(), node=CORDONED, snapshot=None, now=just_before, held_since=early)
        is None
    )


def test_a_pod_that_did_not_opt_in_or_asks_wrongly_is_never_held() -> None:
    during = CREATED + timedelta(seconds=10)
    for asked in ({}, {CAPTURE_ON_DRAIN_ANNOTATION: "maybe"}):
        for found in (None, snapshot("Capturing")):
            assert eviction_hold(pod(asked), node=CORDONED, snapshot=found, now=during) is None
