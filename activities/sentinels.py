"""The sentinel protocol on the node: write control files atomically, wait for them with inotify."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from temporalio import activity

from activities.contracts import SentinelInput
from activities.files import write_atomically
from activities.layout import NodeLayout
from activities.steps import SentinelSteps
from api.dynamo import RESTORE_CONTEXT_FILE, restore_context
from api.reasons import Sentinel

_POLL_FALLBACK_SECONDS = 0.5


def write_sentinel_file(control_dir: Path | str, sentinel: str, content: str = "done\n") -> Path:
    path = Path(control_dir) / sentinel
    # The reader is a process on this host: atomic is required, crash-durable is not.
    write_atomically(path, content.encode(), durable=False)
    return path


def write_restore_context(control_dir: Path | str, environ: Mapping[str, str]) -> Path:
    """`restore-context.json` for a process about to be restored with `control_dir`: the
    names of Dynamo's restore context from `environ` (the restore's environment), null for
    the others, so a restored Dynamo worker takes its new identity (api.dynamo)."""
    path = Path(control_dir) / RESTORE_CONTEXT_FILE
    write_atomically(path, restore_context(environ), durable=False)
    return path


def clear_sentinels(control_dir: Path | str, sentinels: Iterable[str]) -> None:
    for name in sentinels:
        (Path(control_dir) / name).unlink(missing_ok=True)


def fall_back_to_cold_start(control_dir: Path | str, reason: str) -> None:
    """`restore-failed` with the reason, and no `restore-complete`: the standby starts cold."""
    clear_sentinels(control_dir, [Sentinel.RESTORE_COMPLETE])
    write_sentinel_file(control_dir, Sentinel.RESTORE_FAILED, reason + "\n")


class _DirWatch:
    """inotify on one directory; falls back to polling where inotify is unavailable."""

    def __init__(self, directory: Path) -> None:
        self._inotify: Any = None
        self._fd: int | None = None
        try:
            from inotify_simple import INotify, flags

            inotify = INotify()
            inotify.add_watch(str(directory), flags.CREATE | flags.MOVED_TO | flags.CLOSE_WRITE)
            self._inotify = inotify
            self._fd = inotify.fileno()
        except (ImportError, OSError):
            self._fd = None

    async def changed(self, timeout: float) -> None:
        """Return when the directory may have changed, or after `timeout` seconds."""
        if self._fd is None:
            await asyncio.sleep(min(timeout, _POLL_FALLBACK_SECONDS))
            return
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(self._fd, wake)
        try:
            await asyncio.wait_for(ready, timeout)
        except TimeoutError:
            pass
        finally:
            loop.remove_reader(self._fd)
        if ready.done():
            self._inotify.read(timeout=0)

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()


async def wait_for_file(
    directory: Path,
    names: Iterable[str],
    *,
    timeout: float,
    check: Callable[[], Awaitable[None]] | None = None,
    check_every: float = 1.0,
) -> str | None:
    """Wait until one of `names` exists in `directory`; return it, or None on timeout.

    `check` runs about every `check_every` seconds (heartbeats, liveness) and may raise.
    """
    wanted = list(names)
    directory.mkdir(parents=True, exist_ok=True)
    watch = _DirWatch(directory)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while True:
            for name in wanted:
                if os.path.exists(directory / name):
                    return name
            now = loop.time()
            if now >= deadline:
                return None
            if check is not None:
                await check()
            await watch.changed(min(check_every, deadline - now))
    finally:
        watch.close()


class SentinelActivities(SentinelSteps):
    """Node activities of the sentinel protocol."""

    def __init__(self, *, layout: NodeLayout) -> None:
        self._layout = layout

    @activity.defn
    async def write_sentinel(self, request: SentinelInput) -> None:
        control_dir = self._layout.workload(request.name, request.checkpoint_id).control_dir
        activity.logger.info("writing %s in %s", request.sentinel, control_dir)
        await asyncio.to_thread(write_sentinel_file, control_dir, request.sentinel)


STALE_SENTINELS = (
    Sentinel.SNAPSHOT_COMPLETE,
    Sentinel.RESTORE_COMPLETE,
    Sentinel.RESTORE_FAILED,
    Sentinel.READY_FOR_SNAPSHOT,
)
