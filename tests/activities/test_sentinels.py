"""Sentinels: atomic writes and inotify waits that return as soon as the file appears."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from activities.sentinels import clear_sentinels, wait_for_file, write_sentinel_file


def test_write_is_atomic_and_complete(tmp_path: Path) -> None:
    path = write_sentinel_file(tmp_path, "snapshot-complete")
    assert path.read_text() == "done\n"
    assert os.listdir(tmp_path) == ["snapshot-complete"]


async def test_wait_returns_the_file_that_appeared(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, write_sentinel_file, tmp_path, "restore-complete")
    started = loop.time()
    found = await wait_for_file(tmp_path, ["snapshot-complete", "restore-complete"], timeout=10)
    assert found == "restore-complete"
    # inotify wakes the waiter at once; a 10 s timeout was never near.
    assert loop.time() - started < 5


async def test_wait_times_out_with_none(tmp_path: Path) -> None:
    assert await wait_for_file(tmp_path, ["ready-for-snapshot"], timeout=0.1) is None


async def test_check_failures_propagate(tmp_path: Path) -> None:
    async def check() -> None:
        raise RuntimeError("workload exited")

    with pytest.raises(RuntimeError, match="workload exited"):
        await wait_for_file(tmp_path, ["ready-for-snapshot"], timeout=5, check=check)


def test_clear_ignores_missing(tmp_path: Path) -> None:
    write_sentinel_file(tmp_path, "restore-complete")
    clear_sentinels(tmp_path, ["restore-complete", "restore-failed"])
    assert os.listdir(tmp_path) == []
