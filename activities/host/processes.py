"""Linux process facts read from /proc: liveness, children, signalling with a grace period."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path


def is_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state letter follows the parenthesised command, which may itself hold spaces.
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}


def start_ticks(pid: int) -> int:
    """When `pid` started (clock ticks since boot); 0 if it is gone. Tells PID reuse apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return int(stat.rsplit(")", 1)[1].split()[19])


def children(pid: int) -> list[int]:
    """Direct children of `pid`, found by scanning /proc (works without CONFIG_PROC_CHILDREN)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


async def find_descendant(pid: int, depth: int, *, timeout: float) -> int | None:
    """The first process `depth` generations below `pid`, waiting for it to be forked."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        current: int | None = pid
        for _ in range(depth):
            kids = children(current) if current is not None else []
            current = kids[0] if kids else None
        if current is not None:
            return current
        if not is_alive(pid):
            return None
        await asyncio.sleep(0.005)
    return None


async def terminate(pid: int, *, grace_seconds: float) -> bool:
    """SIGTERM, then SIGKILL after the grace period; True if the process is gone."""
    for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while loop.time() < deadline:
            if not is_alive(pid):
                return True
            await asyncio.sleep(0.02)
    return not is_alive(pid)
