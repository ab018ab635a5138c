"""Requests that must be refused at the model, each with a message naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from api.identity import CheckpointIdentity
from api.workload import LocalWorkload
from workflows.contracts import CaptureRequest, RestoreRequest

CKPT = "96429b2725761a09"
IDENTITY = CheckpointIdentity(model="m", backend_framework="vllm")


def _capture(**changes: Any) -> CaptureRequest:
    workload = {"name": "w", "command": ["serve"], "cwd": "/"} | changes.pop("workload", {})
    fields = {
        "name": "w",
        "identity": IDENTITY,
        "checkpoint_id": CKPT,
        "workload": LocalWorkload.model_validate(workload),
    }
    return CaptureRequest.model_validate(fields | changes)


def _restore(**changes: Any) -> RestoreRequest:
    return RestoreRequest.model_validate({"name": "w", "checkpoint_id": CKPT} | changes)


@pytest.mark.parametrize(
    ("ready_timeout", "message"),
    [
        (float("inf"), "finite number"),
        (float("nan"), "finite number"),
        (0, "greater than 0"),
        (-1, "greater than 0"),
        (1e300, "less than or equal to 86400"),
    ],
)
def test_readiness_budget_is_finite_and_bounded(ready_timeout: float, message: str) -> None:
    with pytest.raises(ValidationError, match=f"ready_timeout_seconds\n.*{message}"):
        LocalWorkload(name="w", command=("serve",), cwd="/", ready_timeout_seconds=ready_timeout)


@pytest.mark.parametrize(
    ("build", "field", "value", "message"),
    [
        (_restore, "answer_timeout_seconds", 1e300, "less than or equal to 3600"),
        (_restore, "answer_timeout_seconds", float("inf"), "finite number"),
        (_capture, "node_timeout_seconds", float("inf"), "finite number"),
        (_capture, "node_timeout_seconds", 0, "greater than 0"),
        (_capture, "name", "../etc", "must match"),
        (_capture, "namespace", "a b", "must match"),
        (_capture, "node", "gpu/1", "must match"),
        (_restore, "name", "..", "must match"),
        (_restore, "node", "", "must match"),
        (_restore, "version", "../../x", "should match pattern"),
        (_restore, "checkpoint_id", "../../../etc", "should match pattern"),
    ],
)
def test_requests_refuse_by_field(build: Any, field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=f"{field}\n.*{message}"):
        build(**{field: value})


def test_sane_requests_pass() -> None:
    assert _capture(node_timeout_seconds=30).node_timeout_seconds == 30
    assert _restore(answer_timeout_seconds=3600, version="20261124T000000Z-abcdef").version
