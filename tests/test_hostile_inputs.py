"""Hostile input, table by table: request models, manifests and node paths are refused
with a message naming the field (the CLI's table is in tests/workers/test_cli.py, the
crafted-manifest restore in tests/activities/test_restore_activities.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from activities.host.layout import NodeLayout
from activities.local.process import confined
from activities.storage.store import CheckpointStore
from api.errors import InvalidSpecError
from api.identity import CheckpointIdentity
from api.manifest import Manifest
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


def _manifest(**changes: Any) -> Manifest:
    digest = {"path": "criu/pages-1.img", "size": 1, "sha256": "0" * 64}
    fields = {
        "checkpoint_id": CKPT,
        "version": "20261124T000000Z-abcdef",
        "identity": IDENTITY,
        "created_at": "2026-11-24T00:00:00Z",
        "source": {"node": "n", "namespace": "local", "name": "w"},
        "criu": {"version": "4.2"},
        "host": {"kernel": "6.1", "arch": "x86_64"},
        "files": [digest | changes.pop("file", {})],
    }
    return Manifest.model_validate(fields | changes)


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"file": {"path": "../../etc/shadow"}}, "files.0.path", "must stay inside the version"),
        ({"file": {"path": "/etc/shadow"}}, "files.0.path", "must stay inside the version"),
        ({"file": {"path": "criu/../../x"}}, "files.0.path", "must stay inside the version"),
        ({"file": {"path": ""}}, "files.0.path", "must stay inside the version"),
        ({"file": {"size": -1}}, "files.0.size", "greater than or equal to 0"),
        ({"file": {"sha256": "not-a-digest"}}, "files.0.sha256", "should match pattern"),
        ({"version": "../other"}, "version", "must match"),
        ({"version": "tmp/.."}, "version", "must match"),
        ({"checkpoint_id": "../0123456789"}, "checkpoint_id", "should match pattern"),
    ],
)
def test_manifests_refuse_by_field(changes: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ValidationError, match=f"{field}\n.*{message}"):
        _manifest(**changes)


def test_a_sane_manifest_passes() -> None:
    assert _manifest().files[0].path == "criu/pages-1.img"


LAYOUT = NodeLayout(Path("/var/lib/warmstart"))
STORE = CheckpointStore(Path("/var/lib/warmstart/checkpoints"))


@pytest.mark.parametrize(
    ("make_path", "message"),
    [
        (lambda: LAYOUT.workload("..", CKPT), "workload name '..'"),
        (lambda: LAYOUT.workload("w", "../x"), "checkpoint ID '../x'"),
        (lambda: LAYOUT.restore_work_dir("../../tmp"), "name '../../tmp'"),
        (lambda: STORE.checkpoint_dir("."), "checkpoint ID '.'"),
        (lambda: STORE.version_dir(CKPT, "../../x"), "version '../../x'"),
        # What `discard_staging` receives: it must not reach the versions directory itself.
        (lambda: STORE.staging_dir(CKPT, ".."), "version '..'"),
        (lambda: STORE.staging_dir(f"{CKPT}/versions/tmp/..", "v"), "checkpoint ID"),
        (
            lambda: confined(
                "/etc/cron.d/x", Path("/var/lib/warmstart/workloads"), what="log_path"
            ),
            "manifest log_path '/etc/cron.d/x' is outside",
        ),
        (
            lambda: confined(
                "/var/lib/warmstart/workloads/../../../etc",
                Path("/var/lib/warmstart/workloads"),
                what="control_dir",
            ),
            "manifest control_dir",
        ),
    ],
)
def test_node_paths_stay_under_their_roots(make_path: Any, message: str) -> None:
    with pytest.raises(InvalidSpecError, match=re.escape(message)):
        make_path()


def test_paths_under_their_roots_pass() -> None:
    assert LAYOUT.workload("w", CKPT).root == Path(f"/var/lib/warmstart/workloads/w/{CKPT}")
    root = Path("/var/lib/warmstart/workloads")
    assert confined(f"{root}/w/{CKPT}/output.log", root, what="log_path").name == "output.log"
