"""Sentinels: atomic writes and inotify waits that return as soon as the file appears."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from activities.host.sentinels import (
    RESTORE_FAILED_NOTE_BYTES,
    clear_restore_sentinels,
    clear_sentinels,
    fall_back_to_cold_start,
    open_directory,
    wait_for_file,
    write_restore_failed,
    write_sentinel_file,
)


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


def test_restore_failed_is_written_once_per_failure_with_one_size_rule(tmp_path: Path) -> None:
    """The one writer of `restore-failed`: the first reason of a failure stays (the
    workflow's later fallback adds nothing), at most 4 KiB of whole characters, no
    `restore-complete` beside it, and never through a link planted in the directory."""
    (tmp_path / "restore-complete").write_text("41\n")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.write_text("untouched")
    (tmp_path / ".restore-failed.tmp-link").symlink_to(outside)
    reason = "RestoreFailed: " + "é" * 5000
    assert fall_back_to_cold_start(tmp_path, reason) is True
    assert fall_back_to_cold_start(tmp_path, "StepTimedOut: the workflow's fallback") is False
    note = (tmp_path / "restore-failed").read_bytes()
    assert note.endswith(b"\n") and len(note) <= RESTORE_FAILED_NOTE_BYTES + 1
    assert note.decode().startswith("RestoreFailed: éé")  # whole characters only
    assert not (tmp_path / "restore-complete").exists()
    assert outside.read_text() == "untouched"


def test_a_new_restore_clears_the_last_ones_outcome(tmp_path: Path) -> None:
    fall_back_to_cold_start(tmp_path, "RestoreFailed: the first restore")
    directory = open_directory(tmp_path)
    try:
        clear_restore_sentinels(directory)
        assert write_restore_failed(directory, "Incompatible: the second restore") is True
    finally:
        os.close(directory)
    assert (tmp_path / "restore-failed").read_text() == "Incompatible: the second restore\n"
