"""The dump activity against a fake criu: heartbeats, cancellation, failure; no root needed."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from temporalio.testing import ActivityEnvironment

from activities.contracts import DumpInput, Heartbeat
from activities.criu.command import Criu
from activities.host.processes import is_alive
from activities.local.dump import CriuActivities
from activities.storage.store import CheckpointStore
from api.errors import DumpFailedError
from tests.waiting import DEADLINE_S, wait_until

pytestmark = pytest.mark.timeout(30)

CKPT = "96429b2725761a09"
VERSION = "20261124T000000Z-aaaaaa"
PAGES = 64 * 1024
DUMP_ERROR = "(00.004) Error (criu/cr-dump.c:1660): Can't dump task 4242: ptrace(SEIZE) denied"


def fake_criu(tmp_path: Path, dump_body: str) -> Criu:
    """An executable standing in for criu; `dump_body` runs with $images set from the argv.

    The argv is parsed by flag, as `Criu.dump_command` builds it:
    `criu dump --tree PID --images-dir DIR --log-file dump.log -v4`.
    """
    script = tmp_path / "fake-criu"
    script.write_text(
        textwrap.dedent(
            """\
            #!/bin/sh
            [ "$1" = dump ] || exit 64
            shift
            while [ $# -gt 0 ]; do
                case $1 in
                    --tree) tree=$2; shift 2 ;;
                    --images-dir) images=$2; shift 2 ;;
                    --log-file) log=$2; shift 2 ;;
                    *) shift ;;
                esac
            done
            [ -n "$tree" ] && [ -d "$images" ] && [ "$log" = dump.log ] || exit 65
            """
        )
        + textwrap.dedent(dump_body)
    )
    script.chmod(0o755)
    return Criu(str(script))


def dump_request() -> DumpInput:
    return DumpInput(checkpoint_id=CKPT, version=VERSION, name="llama", pid=4242)


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "checkpoints")


@pytest.fixture
def pids_to_kill() -> Iterator[list[Path]]:
    """Pid files of fake criu processes; whatever is still alive is killed after the test."""
    pidfiles: list[Path] = []
    yield pidfiles
    for pidfile in pidfiles:
        if pidfile.is_file() and is_alive(pid := int(pidfile.read_text())):
            os.kill(pid, signal.SIGKILL)


async def test_dump_heartbeats_bytes_while_criu_runs_and_stages_the_images(
    tmp_path: Path, store: CheckpointStore
) -> None:
    release = tmp_path / "release"
    criu = fake_criu(
        tmp_path,
        f"""\
        head -c {PAGES} /dev/zero >"$images/pages-1.img"
        echo "(00.001) Dumping task $tree" >"$images/$log"
        n=0
        while [ ! -e {release} ] && [ $n -lt 600 ]; do sleep 0.05; n=$((n + 1)); done
        printf core >"$images/core-$tree.img"
        """,
    )
    env = ActivityEnvironment()
    beats: list[tuple[object, ...]] = []
    env.on_heartbeat = lambda *details: beats.append(details)
    activities = CriuActivities(criu=criu, store=store)

    task = asyncio.create_task(env.run(activities.dump_checkpoint, dump_request()))
    staging = store.staging_dir(CKPT, VERSION)

    def saw_pages() -> bool:
        return any(isinstance(b[0], Heartbeat) and (b[0].bytes or 0) >= PAGES for b in beats if b)

    await wait_until(saw_pages, "a heartbeat counting the dumped pages")
    assert not task.done()
    release.touch()
    await task

    assert beats
    counted = []
    for details in beats:
        assert len(details) == 1
        beat = details[0]
        assert isinstance(beat, Heartbeat)
        assert beat.stage == "dumping"
        assert beat.bytes is not None
        counted.append(beat.bytes)
    assert counted == sorted(counted)
    assert counted[-1] >= PAGES
    images = staging / "criu"
    assert sorted(p.name for p in images.iterdir()) == ["core-4242.img", "dump.log", "pages-1.img"]
    assert (images / "pages-1.img").stat().st_size == PAGES
    assert (images / "dump.log").read_text() == "(00.001) Dumping task 4242\n"
    assert staging == store.root / CKPT / "versions" / "tmp" / VERSION


async def test_dump_replaces_what_a_failed_attempt_left_in_staging(
    tmp_path: Path, store: CheckpointStore
) -> None:
    leftover = store.fresh_staging(CKPT, VERSION) / "criu-from-attempt-1"
    leftover.mkdir()
    criu = fake_criu(tmp_path, 'printf core >"$images/core-$tree.img"\n')

    await ActivityEnvironment().run(
        CriuActivities(criu=criu, store=store).dump_checkpoint, dump_request()
    )

    staging = store.staging_dir(CKPT, VERSION)
    assert sorted(p.name for p in staging.iterdir()) == ["criu"]
    assert [p.name for p in (staging / "criu").iterdir()] == ["core-4242.img"]


async def test_cancel_kills_criu_and_removes_the_staging(
    tmp_path: Path, store: CheckpointStore, pids_to_kill: list[Path]
) -> None:
    pidfile = tmp_path / "criu.pid"
    pids_to_kill.append(pidfile)
    # `exec` keeps the PID: the process recorded is the very process the activity spawned.
    criu = fake_criu(
        tmp_path,
        f"""\
        head -c {PAGES} /dev/zero >"$images/pages-1.img"
        echo $$ >{pidfile}.tmp && mv {pidfile}.tmp {pidfile}
        exec sleep 300
        """,
    )
    env = ActivityEnvironment()
    beats: list[tuple[object, ...]] = []
    env.on_heartbeat = lambda *details: beats.append(details)
    activities = CriuActivities(criu=criu, store=store)
    staging = store.staging_dir(CKPT, VERSION)

    task = asyncio.create_task(env.run(activities.dump_checkpoint, dump_request()))
    # After a heartbeat the activity holds criu's process: a cancel that lands while criu
    # is still being spawned is handled by asyncio, which kills criu but not its group.
    await wait_until(lambda: bool(beats) and pidfile.exists(), "criu's pid and a heartbeat")
    criu_pid = int(pidfile.read_text())
    assert is_alive(criu_pid)
    assert (staging / "criu" / "pages-1.img").is_file()

    env.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    # The activity waited for criu itself, so it is reaped: no process, not even a zombie.
    assert not Path(f"/proc/{criu_pid}").exists()
    assert not staging.exists()
    assert not (store.root / CKPT / "versions" / "tmp" / VERSION).exists()


async def test_failing_criu_raises_dump_failed_with_the_log_line_and_leaves_no_staging(
    tmp_path: Path, store: CheckpointStore
) -> None:
    criu = fake_criu(
        tmp_path,
        f"""\
        head -c {PAGES} /dev/zero >"$images/pages-1.img"
        {{
            echo "(00.001) Dumping task $tree"
            echo "{DUMP_ERROR}"
            echo "(00.005) Unlocking tty"
        }} >"$images/$log"
        echo "criu: see dump.log" >&2
        exit 1
        """,
    )

    with pytest.raises(DumpFailedError) as caught:
        await ActivityEnvironment().run(
            CriuActivities(criu=criu, store=store).dump_checkpoint, dump_request()
        )

    message = str(caught.value)
    assert f"checkpoint llama ({CKPT})" in message
    assert "pid 4242 failed with exit code 1" in message
    assert message.endswith(f"dump.log:\n{DUMP_ERROR}")
    assert caught.value.reason == "DumpFailed"
    assert not caught.value.retryable
    assert not store.staging_dir(CKPT, VERSION).exists()


async def test_failing_criu_without_a_log_reports_its_stderr(
    tmp_path: Path, store: CheckpointStore
) -> None:
    criu = fake_criu(tmp_path, 'echo "Can\'t open images dir" >&2\nexit 3\n')

    with pytest.raises(DumpFailedError, match=r"exit code 3; dump.log:\nCan't open images dir$"):
        await ActivityEnvironment().run(
            CriuActivities(criu=criu, store=store).dump_checkpoint, dump_request()
        )
    assert not store.staging_dir(CKPT, VERSION).exists()


async def test_missing_criu_binary_leaves_no_staging(
    tmp_path: Path, store: CheckpointStore
) -> None:
    activities = CriuActivities(criu=Criu(str(tmp_path / "no-criu")), store=store)

    # Started through setpriv (so that criu dies with the worker): setpriv says what failed.
    with pytest.raises((FileNotFoundError, DumpFailedError), match=r"No such file|no-criu"):
        await ActivityEnvironment().run(activities.dump_checkpoint, dump_request())
    assert not store.staging_dir(CKPT, VERSION).exists()


async def test_cancel_also_stops_what_criu_started(
    tmp_path: Path, store: CheckpointStore, pids_to_kill: list[Path]
) -> None:
    pidfile = tmp_path / "criu-child.pid"
    pids_to_kill.append(pidfile)
    criu = fake_criu(
        tmp_path,
        f"""\
        sleep 300 &
        echo $! >{pidfile}.tmp && mv {pidfile}.tmp {pidfile}
        wait
        """,
    )
    env = ActivityEnvironment()
    beats: list[tuple[object, ...]] = []
    env.on_heartbeat = lambda *details: beats.append(details)
    task = asyncio.create_task(
        env.run(CriuActivities(criu=criu, store=store).dump_checkpoint, dump_request())
    )
    await wait_until(lambda: bool(beats) and pidfile.exists(), "criu's pid and a heartbeat")
    child = int(pidfile.read_text())

    env.cancel()
    try:
        # The child held criu's stderr: the activity could only end once it was gone too.
        done, _ = await asyncio.wait({task}, timeout=DEADLINE_S)
        assert done, "the cancelled dump is still waiting for criu's child"
        # Killed with the group; it may still be between closing its files and dying.
        await wait_until(lambda: not is_alive(child), "criu's child to be gone")
    finally:
        if is_alive(child):
            os.kill(child, signal.SIGKILL)  # lets a stuck activity finish
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not store.staging_dir(CKPT, VERSION).exists()


# Runs the dump in a separate interpreter: a stuck dump cannot be unstuck in-process.
CHATTY_DUMP = """\
import asyncio, sys
from pathlib import Path
from temporalio.testing import ActivityEnvironment
from activities.contracts import DumpInput
from activities.criu.command import Criu
from activities.local.dump import CriuActivities
from activities.storage.store import CheckpointStore
from api.errors import DumpFailedError

criu, root, checkpoint_id, version = sys.argv[1:]
request = DumpInput(checkpoint_id=checkpoint_id, version=version, name="llama", pid=4242)
try:
    activities = CriuActivities(criu=Criu(criu), store=CheckpointStore(Path(root)))
    asyncio.run(ActivityEnvironment().run(activities.dump_checkpoint, request))
except DumpFailedError as err:
    print("DumpFailedError:", str(err).splitlines()[0])
"""


def test_a_criu_that_writes_much_to_stderr_does_not_hang_the_dump(
    tmp_path: Path, store: CheckpointStore
) -> None:
    criu = fake_criu(tmp_path, "head -c 1048576 /dev/zero | tr '\\0' x >&2\nexit 1\n")
    repo = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHATTY_DUMP, criu.path, str(store.root), CKPT, VERSION],
            cwd=repo,
            env={**os.environ, "PYTHONPATH": str(repo)},
            capture_output=True,
            text=True,
            timeout=DEADLINE_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the dump did not end within {DEADLINE_S:g} s")
    assert done.stdout.startswith("DumpFailedError: checkpoint llama"), done.stderr
    assert not store.staging_dir(CKPT, VERSION).exists()


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")
def test_criu_dies_with_a_killed_node_worker(tmp_path: Path, store: CheckpointStore) -> None:
    pid_file = tmp_path / "criu.pid"
    criu = fake_criu(tmp_path, f"echo $$ >{pid_file}\nexec sleep 60\n")
    repo = Path(__file__).resolve().parents[2]
    worker = subprocess.Popen(
        [sys.executable, "-c", CHATTY_DUMP, criu.path, str(store.root), CKPT, VERSION],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not (pid_file.is_file() and pid_file.read_text().strip()):
            assert time.monotonic() < deadline, "the fake criu never started"
            time.sleep(0.01)
        criu_pid = int(pid_file.read_text())
        worker.kill()  # SIGKILL: no cleanup of any kind runs in the worker
        worker.wait()
        while is_alive(criu_pid):
            assert time.monotonic() < deadline, "criu outlived the killed worker"
            time.sleep(0.01)
    finally:
        if worker.poll() is None:
            worker.kill()
