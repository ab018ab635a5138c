"""Workflow inputs: a capture's mode is its source's type, and inputs recorded in older
shapes (histories of runs in flight during an upgrade) still decode to the same meaning."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from activities.contracts import ContainerTarget
from api.identity import CheckpointIdentity, checkpoint_id
from api.workload import LocalWorkload, Readiness
from workflows.contracts import (
    CaptureRequest,
    ClusterCapture,
    LocalCapture,
    RestoreRequest,
)

IDENTITY = CheckpointIdentity(model="m/contracts", backend_framework="vllm")
CKPT = checkpoint_id(IDENTITY)
WORKLOAD = LocalWorkload(
    name="llama", command=("python3", "-c", "pass"), cwd="/", readiness=Readiness(kind="sentinel")
)
REF = {"kind": "PodSnapshot", "namespace": "inference", "name": "llama", "uid": "uid-1"}
TARGET = {"container": "main", "pod_name": "llama-0", "pod_uid": "pod-1"}


def test_a_capture_recorded_with_mode_fields_reads_as_its_source() -> None:
    base = {"name": "llama", "identity": IDENTITY.model_dump(), "checkpoint_id": CKPT}
    local = CaptureRequest.model_validate(
        {**base, "workload": WORKLOAD.model_dump(), "leave_running": True}
    )
    assert local.source == LocalCapture(workload=WORKLOAD, leave_running=True)
    assert local.source.keeps_serving and local.resource is None

    cluster = CaptureRequest.model_validate(
        {**base, "node": "", "resource": REF, "cluster": TARGET}
    )
    assert isinstance(cluster.source, ClusterCapture)
    assert cluster.source.target.pod_uid == "pod-1"
    assert cluster.resource is not None and cluster.resource.kind == "PodSnapshot"
    assert cluster.source.keeps_serving  # a PodSnapshot's pod serves on


def test_a_capture_round_trips_through_json_with_its_mode() -> None:
    request = CaptureRequest.local(WORKLOAD, IDENTITY)
    decoded = CaptureRequest.model_validate_json(request.model_dump_json())
    assert decoded == request and isinstance(decoded.source, LocalCapture)
    assert decoded.model_dump()["source"]["mode"] == "local"


def test_a_capture_without_a_source_or_a_local_one_without_node_is_refused() -> None:
    base = {"name": "llama", "identity": IDENTITY.model_dump(), "checkpoint_id": CKPT}
    with pytest.raises(ValidationError, match="source"):
        CaptureRequest.model_validate(base)
    with pytest.raises(ValidationError, match="a local capture names its node"):
        CaptureRequest.model_validate(
            {**base, "node": "", "source": {"mode": "local", "workload": WORKLOAD.model_dump()}}
        )


def test_a_pod_restore_has_its_own_deadline_and_old_ones_keep_theirs() -> None:
    pod = ContainerTarget(namespace="inference", pod_name="llama-1", pod_uid="u", container="main")
    base = {"name": "llama-1", "checkpoint_id": CKPT, "pod": pod.model_dump()}
    recorded = RestoreRequest.model_validate({**base, "answer_timeout_seconds": 90})
    assert recorded.deadline_seconds == 90  # as the run recorded it meant
    fresh = RestoreRequest.model_validate({**base, "deadline_seconds": 600})
    assert (fresh.deadline_seconds, fresh.answer_timeout_seconds) == (600, 120)
    local = RestoreRequest.model_validate({"name": "llama", "checkpoint_id": CKPT})
    assert local.deadline_seconds == 1800  # unused without a pod


def test_only_a_refused_pod_restore_names_no_checkpoint() -> None:
    pod = ContainerTarget(namespace="team-b", pod_name="llama-1", pod_uid="u", container="main")
    refused = RestoreRequest.model_validate(
        {
            "name": "llama-1",
            "checkpoint_id": "",
            "pod": pod.model_dump(),
            "refusal": {"reason": "Forbidden", "message": "the pod names no Checkpoint"},
        }
    )
    assert refused.refusal is not None and refused.refusal.reason == "Forbidden"
    with pytest.raises(ValidationError, match="a 16-hex checkpoint ID is needed"):
        RestoreRequest.model_validate({"name": "llama-1", "checkpoint_id": ""})
    with pytest.raises(ValidationError, match="only a pod's restore is refused"):
        RestoreRequest.model_validate(
            {"name": "x", "checkpoint_id": "", "refusal": refused.refusal.model_dump()}
        )


def test_verify_is_refused_where_it_cannot_run() -> None:
    assert CaptureRequest.local(WORKLOAD, IDENTITY, verify=True).verify
    with pytest.raises(ValidationError, match="leaves its workload running cannot be verified"):
        CaptureRequest.local(WORKLOAD, IDENTITY, verify=True, leave_running=True)
    base = {"name": "llama", "identity": IDENTITY.model_dump(), "checkpoint_id": CKPT}
    cluster = {"mode": "cluster", "resource": REF, "target": TARGET}
    # A Checkpoint's capture is verified by a verification pod (decision 0045); a
    # PodSnapshot's pod keeps serving, so it is not.
    checkpoint = {**cluster, "resource": {**REF, "kind": "Checkpoint"}}
    verified = CaptureRequest.model_validate(
        {**base, "node": "", "source": checkpoint, "verify": True}
    )
    assert verified.verify
    with pytest.raises(ValidationError, match="leaves its workload running cannot be verified"):
        CaptureRequest.model_validate({**base, "node": "", "source": cluster, "verify": True})
