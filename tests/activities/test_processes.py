"""Process facts from /proc and stopping with a grace period."""

from __future__ import annotations

import asyncio
import os
import sys

from activities.host.processes import children, is_alive, start_ticks, terminate


async def test_terminate_escalates_to_sigkill_for_a_process_ignoring_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ok', flush=True); time.sleep(60)",
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert await proc.stdout.readline() == b"ok\n"
    assert proc.pid in children(os.getpid())
    assert start_ticks(proc.pid) > 0
    assert await terminate(proc.pid, grace_seconds=0.2)
    assert await proc.wait() == -9
    assert not is_alive(proc.pid)
    assert start_ticks(proc.pid) == 0
