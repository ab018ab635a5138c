"""Lazy restore (decision 0034) of real processes with real CRIU: memory served on fault by
the lazy-pages daemon, the daemon gone once every page is delivered, and the eager restore
a node falls back to where lazy restores cannot run."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import random
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

from activities.contracts import RestoredWorkload, RestoreInput
from activities.criu.command import Criu
from activities.criu.lazy import LAZY_FEATURE, LazyPages
from activities.host.layout import NodeLayout
from activities.host.processes import children, is_alive, terminate
from activities.local.restore import RestoreActivities
from activities.storage.store import CheckpointStore
from api.workload import Readiness
from tests.conftest import CRIU_SKIP
from tests.pipeline import capture, capture_request, restore, shell_workload
from tests.waiting import wait_until
from workers.compose import node_worker
from workers.ports import free_port
from workers.settings import CriuSettings, Settings

PROGRAM = Path(__file__).parents[1] / "programs" / "memory_server.py"
MIB = 64
SEED = 2304


def _lazy_skip_reason() -> str | None:
    if CRIU_SKIP is not None:
        return CRIU_SKIP
    path = CriuSettings().resolve()
    assert path is not None
    check = subprocess.run(
        [path, "check", "--feature", LAZY_FEATURE], capture_output=True, text=True
    )
    if check.returncode != 0:
        said = (check.stdout + check.stderr).strip()
        return f"no lazy restore here: `criu check --feature {LAZY_FEATURE}` says {said}"
    return None


LAZY_SKIP = _lazy_skip_reason()
pytestmark = [
    pytest.mark.skipif(LAZY_SKIP is not None, reason=LAZY_SKIP or ""),
    pytest.mark.timeout(120),
]

RANDOM = random.Random(SEED)
MEMORY = b"".join(RANDOM.randbytes(1 << 20) for _ in range(MIB))  # as the program fills it
FEW = " ".join(str(MEMORY[(len(MEMORY) - 1) * i // 15]) for i in range(16))
DIGEST = hashlib.sha256(MEMORY).hexdigest()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


async def _captured(client: Client, settings: Settings, name: str) -> tuple[str, int]:
    """A real process holding MIB of seeded memory, dumped and committed: its ID and port."""
    port = free_port()
    script = f"exec {sys.executable} {PROGRAM} {port} {MIB} {SEED}"
    readiness = Readiness(kind="http", http_url=f"http://127.0.0.1:{port}/")
    result = await capture(
        client, capture_request(settings, shell_workload(name, script, readiness=readiness))
    )
    return result.checkpoint_id, port


def _activities(settings: Settings, lazy: LazyPages) -> RestoreActivities:
    layout = NodeLayout(settings.home)
    return RestoreActivities(
        criu=_criu(), store=CheckpointStore(layout.checkpoints), layout=layout, lazy_pages=lazy
    )


async def _restore(acts: RestoreActivities, name: str, ckpt: str) -> RestoredWorkload:
    request = RestoreInput(checkpoint_id=ckpt, name=name, answer_timeout_seconds=30)
    return await ActivityEnvironment().run(acts.restore_checkpoint, request)


def _criu() -> Criu:
    path = CriuSettings().resolve()
    assert path is not None
    return Criu(path)


async def test_a_lazy_restore_serves_memory_on_fault_and_its_daemon_exits(
    client: Client, workers: Settings
) -> None:
    ckpt, port = await _captured(client, workers, "lazy")
    lazy = LazyPages(criu=_criu(), enabled=True)
    restored = await _restore(_activities(workers, lazy), "lazy", ckpt)
    try:
        assert list(restored.stage_seconds) == [
            "verify",
            "prepare",
            "lazy-pages",
            "criu-restore",
            "await-answer",
        ]
        assert restored.lazy_unavailable == ""
        daemon = restored.lazy_pages_pid
        assert daemon > 0
        # A few pages, then every page: the memory the process held came back intact.
        assert await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/") == FEW
        assert await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/digest") == DIGEST
        # The daemon exits by itself once every page is delivered, and is reaped.
        await lazy.wait_idle(timeout=60)
        assert not is_alive(daemon) and lazy.running == {}
        outcome = lazy.outcomes[daemon]
        assert outcome.returncode == 0
        assert outcome.total >= (MIB << 20) // 4096
        assert outcome.transferred == outcome.total
        # Pages really were served lazily: the restored process faulted on missing pages.
        assert outcome.faults > 0
        assert not list((workers.home / "restores" / "lazy").iterdir())  # work dir gone
        assert await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/digest") == DIGEST
    finally:
        assert await terminate(restored.pid, grace_seconds=5)


async def test_where_lazy_restores_cannot_run_the_restore_is_eager_and_says_why(
    client: Client, workers: Settings
) -> None:
    ckpt, port = await _captured(client, workers, "eager")
    why = "`criu check --feature uffd-noncoop` exited with 1: uffd is not supported"
    lazy = LazyPages(criu=_criu(), enabled=True, probe=lambda: why)
    restored = await _restore(_activities(workers, lazy), "eager", ckpt)
    try:
        assert "lazy-unavailable" in restored.stage_seconds
        assert restored.lazy_unavailable == why
        assert restored.lazy_pages_pid == 0
        assert lazy.running == {} and lazy.outcomes == {}  # no daemon was started
        assert await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/digest") == DIGEST
    finally:
        assert await terminate(restored.pid, grace_seconds=5)


async def test_a_node_set_for_lazy_restores_restores_lazily_through_the_pipeline(
    client: Client, workers: Settings
) -> None:
    ckpt, port = await _captured(client, workers, "node")
    settings = dataclasses.replace(workers, criu=CriuSettings(lazy_pages=True))
    # A second node worker on the same node's queue would race the first: this one has its own.
    own = dataclasses.replace(
        settings, node=dataclasses.replace(workers.node, name=f"{workers.node.name}-lazy")
    )
    base_env = {"PATH": "/usr/bin:/bin"}
    async with node_worker(client, own, base_env=base_env):
        result = await restore(client, own, "node", ckpt)
    try:
        assert "lazy-pages" in result.stage_seconds
        assert "lazy-unavailable" not in result.stage_seconds
        assert await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/digest") == DIGEST
        # Every page delivered: the daemon (a child of this process, the node worker's) exits.
        await wait_until(lambda: not _lazy_daemons(), "the lazy-pages daemon to exit")
    finally:
        assert await terminate(result.pid, grace_seconds=5)


def _lazy_daemons() -> list[int]:
    """This process's children that are a `criu lazy-pages`."""
    found = []
    for child in children(os.getpid()):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if b"lazy-pages" in argv[1:3] and is_alive(child):
                found.append(child)
    return found


async def test_a_lazy_restore_that_fails_stops_its_daemon_and_restores_eagerly(
    client: Client, workers: Settings, tmp_path: Path
) -> None:
    ckpt, port = await _captured(client, workers, "refused")
    # The real criu, except that `criu restore --lazy-pages` fails as CRIU fails: exit 1,
    # its error in restore.log; the lazy-pages daemon and the eager restore are CRIU's own.
    refusing = tmp_path / "criu-refusing-lazy"
    refusing.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = restore ]; then for arg; do [ "$arg" = --lazy-pages ] || continue\n'
        '  echo "(00.010) Error (criu/uffd.c:283): uffd: Can\'t connect" >&2; exit 1; done; fi\n'
        f'exec {_criu().path} "$@"\n'
    )
    refusing.chmod(0o755)
    lazy = LazyPages(criu=Criu(str(refusing)), enabled=True)
    layout = NodeLayout(workers.home)
    acts = RestoreActivities(
        criu=Criu(str(refusing)),
        store=CheckpointStore(layout.checkpoints),
        layout=layout,
        lazy_pages=lazy,
    )
    restored = await _restore(acts, "refused", ckpt)
    try:
        # `criu-restore` holds both CRIU runs, the lazy one and the eager one after it.
        assert list(restored.stage_seconds) == [
            "verify",
            "prepare",
            "lazy-pages",
            "criu-restore",
            "lazy-unavailable",
            "await-answer",
        ]
        assert "lazy restore failed" in restored.lazy_unavailable
        assert "Can't connect" in restored.lazy_unavailable
        assert restored.lazy_pages_pid == 0
        # The daemon it had started is gone, reaped: killed, not left serving nothing.
        assert lazy.running == {}
        [(daemon, outcome)] = lazy.outcomes.items()
        assert not is_alive(daemon) and outcome.returncode != 0
        assert await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/digest") == DIGEST
    finally:
        assert await terminate(restored.pid, grace_seconds=5)


async def test_a_stopping_worker_leaves_its_daemon_serving_the_restored_process(
    client: Client, workers: Settings
) -> None:
    """The node worker stops (its watch of the daemon cancelled) right after a lazy
    restore: the daemon is not killed, every page still arrives, and it exits on its own."""
    ckpt, port = await _captured(client, workers, "lazy-left")
    lazy = LazyPages(criu=_criu(), enabled=True)
    restored = await _restore(_activities(workers, lazy), "lazy-left", ckpt)
    try:
        for watcher in list(lazy._watchers):
            watcher.cancel()
        await asyncio.gather(*lazy._watchers, return_exceptions=True)
        assert restored.lazy_pages_pid not in lazy.outcomes  # not killed, nothing reported
        assert await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/digest") == DIGEST
        await wait_until(
            lambda: not is_alive(restored.lazy_pages_pid), "the daemon to exit on its own"
        )
    finally:
        assert await terminate(restored.pid, grace_seconds=5)
