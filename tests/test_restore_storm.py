"""A restore storm on one node (issue 24, point 2; decision 0040): many restores of one
checkpoint that only the bucket holds, at once. Real dev server, workers, CRIU and an
S3-protocol server in a process of its own, which records what it serves: the node
downloads the version once, never has more restores in CRIU than its setting allows, and
every restored copy answers."""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from activities.host.processes import is_alive, terminate
from api.identity import CheckpointIdentity
from api.workload import LocalWorkload, Readiness
from tests.conftest import needs_criu
from tests.pipeline import REPO, capture, listening_pids, restore
from tests.s3server import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    new_bucket,
    recorded_reads,
    s3_client,
    s3_process,
    start_recording,
)
from workers.compose import control_worker, node_worker
from workers.operations import local_capture_request, remote_storage
from workers.ports import free_port
from workers.settings import CriuSettings, Settings, StorageSettings

PROGRAM = REPO / "tests" / "programs" / "storm_server.py"
RESTORES = 6
CAP = 2


@pytest.fixture
def s3_endpoint_process(tmp_path: Path) -> Iterator[str]:
    with s3_process(tmp_path) as endpoint:
        yield endpoint


@needs_criu
async def test_a_storm_downloads_once_bounds_criu_and_every_copy_answers(
    client: Client,
    settings: Settings,
    s3_endpoint_process: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint = s3_endpoint_process
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    bucket = new_bucket(s3_client(endpoint))
    settings = replace(
        settings,
        criu=CriuSettings(max_concurrent_restores=CAP),
        storage=StorageSettings(
            s3_bucket=bucket, s3_endpoint=endpoint, s3_region=REGION, part_size_mib=5
        ),
    )
    port = free_port()
    workload = LocalWorkload(
        name="storm",
        command=(sys.executable, str(PROGRAM), str(port), "20"),
        cwd=str(REPO),
        readiness=Readiness(kind="http", http_url=f"http://127.0.0.1:{port}/"),
        ready_timeout_seconds=60,
    )
    identity = CheckpointIdentity(model="test/storm", backend_framework="vllm")
    pids: list[int] = []
    env = {"PATH": "/usr/bin:/bin"}
    async with control_worker(client, settings), node_worker(client, settings, base_env=env):
        captured = await capture(client, local_capture_request(settings, workload, identity))
        ckpt = captured.checkpoint_id
        shutil.rmtree(settings.checkpoint_root / ckpt)  # only the bucket holds it now
        start_recording(endpoint)
        storage = remote_storage(settings)
        try:
            results = await asyncio.gather(
                *(
                    restore(client, settings, f"storm-{i}", ckpt, storage=storage)
                    for i in range(RESTORES)
                ),
                return_exceptions=True,
            )
            pids = [r.pid for r in results if not isinstance(r, BaseException)]
            failed = [r for r in results if isinstance(r, BaseException)]
            assert not failed, failed
            assert len(set(pids)) == RESTORES
            # Each copy is alive and holds its own restored listener on the port.
            assert all(is_alive(pid) for pid in pids)
            assert set(pids) <= listening_pids(port)
            in_criu = [r.criu_running for r in results if not isinstance(r, BaseException)]
            assert 1 <= max(in_criu) <= CAP, in_criu
            queued = [r for r in results if not isinstance(r, BaseException)]
            for r in queued:
                assert "criu-restore" in r.stage_seconds and "await-answer" in r.stage_seconds
        finally:
            for pid in pids:
                await terminate(pid, grace_seconds=2)
    # The server sent every object of the version once in all: one download.
    reads = recorded_reads(endpoint, bucket)
    objects = s3_client(endpoint).list_objects_v2(
        Bucket=bucket, Prefix=f"{ckpt}/versions/{captured.version}/"
    )["Contents"]
    sizes: dict[str, Any] = {o["Key"]: o["Size"] for o in objects}
    files = {k: n for k, n in sizes.items() if not k.endswith("/manifest.json")}
    assert files and {k: reads.bytes.get(k, 0) for k in files} == files
    cached = list((settings.home / "cache" / "checkpoints").glob(f"*/{ckpt}/versions/*"))
    assert [p.name for p in cached if p.name != "tmp"] == [captured.version]
