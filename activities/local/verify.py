"""A verified capture's test restore (decision 0045): the version just committed, held back
unverified, restored on the capturing node into a throwaway process that must answer; then
stopped, and the workload's state put back as the capture left it.

The restore is the local restore itself (`RestoreActivities`, made with `test_restores`), so
the test covers what a later restore runs: the gate, the digests, CRIU, the answer. It runs
where the capture's own workload ran (the manifest's control directory, output file and
ports), which the dump has stopped: a capture that leaves its workload running cannot be
verified (`CaptureRequest` refuses it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from pathlib import Path

from temporalio import activity

from activities.contracts import Heartbeat, RestoreInput, VerifyInput, VerifyResult
from activities.host.layout import NodeLayout, WorkloadPaths
from activities.host.processes import is_alive, terminate
from activities.local.restore import RestoreActivities
from activities.steps import VerifySteps
from activities.storage.store import CheckpointStore
from api.errors import VerifyFailedError, WarmstartError

# The throwaway process has nothing to save, and a PID namespace's init (what a local
# workload is) ignores SIGTERM without a handler: SIGKILL at once.
STOP_GRACE_SECONDS = 0.0
HEARTBEAT_SECONDS = 0.5


class VerifyActivities(VerifySteps):
    def __init__(
        self, *, restorer: RestoreActivities, store: CheckpointStore, layout: NodeLayout
    ) -> None:
        """`restorer`: a `RestoreActivities` made with `test_restores=True`."""
        if not restorer.test_restores:
            raise ValueError("a verified capture's restorer must be made with test_restores")
        self._restorer = restorer
        self._store = store
        self._layout = layout

    @activity.defn
    async def verify_version(self, request: VerifyInput) -> VerifyResult:
        where = f"checkpoint {request.name} ({request.checkpoint_id}) version {request.version}"
        paths = self._layout.workload(request.name, request.checkpoint_id)
        restores = self._layout.home / "restores" / request.name  # its work directory's parent
        before = await asyncio.to_thread(_WorkloadState, paths, restores)
        restore = RestoreInput(
            checkpoint_id=request.checkpoint_id,
            version=request.version,
            name=request.name,
            answer_timeout_seconds=request.answer_timeout_seconds,
        )
        pid = 0
        ticking = asyncio.create_task(_heartbeats())
        try:
            restored = await self._restorer.restore_checkpoint(restore)
            pid = restored.pid
        except WarmstartError as err:
            raise VerifyFailedError(
                f"{where}: its test restore did not answer: [{err.reason}] {err}"
            ) from err
        finally:
            ticking.cancel()
            stopped = time.monotonic()
            if pid and is_alive(pid):
                await terminate(pid, grace_seconds=STOP_GRACE_SECONDS)
            await asyncio.to_thread(before.put_back)
            tidied = time.monotonic() - stopped
        await asyncio.to_thread(self._store.release, request.checkpoint_id, request.version)
        seconds = {**restored.stage_seconds, "stop-and-tidy": round(tidied, 4)}
        activity.logger.info("%s: test restore answered (%s); offered", where, seconds)
        return VerifyResult(stage_seconds=seconds)


async def _heartbeats() -> None:
    """Heartbeat all along: the restore itself does only as each stage starts, and a
    capture cancelled while its restored copy is awaited learns it from a heartbeat's
    answer (then the process is killed and the state put back at once)."""
    started = time.monotonic()
    while True:
        waited = round(time.monotonic() - started, 1)
        activity.heartbeat(Heartbeat(stage="test-restore", waited_seconds=waited))
        await asyncio.sleep(HEARTBEAT_SECONDS)


class _WorkloadState:
    """A workload's state directory as its capture left it, put back after its test restore:
    every file then present is kept by a hard link (the restore replaces the output file,
    its previous copy and the sentinels with new files, and the restored process writes
    only to those), and what the restore made (restored record, lock, sentinels, restore
    context, its work directories' parent) goes."""

    KEPT = ".verify-kept"

    def __init__(self, paths: WorkloadPaths, restores: Path) -> None:
        self._root = paths.root
        self._restores = restores
        self._had_restores = restores.exists()
        self._kept = self._root / self.KEPT
        self._root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._kept, ignore_errors=True)  # left by a worker that died verifying
        self._dirs = {p for p in self._root.rglob("*") if p.is_dir()} | {self._root}
        files = [p for p in self._root.rglob("*") if not p.is_dir()]
        self._kept.mkdir(mode=0o700)
        self._links: dict[Path, Path] = {}
        for index, path in enumerate(files):
            link = self._kept / str(index)
            os.link(path, link, follow_symlinks=False)
            self._links[path] = link

    def put_back(self) -> None:
        for path in sorted(self._root.rglob("*"), reverse=True):  # a directory after its files
            if path == self._kept or self._kept in path.parents:
                continue
            if path.is_dir() and not path.is_symlink():
                if path not in self._dirs:
                    shutil.rmtree(path, ignore_errors=True)
            elif path not in self._links:
                path.unlink(missing_ok=True)
        for path, link in self._links.items():
            os.replace(link, path)
        shutil.rmtree(self._kept, ignore_errors=True)
        if not self._had_restores and self._restores.is_dir():
            with contextlib.suppress(OSError):  # left where another restore works there
                self._restores.rmdir()
