"""Captures with pre-dumps (decision 0037) of real processes with real CRIU: the images of
a dump on pre-dumps hold every page under the version (no links), a restore finds the
process's memory intact, the frozen time is recorded, and a pre-dump that cannot run or
fails leaves a plain dump that says why."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from temporalio.testing import ActivityEnvironment

from activities.contracts import DumpInput
from activities.criu.command import IMAGES_DIR, Criu
from activities.criu.predump import (
    CAPTURE_FILE,
    PRE_DUMP_FEATURE,
    PRE_DUMPS_DIR,
    PreDumps,
    captured_criu_info,
    dirty_track_probe,
    fold_parents,
    pre_dump_command,
)
from activities.host.processes import is_alive, terminate
from activities.local.dump import CriuActivities
from activities.storage.store import CheckpointStore, digest_tree
from api.errors import DumpFailedError, InvalidSpecError
from api.manifest import CriuInfo
from tests.conftest import CRIU_SKIP
from tests.waiting import wait_until
from workers.ports import free_port
from workers.settings import CriuSettings, Settings

PROGRAM = Path(__file__).parents[1] / "programs" / "churning_memory.py"
CKPT = "96429b2725761a09"
VERSION = "20261124T000000Z-aaaaaa"
MIB = 32


def _criu() -> Criu:
    path = CriuSettings().resolve()
    assert path is not None
    return Criu(path)


def _dirty_track() -> str:
    """ "" where this kernel tracks dirty pages for CRIU, else what `criu check` says."""
    return CRIU_SKIP or dirty_track_probe(_criu())()


needs_criu = pytest.mark.skipif(CRIU_SKIP is not None, reason=CRIU_SKIP or "")
DIRTY_TRACK = "" if CRIU_SKIP else _dirty_track()


def test_the_setting_is_a_number_of_rounds_and_errors_name_the_variable() -> None:
    assert Settings.from_env({}).criu.pre_dumps == 0
    assert Settings.from_env({"WARMSTART_CRIU__PRE_DUMPS": "2"}).criu.pre_dumps == 2
    for bad, said in (("-1", "expected 0"), ("9", "expected 0"), ("two", "an integer")):
        with pytest.raises(InvalidSpecError, match=f"WARMSTART_CRIU__PRE_DUMPS.*{said}"):
            Settings.from_env({"WARMSTART_CRIU__PRE_DUMPS": bad})


def test_a_pre_dump_runs_what_the_dump_would_run_leaving_the_tree_running() -> None:
    final = Criu("criu").dump_command(
        pid=7, images_dir=Path("/s/criu"), leave_running=True, action_script=Path("/a")
    )
    first = pre_dump_command(final, images=Path("/s/criu-pre/1"), parent=None)
    assert first == [
        *("criu", "pre-dump", "--tree", "7", "--log-file", "dump.log", "-v4"),
        *("--images-dir", "/s/criu-pre/1", "--track-mem"),
    ]
    second = pre_dump_command(final, images=Path("/s/criu-pre/2"), parent="../1")
    assert second[-2:] == ["--prev-images-dir", "../1"]


def test_the_chain_of_rounds_is_folded_into_the_images(tmp_path: Path) -> None:
    images, rounds = tmp_path / "criu", tmp_path / PRE_DUMPS_DIR
    for directory, page in ((images, "final"), (rounds / "1", "first"), (rounds / "2", "second")):
        directory.mkdir(parents=True)
        (directory / "pages-1.img").write_text(page)
    (rounds / "2" / "parent").symlink_to("../1")
    (images / "parent").symlink_to(f"../{PRE_DUMPS_DIR}/2")
    fold_parents(images, rounds)
    assert (images / "parent" / "pages-1.img").read_text() == "second"
    assert (images / "parent" / "parent" / "pages-1.img").read_text() == "first"
    assert not rounds.exists()
    assert not [path for path in tmp_path.rglob("*") if path.is_symlink()]
    paths = {entry.path for entry in digest_tree(tmp_path)}
    assert "criu/parent/parent/pages-1.img" in paths  # digests cover what a restore reads


def test_a_parent_link_out_of_the_rounds_is_refused(tmp_path: Path) -> None:
    images, rounds = tmp_path / "criu", tmp_path / PRE_DUMPS_DIR
    images.mkdir()
    rounds.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (images / "parent").symlink_to("../elsewhere")
    with pytest.raises(DumpFailedError, match="not a pre-dump round"):
        fold_parents(images, rounds)


@pytest.fixture
def churning() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A process holding MIB of memory that it keeps rewriting (its own session, as CRIU
    dumps a tree's root), with its port; stopped by PID after the test."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(PROGRAM), str(port), str(MIB), "2306"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    yield proc, port
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _check(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/check", timeout=20) as response:
        return str(response.read().decode())


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def _dump_and_restore(
    tmp_path: Path, proc: subprocess.Popen[bytes], port: int, pre_dumps: PreDumps
) -> tuple[Path, CriuInfo]:
    """Dump the churning process (it dies with the dump), restore its images, and check
    that the restored process's memory is what its records say; the staging and the
    manifest's CRIU facts."""
    await wait_until(lambda: _answers(port), "the churning process to listen")
    first = await asyncio.to_thread(_check, port)
    assert first.startswith("ok ")
    store = CheckpointStore(tmp_path / "checkpoints")
    criu = _criu()
    activities = CriuActivities(criu=criu, store=store, pre_dumps=pre_dumps)
    request = DumpInput(checkpoint_id=CKPT, version=VERSION, name="churn", pid=proc.pid)
    await ActivityEnvironment().run(activities.dump_checkpoint, request)
    assert proc.wait(timeout=30) == -9  # CRIU kills a tree it dumped without leave-running
    staging = store.staging_dir(CKPT, VERSION)
    info = captured_criu_info(CriuInfo(version=criu.version()), staging)
    restored = await criu.restore(images_dir=staging / IMAGES_DIR, work_dir=tmp_path / "work")
    try:
        answer = await asyncio.to_thread(_check, port)
        assert answer.startswith("ok "), answer
        assert int(answer.split()[2]) > 0  # pages were rewritten before the dump
    finally:
        assert await terminate(restored, grace_seconds=5)
    return staging, info


@needs_criu
@pytest.mark.timeout(120)
@pytest.mark.skipif(DIRTY_TRACK != "", reason=f"pre-dumps cannot run on this kernel: {DIRTY_TRACK}")
async def test_a_dump_on_pre_dumps_restores_memory_that_kept_changing(
    tmp_path: Path, churning: tuple[subprocess.Popen[bytes], int]
) -> None:
    proc, port = churning
    staging, info = await _dump_and_restore(tmp_path, proc, port, PreDumps(criu=_criu(), rounds=2))
    assert info.pre_dumps == 2 and info.pre_dump_fallback == ""
    assert info.frozen_ms is not None and info.frozen_ms > 0
    assert (staging / IMAGES_DIR / "parent" / "parent").is_dir()
    assert not (staging / PRE_DUMPS_DIR).exists()
    assert not [path for path in staging.rglob("*") if path.is_symlink()]


@needs_criu
@pytest.mark.timeout(120)
async def test_where_pre_dumps_cannot_run_the_dump_is_plain_and_says_why(
    tmp_path: Path, churning: tuple[subprocess.Popen[bytes], int]
) -> None:
    proc, port = churning
    why = f"`criu check --feature {PRE_DUMP_FEATURE}` exited with 1: no dirty tracking"
    staging, info = await _dump_and_restore(
        tmp_path, proc, port, PreDumps(criu=_criu(), rounds=2, probe=lambda: why)
    )
    assert (info.pre_dumps, info.pre_dump_fallback) == (0, why)
    assert info.frozen_ms is not None and info.frozen_ms > 0
    assert (staging / CAPTURE_FILE).is_file() and not (staging / PRE_DUMPS_DIR).exists()
    assert not (staging / IMAGES_DIR / "parent").exists()


@needs_criu
@pytest.mark.timeout(120)
@pytest.mark.skipif(
    DIRTY_TRACK == "",
    reason="pre-dumps run on this kernel: this failure needs one without dirty tracking",
)
async def test_a_pre_dump_that_fails_leaves_a_plain_dump_that_restores(
    tmp_path: Path, churning: tuple[subprocess.Popen[bytes], int]
) -> None:
    """On a kernel without dirty tracking, a pre-dump run regardless fails for real."""
    proc, port = churning
    staging, info = await _dump_and_restore(
        tmp_path, proc, port, PreDumps(criu=_criu(), rounds=2, probe=lambda: "")
    )
    assert info.pre_dumps == 0
    assert "pre-dump 1 of 2" in info.pre_dump_fallback
    assert info.frozen_ms is not None and info.frozen_ms > 0
    assert not (staging / PRE_DUMPS_DIR).exists()
    assert is_alive(os.getpid())
