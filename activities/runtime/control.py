"""The sentinel protocol through a container's own root: its control directory is reached
through `/proc/<init>/root` without following links, so a link planted in the container
cannot send a write elsewhere on the node."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from temporalio import activity

from activities.contracts import Heartbeat
from activities.host.sentinels import (
    clear_restore_sentinels,
    wait_for_file,
    write_restore_failed,
    write_sentinel_at,
)
from api.dynamo import RESTORE_CONTEXT_FILE
from api.jobs import CONTROL_DIR as JOB_CONTROL_DIR

CONTROL_DIR = JOB_CONTROL_DIR.lstrip("/")  # the same directory, relative to the container's root


def control_path(pid: int) -> Path:
    """The control directory of the container whose init is `pid`, for inotify waits (reads
    only: writes go through `open_control_dir`)."""
    return Path(f"/proc/{pid}/root") / CONTROL_DIR


def open_control_dir(pid: int) -> int:
    """A descriptor of the container's control directory, reached without following links
    (the container's root is the one `/proc/<pid>/root` names)."""
    root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY)
    try:
        return os.open(CONTROL_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root)
    finally:
        os.close(root)


def write_sentinel(
    pid: int, name: str, content: bytes = b"done\n", *, durable: bool = True
) -> None:
    """`name` written in the container's control directory (`write_sentinel_at`)."""
    directory = open_control_dir(pid)
    try:
        write_sentinel_at(directory, name, content, durable=durable)
    finally:
        os.close(directory)


def restore_failed(pid: int, reason: str) -> None:
    """`restore-failed` in the standby's control directory (`write_restore_failed`: once per
    failure); nothing when the standby is gone, since nobody waits then."""
    with contextlib.suppress(OSError):
        directory = open_control_dir(pid)
        try:
            write_restore_failed(directory, reason)
        finally:
            os.close(directory)


def reset_for_restore(pid: int, context: bytes | None = None) -> None:
    """No restore sentinel left from an earlier restore, and, when given, this pod's restore
    context (replacing one an image's own standby wrote from the same environment)."""
    directory = open_control_dir(pid)
    try:
        clear_restore_sentinels(directory)
        if context is not None:  # read by the restored process on this node only
            write_sentinel_at(directory, RESTORE_CONTEXT_FILE, context, durable=False)
    finally:
        os.close(directory)


async def await_file(pid: int, name: str, *, timeout: float) -> bool:
    """Whether `name` appeared in the container's control directory within `timeout`
    seconds (inotify), heartbeating the seconds waited."""
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def check() -> None:
        activity.heartbeat(Heartbeat(waited_seconds=round(loop.time() - started, 1)))

    return await wait_for_file(control_path(pid), [name], timeout=timeout, check=check) is not None
