"""Verified captures (decision 0045) end to end: real dev server, real workers, real CRIU, real
processes. A test restore of the new version must answer before the version is offered."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from temporalio.client import Client

from activities.host.layout import NodeLayout
from activities.host.processes import terminate
from activities.local.state import read_status
from activities.storage.catalog import LocalCatalog
from activities.storage.quarantine import Quarantine
from activities.storage.store import CheckpointStore
from api.errors import PipelineFailedError
from api.reasons import Phase, Reason
from api.workload import LocalWorkload, Readiness
from tests.conftest import needs_criu
from tests.pipeline import capture, listening_pids, restore, shell_workload
from workers.operations import LiveProgress, follow, local_capture_request, start_capture
from workers.ports import free_port
from workers.settings import Settings
from workflows.contracts import CaptureRequest

pytestmark = needs_criu
PROGRAMS = Path(__file__).parent / "programs"
NAME = "verified"


def _workload(program: str, port: int) -> LocalWorkload:
    url = f"http://127.0.0.1:{port}/"
    script = f"exec python3 {PROGRAMS}/{program} {port}"
    return shell_workload(NAME, script, readiness=Readiness(kind="http", http_url=url))


def _request(settings: Settings, workload: LocalWorkload, *, answer: float) -> CaptureRequest:
    from api.identity import CheckpointIdentity

    identity = CheckpointIdentity(model=f"test/{NAME}", backend_framework="vllm")
    return local_capture_request(
        settings, workload, identity, verify=True, verify_answer_seconds=answer
    )


def _http_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def _left_behind(settings: Settings, ckpt: str) -> list[str]:
    """What a test restore could leave in the workload's state: its record, lock, restore
    sentinels and context, the links it keeps the capture's files by, and CRIU work
    directories."""
    layout = NodeLayout(settings.home)
    paths = layout.workload(NAME, ckpt)
    found = [
        str(p.relative_to(settings.home))
        for p in (
            paths.restored_record,
            paths.restore_lock,
            paths.root / ".verify-kept",
            paths.control_dir / "restore-complete",
            paths.control_dir / "restore-failed",
            paths.control_dir / "restore-context.json",
        )
        if p.exists()
    ]
    restores = settings.home / "restores"
    found += [str(p.relative_to(settings.home)) for p in restores.rglob("*")]
    return found


async def test_verified_capture_is_ready_after_its_test_restore_answers_and_leaves_nothing(
    client: Client, workers: Settings
) -> None:
    port = free_port()
    request = _request(workers, _workload("token_server.py", port), answer=30)
    result = await capture(client, request)

    assert result.step_seconds["verify"] > 0
    assert list(result.step_seconds)[-2:] == ["verify", "publish"]
    status = read_status(workers.home, "capture", "local", NAME)
    assert status is not None and status.phase == Phase.READY
    # The throwaway process is gone, and so is everything its restore made.
    assert listening_pids(port) == set()
    assert _left_behind(workers, result.checkpoint_id) == []
    store = CheckpointStore(workers.checkpoint_root)
    version_dir = store.find(result.checkpoint_id)
    assert version_dir.name == result.version and not (version_dir / "unverified").exists()
    output = NodeLayout(workers.home).workload(NAME, result.checkpoint_id).output_log
    # The output as the capture left it (the launcher may add a line once its child is gone).
    assert output.read_bytes().startswith((version_dir / "workload-output.log").read_bytes())

    token = (version_dir / "workload-output.log").read_text().split()[1]
    restored = await restore(client, workers, NAME, result.checkpoint_id)
    try:
        assert await asyncio.to_thread(_http_text, f"http://127.0.0.1:{port}/") == token
    finally:
        await terminate(restored.pid, grace_seconds=1)


async def test_a_version_whose_test_restore_cannot_answer_fails_and_is_never_offered(
    client: Client, workers: Settings
) -> None:
    port = free_port()
    # A first verified version, which answers restored.
    good = await capture(client, _request(workers, _workload("token_server.py", port), answer=30))
    store = CheckpointStore(workers.checkpoint_root)
    token = (store.find(good.checkpoint_id) / "workload-output.log").read_text().split()[1]

    # The same checkpoint captured again from a program that answers only as the process it
    # started as: its restored copy is a new process (another start time) and answers 503.
    bad = _request(workers, _workload("process_bound_server.py", port), answer=2)
    with pytest.raises(PipelineFailedError) as err:
        await capture(client, bad)
    failure = err.value
    assert failure.reason == Reason.VERIFY_FAILED
    assert "test restore did not answer" in failure.message
    assert "[RestoreFailed]" in failure.message
    assert f"did not answer http://127.0.0.1:{port}/ within 2 s" in failure.message
    status = read_status(workers.home, "capture", "local", NAME)
    assert status is not None and status.phase == Phase.FAILED
    assert status.reason == "VerifyFailed" and "[RestoreFailed]" in status.message

    # The failed version is gone: only the first is listed, and a restore restores it.
    versions = workers.checkpoint_root / bad.checkpoint_id / "versions"
    assert sorted(p.name for p in versions.iterdir()) == sorted(["tmp", good.version])
    assert [e.version for e in LocalCatalog(workers.checkpoint_root).checkpoints()] == [
        good.version
    ]
    assert listening_pids(port) == set()
    assert _left_behind(workers, bad.checkpoint_id) == []
    assert Quarantine(workers.checkpoint_root).entries(bad.checkpoint_id) == []
    restored = await restore(client, workers, NAME, bad.checkpoint_id)
    try:
        assert restored.version == good.version
        assert await asyncio.to_thread(_http_text, f"http://127.0.0.1:{port}/") == token
    finally:
        await terminate(restored.pid, grace_seconds=1)


async def test_without_verification_the_same_version_is_offered_and_its_restore_fails(
    client: Client, workers: Settings
) -> None:
    """The failure above is the program's, not the test restore's: captured unverified, the
    same program is published Ready, and a real restore of it then fails the same way."""
    port = free_port()
    request = _request(workers, _workload("process_bound_server.py", port), answer=2)
    request = request.model_copy(update={"verify": False})
    result = await capture(client, request)
    assert "verify" not in result.step_seconds
    with pytest.raises(PipelineFailedError) as err:
        await restore(client, workers, NAME, result.checkpoint_id, timeout=2)
    assert err.value.reason == Reason.RESTORE_FAILED
    assert f"did not answer http://127.0.0.1:{port}/ within 2 s" in err.value.message


async def test_a_capture_cancelled_while_verifying_deletes_the_version_and_leaves_nothing(
    client: Client, workers: Settings
) -> None:
    port = free_port()
    request = _request(workers, _workload("process_bound_server.py", port), answer=5)
    handle = await start_capture(client, request)
    verifying = asyncio.Event()

    def seen(live: LiveProgress) -> None:
        if live.progress.step == "verify":
            verifying.set()

    following = asyncio.ensure_future(follow(client, handle, seen, every=0.1))
    await asyncio.wait_for(verifying.wait(), 60)
    await handle.cancel()
    with pytest.raises(PipelineFailedError) as err:
        await following
    assert err.value.reason == Reason.CANCELLED
    versions = workers.checkpoint_root / request.checkpoint_id / "versions"
    assert [p.name for p in versions.iterdir()] == ["tmp"]
    assert listening_pids(port) == set()
    assert _left_behind(workers, request.checkpoint_id) == []
