"""A standby that announces itself: the node learns that warmstart's standby waits for its
restore from the standby (`standby-waiting` in its control directory, the pod's emptyDir as
the kubelet lays it out on the node), not from the kubelet's status, which the kubelet writes
only after its next relist of the container runtime (up to a second later).

fanotify names the process that wrote the file, as this (host-PID) worker sees it; it is
taken for the standby only when it is the init of its container and that container's own
control directory is this pod's (same file on the node), so no other pod can pose as it.
Where fanotify cannot say (no CAP_SYS_ADMIN, the file written before the watch began), the
runtime finds the container (`ContainerRuntime.locate`), a few round trips slower.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import struct
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from activities.contracts import ContainerTarget
from activities.runtime.base import ContainerRuntime, Located
from activities.runtime.control import CONTROL_DIR
from api.errors import InvalidSpecError, WorkloadNotReadyError
from api.jobs import CONTROL_VOLUME
from api.reasons import Sentinel

WAITING = Sentinel.STANDBY_WAITING.value
KUBELET_ROOT = "/var/lib/kubelet"  # the kubelet's default `--root-dir`
EMPTY_DIRS = Path("volumes") / "kubernetes.io~empty-dir"
_POLL_SECONDS = 0.02  # for the control directory, made by the kubelet as the container starts
_CHECK_SECONDS = 1.0

# fanotify(7): notification class, events on the directory's children, closed after writing.
_FAN_CLOEXEC, _FAN_NONBLOCK, _FAN_CLASS_NOTIF = 0x1, 0x2, 0x0
_FAN_MARK_ADD, _FAN_CLOSE_WRITE, _FAN_EVENT_ON_CHILD = 0x1, 0x8, 0x08000000
_EVENT = struct.Struct("IBBHQiI")  # fanotify_event_metadata


_POD_UID = re.compile(r"[0-9A-Za-z][-0-9A-Za-z]*")
_CONTAINER = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def control_volume_on_node(kubelet_root: Path, target: ContainerTarget) -> Path:
    """Where the kubelet lays out the pod's `snapshot-control` emptyDir on the node (the
    standby's control directory is its subPath named after the container)."""
    if not (_POD_UID.fullmatch(target.pod_uid) and _CONTAINER.fullmatch(target.container)):
        raise InvalidSpecError(
            f"pod {target.namespace}/{target.pod_name}: UID {target.pod_uid!r} or container "
            f"{target.container!r} is not one the kubelet would lay out"
        )
    return kubelet_root / "pods" / target.pod_uid / EMPTY_DIRS / CONTROL_VOLUME


def open_control_dir_on_node(
    kubelet_root: Path, target: ContainerTarget, *, create: bool = False
) -> int | None:
    """A descriptor of the standby's control directory on the node, or None while the
    kubelet has not made it. The container's directory is opened without following a link:
    a container given the whole volume could plant one there (to another pod's). `create`:
    made here if the pod's volume is there and the directory not yet (the kubelet makes a
    subPath only as it starts the container, after pulling its image; it uses one that
    exists), with the emptyDir's own mode, so that a sentinel can be left for the standby."""
    try:
        volume = os.open(control_volume_on_node(kubelet_root, target), os.O_PATH | os.O_DIRECTORY)
    except FileNotFoundError:
        return None
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(target.container, 0o777, dir_fd=volume)
                made = os.open(target.container, flags, dir_fd=volume)
                os.fchmod(made, 0o777)  # the emptyDir's mode, whatever the umask
                return made
        return os.open(target.container, flags, dir_fd=volume)
    except FileNotFoundError:
        return None
    except OSError as err:  # ELOOP, ENOTDIR: a link or a file where the directory belongs
        raise InvalidSpecError(
            f"pod {target.namespace}/{target.pod_name}: the control directory of container "
            f"{target.container} on the node is not a directory of its own ({err.strerror})"
        ) from None
    finally:
        os.close(volume)


class Announcements:
    """Waits for the standby of a restore target to announce itself; finds its init PID."""

    def __init__(self, *, kubelet_root: Path, runtime: ContainerRuntime) -> None:
        self._kubelet_root = kubelet_root
        self._runtime = runtime

    def open_control_dir(self, target: ContainerTarget, *, create: bool = False) -> int | None:
        """The standby's control directory on the node (`open_control_dir_on_node`)."""
        return open_control_dir_on_node(self._kubelet_root, target, create=create)

    async def standby(
        self,
        target: ContainerTarget,
        *,
        timeout: float,
        check: Callable[[], Awaitable[None]],
        fallback: Callable[[], None] = lambda: None,
    ) -> Located:
        """The standby of `target` once it waits for its restore; WorkloadNotReadyError
        after `timeout` seconds. `check` runs about every second (heartbeats, cancels);
        `fallback` is told when the runtime has to find the standby instead."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last_check = loop.time()
        while (directory := self.open_control_dir(target)) is None:
            if loop.time() >= deadline:  # the kubelet makes it as it sets the container up
                raise _not_announced(target, timeout)
            if loop.time() - last_check >= _CHECK_SECONDS:
                await check()
                last_check = loop.time()
            await asyncio.sleep(_POLL_SECONDS)
        try:
            with _Writers.watching(directory) as writers:
                while not _exists(directory, WAITING):
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise _not_announced(target, timeout)
                    pid = await writers.next_writer(WAITING, min(_CHECK_SECONDS, remaining))
                    if pid and _is_standby(pid, directory):
                        return Located(container_id=target.container_id, pid=pid)
                    await check()
        finally:
            os.close(directory)
        # Written before the watch began, or by a writer fanotify could not name.
        fallback()
        return await self._runtime.locate(target)


def _exists(directory: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _is_standby(pid: int, directory: int) -> bool:
    """Whether `pid` is its container's init and its control directory is `directory`."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        theirs = os.stat(f"/proc/{pid}/root/{CONTROL_DIR}")
        ours = os.fstat(directory)
    except OSError:
        return False
    [nspids] = [line for line in status.splitlines() if line.startswith("NSpid:")] or [""]
    init = nspids.split()[-1:] == ["1"]
    return init and (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def _not_announced(target: ContainerTarget, timeout: float) -> WorkloadNotReadyError:
    return WorkloadNotReadyError(
        f"pod {target.namespace}/{target.pod_name}: its standby {target.container} did not "
        f"start waiting for its restore within {timeout:g} s"
    )


class _Writers:
    """The PIDs that write files in one directory (fanotify); names nobody where fanotify
    is not available to this process."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    @classmethod
    @contextlib.contextmanager
    def watching(cls, directory: int) -> Iterator[_Writers]:
        fd = _fanotify(directory)
        try:
            yield cls(fd)
        finally:
            if fd is not None:
                os.close(fd)

    async def next_writer(self, name: str, timeout: float) -> int:
        """The PID that next closes `name` after writing it, within `timeout` seconds; 0 if
        none did (or fanotify is not available: then this only waits)."""
        if self._fd is None:
            await asyncio.sleep(min(timeout, _POLL_SECONDS))
            return 0
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(self._fd, wake)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ready, timeout)
        finally:
            loop.remove_reader(self._fd)
        return self._drain(name)

    def _drain(self, name: str) -> int:
        """The writer of `name` among the events queued, closing each event's file."""
        found = 0
        while True:
            try:
                data = os.read(self._fd or -1, 4096)
            except BlockingIOError:
                return found
            at = 0
            while at + _EVENT.size <= len(data):
                length, _version, _, _meta, _mask, fd, pid = _EVENT.unpack_from(data, at)
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == name:
                            found = pid
                    os.close(fd)
                at += length or _EVENT.size


def _fanotify(directory: int) -> int | None:
    """A fanotify descriptor watching files closed after writing in the directory open as
    `directory`; None where this process may not (no CAP_SYS_ADMIN) or the kernel has no
    fanotify."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "fanotify_init"):
        return None
    libc.fanotify_mark.argtypes = [
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint64,
        ctypes.c_int,
        ctypes.c_char_p,
    ]
    fd = int(libc.fanotify_init(_FAN_CLOEXEC | _FAN_NONBLOCK | _FAN_CLASS_NOTIF, os.O_RDONLY))
    if fd < 0:
        return None
    mask = _FAN_CLOSE_WRITE | _FAN_EVENT_ON_CHILD
    if libc.fanotify_mark(fd, _FAN_MARK_ADD, mask, directory, None) != 0:  # the fd itself
        os.close(fd)
        return None
    return fd
