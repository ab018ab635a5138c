"""The sentinel protocol on the node: write control files atomically, wait for them with inotify."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from activities.host.files import write_atomically
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


RESTORE_FAILED_NOTE_BYTES = 4096  # what a standby is given to say why it starts cold


def restore_failed_note(reason: str) -> bytes:
    """The content of `restore-failed`: the reason's first 4 KiB (whole characters), then a
    newline."""
    note = reason.encode()[:RESTORE_FAILED_NOTE_BYTES].decode(errors="ignore")
    return note.encode() + b"\n"


def write_sentinel_at(
    directory: int, name: str, content: bytes = b"done\n", *, durable: bool = True
) -> None:
    """`name` written atomically and durably in the directory open as `directory` (temp,
    fsync, rename, fsync of the directory); never through a link planted there. Not
    `durable` (no fsync, a few milliseconds less): for files that matter only while the
    node runs (a restored pod's sentinels: a node that crashes takes its pods along)."""
    tmp = f".{name}.{os.getpid()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=directory)
    fd = os.open(tmp, flags, 0o644, dir_fd=directory)
    try:
        os.write(fd, content)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=directory, dst_dir_fd=directory)  # replaces a link itself
    if durable:
        os.fsync(directory)


def write_restore_failed(directory: int, reason: str) -> bool:
    """The one writer of `restore-failed`, for both modes: in the control directory open as
    `directory`, no `restore-complete`, and `restore-failed` holding the reason (one size
    rule, `restore_failed_note`), durably and never through a link. Once per failure: a
    `restore-failed` already there (this failure's, written by the step that failed) is
    kept, so later writers (the workflow's fallback) add nothing. Returns whether it wrote.

    A restore clears both sentinels before it starts (`clear_restore_sentinels`)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Sentinel.RESTORE_COMPLETE.value, dir_fd=directory)
    try:
        os.stat(Sentinel.RESTORE_FAILED.value, dir_fd=directory, follow_symlinks=False)
        return False
    except FileNotFoundError:
        pass
    write_sentinel_at(directory, Sentinel.RESTORE_FAILED.value, restore_failed_note(reason))
    return True


RESTORE_SENTINELS = (Sentinel.RESTORE_COMPLETE, Sentinel.RESTORE_FAILED)


def clear_restore_sentinels(directory: int) -> None:
    """No `restore-complete` or `restore-failed` left from an earlier restore."""
    for sentinel in RESTORE_SENTINELS:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sentinel.value, dir_fd=directory)


def open_directory(path: Path | str) -> int:
    """A descriptor of directory `path`, its last element not followed if a link."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)


def fall_back_to_cold_start(control_dir: Path | str, reason: str) -> bool:
    """`restore-failed` with the reason in the local control directory `control_dir`, and no
    `restore-complete`: the standby starts cold (`write_restore_failed`)."""
    Path(control_dir).mkdir(parents=True, exist_ok=True)
    directory = open_directory(control_dir)
    try:
        return write_restore_failed(directory, reason)
    finally:
        os.close(directory)


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


STALE_SENTINELS = (
    Sentinel.SNAPSHOT_COMPLETE,
    Sentinel.RESTORE_COMPLETE,
    Sentinel.RESTORE_FAILED,
    Sentinel.READY_FOR_SNAPSHOT,
)
