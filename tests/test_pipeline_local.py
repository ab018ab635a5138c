"""The local pipeline end to end: real dev server, real workers, real CRIU, real processes."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
from pathlib import Path

import pytest
from temporalio.client import Client

from activities.host.layout import LaunchRecord, NodeLayout
from activities.host.processes import is_alive, terminate
from activities.local.process import http_ok
from activities.local.state import read_status
from activities.storage.catalog import LocalCatalog
from activities.storage.quarantine import Quarantine
from activities.storage.store import CheckpointStore
from api.errors import PipelineFailedError
from api.identity import checkpoint_id
from api.manifest import Manifest
from api.quarantine import QuarantinePolicy
from api.reasons import Phase, Reason
from api.workload import Readiness
from tests.conftest import needs_criu
from tests.pipeline import (
    capture,
    capture_request,
    get_json,
    restore,
    sample_workload,
    shell_workload,
)
from workers.operations import follow, start_capture
from workers.ports import free_port
from workers.settings import Settings

pytestmark = needs_criu
PROGRAMS = Path(__file__).parent / "programs"


async def test_round_trip_carries_process_state(client: Client, workers: Settings) -> None:
    port = free_port()
    request = capture_request(workers, sample_workload("roundtrip", port))
    result = await capture(client, request)

    store = CheckpointStore(workers.checkpoint_root)
    version_dir = store.find(result.checkpoint_id)
    manifest = store.verify(version_dir, checkpoint_id=result.checkpoint_id)
    assert manifest.version == result.version
    assert any(f.path.startswith("criu/pages-") for f in manifest.files)
    assert not list((version_dir.parent / "tmp").iterdir())
    for path in [workers.checkpoint_root, *workers.checkpoint_root.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o700 if path.is_dir() else 0o600), f"{path}: {oct(mode)}"
    log = (version_dir / "workload-output.log").read_text()
    instance = re.search(r"instance ([0-9a-f]{32})", log)
    assert instance, log

    restored = await restore(client, workers, "roundtrip", result.checkpoint_id)
    try:
        info = get_json(f"http://127.0.0.1:{port}/info")
        # Memory state chosen at random by the captured process came back.
        assert info["instance_id"] == instance.group(1)
        assert info["restored"] is True
        assert set(restored.stage_seconds) == {"verify", "prepare", "criu-restore", "await-answer"}
    finally:
        assert await terminate(restored.pid, grace_seconds=5)
    status = read_status(workers.home, "capture", "local", "roundtrip")
    assert status is not None and status.phase == Phase.READY
    assert status.checkpoint_id == result.checkpoint_id


async def test_probe_readiness_for_programs_without_sentinels(
    client: Client, workers: Settings
) -> None:
    port = free_port()
    script = f"exec python3 {PROGRAMS}/token_server.py {port}"
    workload = shell_workload(
        "probe", script, readiness=Readiness(kind="http", http_url=f"http://127.0.0.1:{port}/")
    )
    result = await capture(client, capture_request(workers, workload))
    version_dir = CheckpointStore(workers.checkpoint_root).find(result.checkpoint_id)
    token = (version_dir / "workload-output.log").read_text().split()[1]
    restored = await restore(client, workers, "probe", result.checkpoint_id)
    try:
        answer = await asyncio.to_thread(_http_text, f"http://127.0.0.1:{port}/")
        assert answer == token
    finally:
        await terminate(restored.pid, grace_seconds=1)


def _http_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


async def test_workload_exiting_before_ready_fails_with_status_and_output(
    client: Client, workers: Settings
) -> None:
    workload = shell_workload("early-exit", "echo loading weights; echo out of memory >&2; exit 3")
    request = capture_request(workers, workload)
    with pytest.raises(PipelineFailedError) as err:
        await capture(client, request)
    cause = err.value
    assert cause.reason == Reason.WORKLOAD_EXITED
    assert "exited with status 3" in cause.message
    assert "out of memory" in cause.message
    status = read_status(workers.home, "capture", "local", "early-exit")
    assert status is not None and status.phase == Phase.FAILED
    assert status.reason == "WorkloadExited"
    assert LocalCatalog(workers.checkpoint_root).checkpoints() == []


async def test_dump_failure_reports_dump_log_and_leaves_nothing(
    client: Client, workers: Settings
) -> None:
    # An established TCP connection to a peer outside the dumped tree cannot be dumped
    # without --tcp-established: a real CRIU failure.
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    script = f"exec python3 {PROGRAMS}/tcp_client.py {port}"
    request = capture_request(workers, shell_workload("dump-fails", script))
    try:
        with pytest.raises(PipelineFailedError) as err:
            await capture(client, request)
    finally:
        server.close()
    cause = err.value
    assert cause.reason == Reason.DUMP_FAILED
    assert "dump.log" in cause.message
    assert re.search(r"Error|tcp|socket", cause.message, re.IGNORECASE)
    versions = workers.checkpoint_root / request.checkpoint_id / "versions"
    assert not [p for p in versions.rglob("*") if p.is_file()]
    assert LocalCatalog(workers.checkpoint_root).checkpoints() == []
    status = read_status(workers.home, "capture", "local", "dump-fails")
    assert status is not None and status.phase == Phase.FAILED


@pytest.mark.parametrize("damage", ["missing", "truncated", "altered"])
async def test_restore_refuses_damaged_checkpoint(
    client: Client, workers: Settings, damage: str
) -> None:
    port = free_port()
    request = capture_request(workers, sample_workload(f"damaged-{damage}", port))
    result = await capture(client, request)
    version_dir = CheckpointStore(workers.checkpoint_root).find(result.checkpoint_id)
    victim = sorted((version_dir / "criu").glob("pages-*.img"))[0]
    if damage == "missing":
        victim.unlink()
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-4096])
    else:
        data = bytearray(victim.read_bytes())
        data[100] ^= 0xFF
        victim.write_bytes(bytes(data))
    with pytest.raises(PipelineFailedError) as err:
        await restore(client, workers, request.name, result.checkpoint_id)
    cause = err.value
    assert cause.reason == Reason.DIGEST_MISMATCH
    assert f"criu/{victim.name}" in cause.message
    control = Path(json.loads((version_dir / "manifest.json").read_text())["source"]["control_dir"])
    assert not (control / "restore-complete").exists()
    assert "DigestMismatch" in (control / "restore-failed").read_text()  # standby starts cold
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    status = read_status(workers.home, "restore", "local", request.name)
    assert status is not None and status.phase == Phase.FELL_BACK


async def test_restore_of_unknown_checkpoint_is_a_clear_error(
    client: Client, workers: Settings
) -> None:
    with pytest.raises(PipelineFailedError) as err:
        await restore(client, workers, "ghost", "0123456789abcdef")
    cause = err.value
    assert cause.reason == Reason.CHECKPOINT_NOT_FOUND
    assert "0123456789abcdef" in cause.message


async def test_capture_requested_twice_runs_one_workflow(client: Client, workers: Settings) -> None:
    port = free_port()
    request = capture_request(workers, sample_workload("twice", port))
    first, second = await asyncio.gather(
        start_capture(client, request), start_capture(client, request)
    )
    assert first.id == second.id
    assert first.result_run_id == second.result_run_id
    result = await first.result()
    assert len(CheckpointStore(workers.checkpoint_root).versions(result.checkpoint_id)) == 1


async def test_cancel_while_awaiting_readiness_stops_the_workload(
    client: Client, workers: Settings
) -> None:
    request = capture_request(workers, shell_workload("never-ready", "exec sleep 600"))
    handle = await start_capture(client, request)
    record = NodeLayout(workers.home).workload("never-ready", request.checkpoint_id).launch_record
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not record.is_file():  # launched: the workflow now awaits readiness
        assert loop.time() < deadline, "the workload was never launched"
        await asyncio.sleep(0.05)
    pid = LaunchRecord.model_validate_json(record.read_bytes()).pid
    await handle.cancel()
    with pytest.raises(PipelineFailedError) as err:
        await follow(client, handle, lambda _p: None, every=0.2)
    assert err.value.reason == Reason.CANCELLED
    assert not is_alive(pid)  # cleanup ran on cancel
    status = read_status(workers.home, "capture", "local", "never-ready")
    assert status is not None and (status.phase, status.reason) == (Phase.FAILED, "Cancelled")
    assert LocalCatalog(workers.checkpoint_root).checkpoints() == []


async def test_two_captures_of_one_name_with_different_identities_both_restore(
    client: Client, workers: Settings
) -> None:
    """Workload state is keyed by name and checkpoint ID: captures of one name for two
    identities at once keep their own control directory, output and launch record."""
    ports = free_port(), free_port()
    requests = []
    for model, port in zip(("small", "large"), ports, strict=True):
        request = capture_request(workers, sample_workload("twin", port))
        identity = request.identity.model_copy(update={"model": f"test/{model}"})
        requests.append(request.model_copy(update={"identity": identity}))
    requests = [r.model_copy(update={"checkpoint_id": checkpoint_id(r.identity)}) for r in requests]
    results = await asyncio.gather(*(capture(client, r) for r in requests))
    assert len({r.checkpoint_id for r in results}) == 2

    store = CheckpointStore(workers.checkpoint_root)
    for result, port in zip(results, ports, strict=True):
        log = (store.find(result.checkpoint_id) / "workload-output.log").read_text()
        instance = re.search(r"instance ([0-9a-f]{32})", log)
        assert instance and f"/twin/{result.checkpoint_id}/control" in log, log
        restored = await restore(client, workers, "twin", result.checkpoint_id)
        try:
            info = get_json(f"http://127.0.0.1:{port}/info")
            assert info["instance_id"] == instance.group(1) and info["restored"] is True
        finally:
            assert await terminate(restored.pid, grace_seconds=5)


async def test_leave_running_keeps_serving_and_the_checkpoint_restores(
    client: Client, workers: Settings
) -> None:
    """`--leave-running`: the workload answers through and after the capture; it writes
    to its output all the time, after the dump too, and the checkpoint still restores."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    chatty = (
        "import http.server, sys, threading, time\n"
        "def chatter():\n"
        "    while True:\n"
        "        print('still serving', flush=True)\n"
        "        time.sleep(0.002)\n"
        "threading.Thread(target=chatter, daemon=True).start()\n"
        f"http.server.test(http.server.SimpleHTTPRequestHandler, port={port}, bind='127.0.0.1')\n"
    )
    script = f'exec {sys.executable} -c "{chatty}"'
    workload = shell_workload(
        "keeps-serving", script, readiness=Readiness(kind="http", http_url=url)
    )
    request = capture_request(workers, workload, leave_running=True)
    result = await capture(client, request)

    record = NodeLayout(workers.home).read_launch("keeps-serving", result.checkpoint_id)
    assert is_alive(record.pid), "the workload was stopped"
    for _ in range(3):  # it answers after the capture
        assert await asyncio.to_thread(http_ok, url)
    assert await terminate(record.pid, grace_seconds=5)

    restored = await restore(client, workers, "keeps-serving", result.checkpoint_id)
    try:
        assert await asyncio.to_thread(http_ok, url)
    finally:
        assert await terminate(restored.pid, grace_seconds=5)


async def test_a_restore_failing_here_falls_back_then_is_quarantined_until_cleared(
    client: Client, workers: Settings
) -> None:
    port = free_port()
    script = f"exec python3 {PROGRAMS}/token_server.py {port}"
    workload = shell_workload(
        "quarantined",
        script,
        readiness=Readiness(kind="http", http_url=f"http://127.0.0.1:{port}/"),
    )
    result = await capture(client, capture_request(workers, workload))
    version_dir = CheckpointStore(workers.checkpoint_root).find(result.checkpoint_id)
    control = Path(json.loads((version_dir / "manifest.json").read_text())["source"]["control_dir"])

    # Local mode has one node: its own failure quarantines (on a cluster, two nodes'
    # failures do; tests/test_cluster_restore.py).
    manifest = Manifest.model_validate_json((version_dir / "manifest.json").read_bytes())
    quarantine = Quarantine(workers.checkpoint_root, policy=QuarantinePolicy(min_nodes=1))
    assert quarantine.entries(result.checkpoint_id) == []

    # Another process holds the port: CRIU cannot rebind the listening socket.
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    with squatter, pytest.raises(PipelineFailedError) as failed:
        await restore(client, workers, "quarantined", result.checkpoint_id)
    assert failed.value.reason == Reason.RESTORE_FAILED
    assert "RestoreFailed" in (control / "restore-failed").read_text()  # the standby's signal
    [entry] = quarantine.entries(result.checkpoint_id)  # this node, the only one: quarantined
    assert (entry.reason, entry.nodes) == ("RestoreFailed", (workers.node.name,))

    # The port is free again, but this node class is quarantined: cold start at once.
    with pytest.raises(PipelineFailedError) as refused:
        await restore(client, workers, "quarantined", result.checkpoint_id)
    assert refused.value.reason == Reason.QUARANTINED
    assert f"version {manifest.version} is quarantined on node class [no GPU, CRIU" in (
        refused.value.message
    )
    status = read_status(workers.home, "restore", "local", "quarantined")
    assert status is not None and status.phase == Phase.FELL_BACK

    assert len(quarantine.clear(result.checkpoint_id)) == 1
    restored = await restore(client, workers, "quarantined", result.checkpoint_id)
    try:
        token = (version_dir / "workload-output.log").read_text().split()[1]
        assert await asyncio.to_thread(_http_text, f"http://127.0.0.1:{port}/") == token
    finally:
        await terminate(restored.pid, grace_seconds=1)
