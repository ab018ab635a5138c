"""What a node worker serves: on a cluster node nothing runs a command a workflow names or
dumps a PID a request gives; in local mode a workload takes as secrets only the worker
variables the operator offers, never the worker's own credentials."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from temporalio.client import Client

from api.errors import PipelineFailedError
from api.reasons import Reason
from api.workload import SecretRef
from tests.conftest import needs_criu
from tests.pipeline import capture, capture_request, shell_workload
from workers.compose import control_worker, node_worker
from workers.settings import Settings

pytestmark = [needs_criu, pytest.mark.timeout(60)]
BASE_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


async def test_a_cluster_node_runs_no_command_a_workflow_names(
    client: Client, settings: Settings, tmp_path: Path
) -> None:
    cluster = dataclasses.replace(
        settings,
        node=dataclasses.replace(
            settings.node, cluster=True, runtime_endpoint=str(tmp_path / "containerd.sock")
        ),
    )
    marker = tmp_path / "ran-on-the-node"
    workload = shell_workload("escape", f"touch {marker}; exec sleep 60")
    request = capture_request(settings, workload).model_copy(update={"node_timeout_seconds": 2})
    async with control_worker(client, settings), node_worker(client, cluster, base_env=BASE_ENV):
        with pytest.raises(PipelineFailedError) as failed:
            await capture(client, request)
    # The node's worker has no launch step: the capture fails at once, nothing ran.
    assert "NotFoundError: Activity function launch_workload" in failed.value.message
    assert not marker.exists()


async def test_a_workload_takes_only_the_variables_the_worker_offers(
    client: Client, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OFFERED_TOKEN", "hf_offered")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-worker-credential")
    offering = dataclasses.replace(
        settings, node=dataclasses.replace(settings.node, secret_env="OFFERED_TOKEN")
    )
    seen = tmp_path / "seen"
    script = f'echo "$T" > {seen}; echo ready > $SNAPSHOT_CONTROL_DIR/ready-for-snapshot; sleep 60'
    takes = shell_workload("offered", script).model_copy(
        update={"secret_env": {"T": SecretRef(env="OFFERED_TOKEN")}}
    )
    steals = shell_workload("steals", script).model_copy(
        update={"secret_env": {"T": SecretRef(env="AWS_SECRET_ACCESS_KEY")}}
    )
    async with (
        control_worker(client, offering),
        node_worker(client, offering, base_env=BASE_ENV),
    ):
        await capture(client, capture_request(offering, takes))
        assert seen.read_text() == "hf_offered\n"
        seen.unlink()
        with pytest.raises(PipelineFailedError) as failed:
            await capture(client, capture_request(offering, steals))
    assert failed.value.reason == Reason.INVALID_SPEC
    assert "offers no variable AWS_SECRET_ACCESS_KEY" in failed.value.message
    assert "WARMSTART_NODE__SECRET_ENV" in failed.value.message
    assert not seen.exists()  # never launched
