"""Metrics scraped over HTTP from this process's Prometheus endpoint after real pipelines:
real dev server, real workers, real CRIU, a real S3-protocol server."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sys
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from temporalio.client import Client

from activities.host.processes import terminate
from activities.storage.store import CheckpointStore
from api.errors import PipelineFailedError
from api.naming import RESTORE_WORKFLOW
from api.reasons import Reason
from api.workload import Readiness
from tests.conftest import needs_criu
from tests.pipeline import capture, capture_request, restore, sample_workload, shell_workload
from tests.s3server import ACCESS_KEY, REGION, SECRET_KEY, new_bucket, s3_client
from workers.compose import control_worker, node_worker
from workers.metrics import configure_metrics, watching_backlog
from workers.operations import remote_storage
from workers.ports import free_port
from workers.settings import Settings, StorageSettings, TelemetrySettings
from workflows.contracts import RestoreRequest

PROGRAMS = Path(__file__).parents[1] / "programs"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def endpoint() -> str:
    """This process's metrics endpoint (the meter provider is installed once per process)."""
    port = free_port()
    telemetry = TelemetrySettings(
        metrics="prometheus", prometheus_host="127.0.0.1", prometheus_port=port
    )
    assert configure_metrics(telemetry) is not None
    return f"http://127.0.0.1:{port}/metrics"


@pytest.fixture
def telemetry(endpoint: str) -> TelemetrySettings:
    port = int(endpoint.rsplit(":", 1)[1].split("/")[0])
    return TelemetrySettings(metrics="prometheus", prometheus_port=port)


def scrape(endpoint: str) -> Samples:
    with urllib.request.urlopen(endpoint, timeout=5) as response:
        text = response.read().decode()
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s series whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, held), v in samples.items() if n == name and wanted <= held)


def grown(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


@pytest.fixture
def s3_metrics_settings(
    settings: Settings,
    telemetry: TelemetrySettings,
    s3_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Settings:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    storage = StorageSettings(
        s3_bucket=new_bucket(s3_client(s3_endpoint)),
        s3_prefix="metrics",
        s3_endpoint=s3_endpoint,
        s3_region=REGION,
        part_size_mib=5,
        concurrency=4,
    )
    return replace(settings, storage=storage, telemetry=telemetry)


def _workers(client: Client, settings: Settings) -> Any:
    env = {"PATH": "/usr/bin:/bin"}
    return control_worker(client, settings), node_worker(client, settings, base_env=env)


@needs_criu
async def test_a_capture_and_restores_through_s3_show_on_the_endpoint(
    client: Client, s3_metrics_settings: Settings, endpoint: str
) -> None:
    settings = s3_metrics_settings
    before = scrape(endpoint)
    control, node = _workers(client, settings)
    async with control, node:
        port = free_port()
        result = await capture(client, capture_request(settings, sample_workload("metered", port)))
        ckpt = result.checkpoint_id
        shutil.rmtree(CheckpointStore(settings.checkpoint_root).checkpoint_dir(ckpt))
        storage = remote_storage(settings)
        fetched = await restore(client, settings, "metered", ckpt, storage=storage)
        assert await terminate(fetched.pid, grace_seconds=5)
        cached = await restore(client, settings, "metered", ckpt, storage=storage)
        assert await terminate(cached.pid, grace_seconds=5)
        with pytest.raises(PipelineFailedError) as missing:
            await restore(client, settings, "metered", "0" * 16)
        assert missing.value.reason == Reason.CHECKPOINT_NOT_FOUND
    after = scrape(endpoint)

    # Steps timed, by step and outcome, on both workers.
    for step in ("claim_checkpoint_id", "dump_checkpoint", "upload_version", "publish_status"):
        assert (
            grown(
                before,
                after,
                "warmstart_step_duration_seconds_count",
                warmstart_step=step,
                warmstart_outcome="ok",
            )
            >= 1
        ), step
    assert (
        grown(
            before, after, "warmstart_step_duration_seconds_sum", warmstart_step="dump_checkpoint"
        )
        > 0
    )
    assert (
        grown(
            before,
            after,
            "warmstart_step_duration_seconds_count",
            warmstart_step="restore_checkpoint",
            warmstart_outcome="ok",
        )
        == 2
    )
    assert (
        grown(
            before,
            after,
            "warmstart_step_duration_seconds_count",
            warmstart_step="restore_checkpoint",
            warmstart_outcome="failed",
            warmstart_reason="CheckpointNotFound",
        )
        == 1
    )
    assert total(after, "warmstart_step_active", warmstart_step="restore_checkpoint") == 0
    # Stages inside the restore step: a fetch only for the first.
    assert (
        grown(
            before, after, "warmstart_restore_stage_duration_seconds_count", warmstart_stage="fetch"
        )
        == 1
    )
    assert (
        grown(
            before,
            after,
            "warmstart_restore_stage_duration_seconds_count",
            warmstart_stage="criu-restore",
        )
        == 2
    )
    # Pipelines by outcome and reason.
    assert (
        grown(
            before,
            after,
            "warmstart_captures_total",
            warmstart_outcome="ready",
            warmstart_reason="Captured",
        )
        == 1
    )
    assert grown(before, after, "warmstart_capture_duration_seconds_sum") > 0
    assert (
        grown(
            before,
            after,
            "warmstart_restores_total",
            warmstart_outcome="restored",
            warmstart_reason="Restored",
        )
        == 2
    )
    assert (
        grown(
            before,
            after,
            "warmstart_restores_total",
            warmstart_outcome="fell_back",
            warmstart_reason="CheckpointNotFound",
        )
        == 1
    )
    assert grown(before, after, "warmstart_restore_duration_seconds_count") == 3
    assert grown(before, after, "warmstart_restore_duration_seconds_sum") > 0
    # Bytes up and down (on the wire: zstd shrinks them; the same objects each way), and
    # each transfer's rate.
    up, down = (
        grown(before, after, "warmstart_transfer_bytes_total", warmstart_transfer_direction=d)
        for d in ("upload", "download")
    )
    assert up > 0 and down == up, (up, down)
    for direction in ("upload", "download"):
        assert (
            grown(
                before,
                after,
                "warmstart_transfer_rate_bytes_per_second_count",
                warmstart_transfer_direction=direction,
            )
            == 1
        )
    size = sum(f["size"] for f in _manifest(settings, ckpt)["files"])
    # The node cache: one miss (fetched), one hit, and what it holds.
    assert grown(before, after, "warmstart_cache_lookups_total", warmstart_cache_result="miss") == 1
    assert grown(before, after, "warmstart_cache_lookups_total", warmstart_cache_result="hit") == 1
    assert total(after, "warmstart_cache_usage_bytes") >= size


def _manifest(settings: Settings, ckpt: str) -> Any:
    [path] = (settings.home / "cache" / "checkpoints").glob(f"*/{ckpt}/versions/*/manifest.json")
    return json.loads(path.read_text())


@needs_criu
async def test_a_failed_restore_quarantines_and_the_next_is_refused(
    client: Client, settings: Settings, telemetry: TelemetrySettings, endpoint: str
) -> None:
    settings = replace(settings, telemetry=telemetry)
    port = free_port()
    workload = shell_workload(
        "metered-q",
        f"exec python3 {PROGRAMS}/token_server.py {port}",
        readiness=Readiness(kind="http", http_url=f"http://127.0.0.1:{port}/"),
    )
    before = scrape(endpoint)
    control, node = _workers(client, settings)
    async with control, node:
        result = await capture(client, capture_request(settings, workload))
        squatter = socket.socket()  # CRIU cannot rebind the listening socket: it fails
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with squatter, pytest.raises(PipelineFailedError) as failed:
            await restore(client, settings, "metered-q", result.checkpoint_id)
        assert failed.value.reason == Reason.RESTORE_FAILED
        with pytest.raises(PipelineFailedError) as refused:
            await restore(client, settings, "metered-q", result.checkpoint_id)
        assert refused.value.reason == Reason.QUARANTINED
    after = scrape(endpoint)

    assert (
        grown(
            before,
            after,
            "warmstart_quarantine_entries_total",
            warmstart_reason="RestoreFailed",
            warmstart_quarantine_state="active",
        )
        == 1
    )
    assert (
        grown(
            before,
            after,
            "warmstart_restores_total",
            warmstart_outcome="fell_back",
            warmstart_reason="RestoreFailed",
        )
        == 1
    )
    assert (
        grown(
            before,
            after,
            "warmstart_restores_total",
            warmstart_outcome="refused",
            warmstart_reason="Quarantined",
        )
        == 1
    )


async def test_the_backlog_of_a_queue_nobody_serves_is_reported(
    client: Client, settings: Settings, endpoint: str
) -> None:
    queue = f"unserved-{uuid.uuid4().hex[:8]}"
    request = RestoreRequest(
        name="nobody",
        checkpoint_id="0" * 16,
        node=settings.node.name,
        control_task_queue=settings.node.control_task_queue,
    )
    handle = await client.start_workflow(
        RESTORE_WORKFLOW, request, id=f"backlog-{queue}", task_queue=queue
    )
    labels = {"temporal_task_queue": queue, "temporal_task_queue_kind": "workflow"}
    try:
        async with watching_backlog(client, [queue], every_seconds=0.2):
            for _ in range(100):
                waiting = total(scrape(endpoint), "warmstart_queue_backlog", **labels)
                if waiting == 1:
                    break
                await asyncio.sleep(0.1)
        assert waiting == 1
        assert (
            total(
                scrape(endpoint),
                "warmstart_queue_backlog",
                temporal_task_queue=queue,
                temporal_task_queue_kind="activity",
            )
            == 0
        )
    finally:
        await handle.terminate("test over")


async def test_warmstart_worker_serves_its_queues_backlog_until_stopped(
    client: Client, settings: Settings, tmp_path: Path
) -> None:
    """The process as deployed: `warmstart worker` with metrics on opens the endpoint,
    reports the backlog of the queue it serves, and closes it on SIGTERM."""
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "WARMSTART_HOME": str(tmp_path / "home"),
        "WARMSTART_TEMPORAL__ADDRESS": client.service_client.config.target_host,
        "WARMSTART_NODE__CONTROL_TASK_QUEUE": settings.node.control_task_queue,
        "WARMSTART_TELEMETRY__METRICS": "prometheus",
        "WARMSTART_TELEMETRY__PROMETHEUS_HOST": "127.0.0.1",
        "WARMSTART_TELEMETRY__PROMETHEUS_PORT": str(port),
        "WARMSTART_TELEMETRY__BACKLOG_EVERY_SECONDS": "0.2",
    }
    warmstart = str(Path(sys.executable).parent / "warmstart")
    proc = await asyncio.create_subprocess_exec(
        warmstart,
        "worker",
        "--role",
        "control",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    labels = {"temporal_task_queue": settings.node.control_task_queue}
    try:
        found: Samples = {}
        for _ in range(150):
            try:
                found = await asyncio.to_thread(scrape, url)
            except OSError:
                found = {}
            if any(
                n == "warmstart_queue_backlog" and set(labels.items()) <= held for n, held in found
            ):
                break
            await asyncio.sleep(0.1)
        kinds = {
            dict(held)["temporal_task_queue_kind"]
            for n, held in found
            if n == "warmstart_queue_backlog" and set(labels.items()) <= held
        }
        assert kinds == {"workflow", "activity"}, found.keys()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()[-2000:]
    with pytest.raises(OSError):
        scrape(url)
