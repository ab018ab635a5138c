"""Local workload activities: readiness, early exit, timeouts, stopping; launching needs root."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError
from temporalio.testing import ActivityEnvironment

from activities.contracts import AwaitReadyInput, Heartbeat, LaunchInput, StopInput
from activities.host.layout import NodeLayout, WorkloadPaths
from activities.host.processes import is_alive, start_ticks
from activities.local.process import LocalProcessActivities, inherited_env, resolve_secrets
from api.errors import InvalidSpecError, WorkloadExitedError, WorkloadNotReadyError
from api.workload import LocalWorkload, Readiness
from tests.waiting import DEADLINE_S, wait_until

pytestmark = pytest.mark.timeout(30)

CKPT = "96429b2725761a09"
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason=f"unshare --pid needs root (running as uid {os.geteuid()})"
)


def workload(tmp_path: Path, **overrides: object) -> LocalWorkload:
    spec: dict[str, object] = {
        "name": "llama",
        "command": ("python3", "worker.py"),
        "cwd": str(tmp_path),
        "ready_timeout_seconds": 30,
    }
    return LocalWorkload.model_validate({**spec, **overrides})


@pytest.fixture
def layout(tmp_path: Path) -> NodeLayout:
    return NodeLayout(tmp_path / "home")


@pytest.fixture
def paths(layout: NodeLayout) -> WorkloadPaths:
    paths = layout.workload("llama", CKPT)
    paths.root.mkdir(parents=True)
    return paths


@pytest.fixture
def activities(layout: NodeLayout) -> LocalProcessActivities:
    return LocalProcessActivities(layout=layout, base_env={"PATH": os.environ["PATH"]})


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start child processes that stand in for workloads; all are killed after the test."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def heartbeats(beats: list[tuple[object, ...]]) -> list[float]:
    waited = []
    for details in beats:
        assert len(details) == 1
        beat = details[0]
        assert isinstance(beat, Heartbeat)
        assert beat.waited_seconds is not None
        waited.append(beat.waited_seconds)
    return waited


# The workload of a sentinel readiness: warms up until told to go, then says it is ready.
WARMING_UP = textwrap.dedent(
    """\
    import os, sys, time
    go, control = sys.argv[1], os.environ["SNAPSHOT_CONTROL_DIR"]
    deadline = time.monotonic() + 20
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    with open(os.path.join(control, ".ready"), "w") as out:
        out.write("ready\\n")
    os.replace(os.path.join(control, ".ready"), os.path.join(control, "ready-for-snapshot"))
    time.sleep(300)
    """
)


async def test_await_ready_returns_on_the_sentinel_and_heartbeats_meanwhile(
    tmp_path: Path,
    paths: WorkloadPaths,
    activities: LocalProcessActivities,
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    go = tmp_path / "go"
    paths.control_dir.mkdir()
    child = spawn(
        sys.executable,
        "-c",
        WARMING_UP,
        str(go),
        env={**os.environ, "SNAPSHOT_CONTROL_DIR": str(paths.control_dir)},
    )
    env = ActivityEnvironment()
    beats: list[tuple[object, ...]] = []
    env.on_heartbeat = lambda *details: beats.append(details)
    request = AwaitReadyInput(workload=workload(tmp_path), checkpoint_id=CKPT, pid=child.pid)

    task = asyncio.create_task(env.run(activities.await_workload_ready, request))
    await wait_until(lambda: len(beats) >= 2, "two heartbeats while the workload warms up")
    assert not task.done()
    go.touch()
    await task

    waited = heartbeats(beats)
    assert waited == sorted(waited)
    assert waited[-1] > 0
    assert child.poll() is None  # awaiting readiness leaves the workload running


async def test_await_ready_raises_workload_exited_with_status_and_output(
    tmp_path: Path,
    paths: WorkloadPaths,
    activities: LocalProcessActivities,
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    # Like the launcher: the program's output goes to output.log, its status to exit-status.
    program = 'echo "loading weights"; echo "CUDA error: out of memory" >&2; exit 3'
    launcher = 'sh -c "$1" >>"$2" 2>&1; echo $? >"$3"'
    paths.output_log.touch()
    shell = spawn(
        "sh", "-c", launcher, "launcher", program, str(paths.output_log), str(paths.exit_status)
    )
    env = ActivityEnvironment()
    beats: list[tuple[object, ...]] = []
    env.on_heartbeat = lambda *details: beats.append(details)
    request = AwaitReadyInput(workload=workload(tmp_path), checkpoint_id=CKPT, pid=shell.pid)

    with pytest.raises(WorkloadExitedError) as caught:
        await env.run(activities.await_workload_ready, request)

    assert str(caught.value) == (
        "workload llama exited with status 3 before it was ready; last output:\n"
        "loading weights\nCUDA error: out of memory"
    )
    assert caught.value.reason == "WorkloadExited"
    assert heartbeats(beats)


async def test_await_ready_gives_up_after_the_ready_timeout(
    tmp_path: Path,
    paths: WorkloadPaths,
    activities: LocalProcessActivities,
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    paths.output_log.write_text("warming up 1/50\nwarming up 2/50\n")
    child = spawn("sleep", "300")
    spec = workload(tmp_path, ready_timeout_seconds=0.3)
    request = AwaitReadyInput(workload=spec, checkpoint_id=CKPT, pid=child.pid)

    with pytest.raises(WorkloadNotReadyError) as caught:
        await ActivityEnvironment().run(activities.await_workload_ready, request)

    assert str(caught.value) == (
        "workload llama not ready after 0.3 s (sentinel); last output:\n"
        "warming up 1/50\nwarming up 2/50"
    )
    assert child.poll() is None  # not ready is reported; stopping is the workflow's call


async def test_await_ready_by_tcp_probe(
    tmp_path: Path,
    paths: WorkloadPaths,
    activities: LocalProcessActivities,
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    child = spawn("sleep", "300")
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = int(listening.getsockname()[1])
        ready = workload(tmp_path, readiness=Readiness(kind="tcp", tcp_port=port))
        request = AwaitReadyInput(workload=ready, checkpoint_id=CKPT, pid=child.pid)
        await ActivityEnvironment().run(activities.await_workload_ready, request)

    closed = workload(
        tmp_path, readiness=Readiness(kind="tcp", tcp_port=port), ready_timeout_seconds=0.3
    )
    request = AwaitReadyInput(workload=closed, checkpoint_id=CKPT, pid=child.pid)
    with pytest.raises(WorkloadNotReadyError, match=r"not ready after 0\.3 s \(tcp\)"):
        await ActivityEnvironment().run(activities.await_workload_ready, request)


async def test_stop_leaves_alone_a_pid_that_started_at_another_time(
    activities: LocalProcessActivities, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    child = spawn("sleep", "300")
    ticks = start_ticks(child.pid)
    assert ticks > 0

    await ActivityEnvironment().run(
        activities.stop_workload, StopInput(pid=child.pid, start_ticks=ticks + 1)
    )
    assert child.poll() is None
    assert is_alive(child.pid)

    await ActivityEnvironment().run(
        activities.stop_workload, StopInput(pid=child.pid, start_ticks=ticks)
    )
    assert child.wait(timeout=DEADLINE_S) == -signal.SIGTERM


async def test_stop_of_a_pid_that_is_gone_does_nothing(
    activities: LocalProcessActivities, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    child = spawn("true")
    ticks = start_ticks(child.pid)
    child.wait(timeout=DEADLINE_S)  # reaped: the pid is free
    await ActivityEnvironment().run(
        activities.stop_workload, StopInput(pid=child.pid, start_ticks=ticks)
    )


async def test_launch_refuses_a_missing_working_directory_after_clearing_stale_state(
    tmp_path: Path, paths: WorkloadPaths, activities: LocalProcessActivities
) -> None:
    paths.control_dir.mkdir()
    (paths.control_dir / "restore-complete").write_text("done\n")
    paths.output_log.write_text("the previous run\n")
    paths.exit_status.write_text("0\n")
    spec = workload(tmp_path, cwd=str(tmp_path / "missing"))

    with pytest.raises(InvalidSpecError, match="workload llama: cannot start: "):
        await ActivityEnvironment().run(
            activities.launch_workload, LaunchInput(workload=spec, checkpoint_id=CKPT)
        )

    assert os.listdir(paths.control_dir) == []
    assert (paths.root / "output.log.previous").read_text() == "the previous run\n"
    assert paths.output_log.read_text() == ""
    assert not paths.exit_status.exists()


# Init of its own PID namespace gets only the signals it handles: trap TERM to stop cleanly.
SERVING = (
    'trap "exit 0" TERM; echo "hello $GREETING from pid $$"; '
    ': >"$SNAPSHOT_CONTROL_DIR/ready-for-snapshot"; '
    "while :; do sleep 1 & wait $!; done"
)


@needs_root
async def test_launch_runs_the_workload_as_init_of_its_own_pid_namespace(
    tmp_path: Path, layout: NodeLayout, activities: LocalProcessActivities
) -> None:
    spec = workload(tmp_path, command=("sh", "-c", SERVING), env={"GREETING": "world"})
    env = ActivityEnvironment()

    launched = await env.run(
        activities.launch_workload, LaunchInput(workload=spec, checkpoint_id=CKPT)
    )
    try:
        paths = layout.workload("llama", CKPT)
        assert start_ticks(launched.pid) == launched.start_ticks
        record = layout.read_launch("llama", CKPT)
        assert (record.pid, record.start_ticks, record.workload) == (
            launched.pid,
            launched.start_ticks,
            spec,
        )
        request = AwaitReadyInput(workload=spec, checkpoint_id=CKPT, pid=launched.pid)
        await env.run(activities.await_workload_ready, request)
        await wait_until(lambda: paths.output_log.read_text() != "", "the workload's output")
        assert paths.output_log.read_text() == "hello world from pid 1\n"
    finally:
        await env.run(
            activities.stop_workload,
            StopInput(pid=launched.pid, start_ticks=launched.start_ticks),
        )
    assert not is_alive(launched.pid)
    await wait_until(lambda: paths.exit_status.is_file(), "the launcher to record the status")
    await wait_until(lambda: paths.exit_status.read_text() != "", "the status to be written")
    assert paths.exit_status.read_text() == "0\n"


@needs_root
async def test_a_retried_launch_adopts_its_workload_and_stops_one_left_by_another_run(
    tmp_path: Path, layout: NodeLayout, activities: LocalProcessActivities
) -> None:
    spec = workload(tmp_path, command=("sh", "-c", SERVING))
    request = LaunchInput(workload=spec, checkpoint_id=CKPT)
    first_run = ActivityEnvironment()
    first_run.info = dataclasses.replace(first_run.info, workflow_run_id="run-1")
    launched = await first_run.run(activities.launch_workload, request)
    relaunched = second = None
    try:
        # The first attempt's result was lost (worker killed): the retry finds it running.
        relaunched = await first_run.run(activities.launch_workload, request)
        assert relaunched == launched
        assert same_command_elsewhere(launched.pid) == []
        assert layout.read_launch("llama", CKPT).run_id == "run-1"

        # A later run of the capture finds the workload a dead run left behind: stopped.
        later_run = ActivityEnvironment()
        later_run.info = dataclasses.replace(later_run.info, workflow_run_id="run-2")
        second = await later_run.run(activities.launch_workload, request)
        assert second.pid != launched.pid
        assert not is_alive(launched.pid)
        assert layout.read_launch("llama", CKPT).run_id == "run-2"
    finally:
        for one in (launched, relaunched, second):
            if one is not None:
                stop = StopInput(pid=one.pid, start_ticks=one.start_ticks)
                await first_run.run(activities.stop_workload, stop)


def same_command_elsewhere(pid: int) -> list[int]:
    """Other launches of this test's workload running beside `pid`: the same command line
    and control directory (this test's own), not `pid`'s own descendants (the shell's
    forks for `sleep` have its command line until they exec)."""
    command = Path(f"/proc/{pid}/cmdline").read_bytes()
    control = _control_entry(pid)
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != pid:
            try:
                if (entry / "cmdline").read_bytes() != command:
                    continue
                if (
                    pid not in _ancestors(int(entry.name))
                    and _control_entry(int(entry.name)) == control
                ):
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _ancestors(pid: int) -> list[int]:
    """`pid`'s parent, its parent's parent and so on up to init (as far as readable)."""
    chain: list[int] = []
    while pid > 1 and len(chain) < 64:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
        chain.append(pid)
    return chain


def _control_entry(pid: int) -> bytes:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((v for v in environ if v.startswith(b"SNAPSHOT_CONTROL_DIR=")), b"")


@needs_root
async def test_a_launched_workload_that_exits_early_is_reported_with_status_and_output(
    tmp_path: Path, activities: LocalProcessActivities
) -> None:
    spec = workload(tmp_path, command=("sh", "-c", 'echo "no GPU found"; exit 7'))
    env = ActivityEnvironment()

    # It may end before the launch finds it, or while its readiness is awaited.
    try:
        launched = await env.run(
            activities.launch_workload, LaunchInput(workload=spec, checkpoint_id=CKPT)
        )
    except WorkloadExitedError as err:
        error = err
    else:
        request = AwaitReadyInput(workload=spec, checkpoint_id=CKPT, pid=launched.pid)
        with pytest.raises(WorkloadExitedError) as caught:
            await env.run(activities.await_workload_ready, request)
        error = caught.value
    assert str(error) == (
        "workload llama exited with status 7 before it was ready; last output:\nno GPU found"
    )


def test_workloads_inherit_only_harmless_variables() -> None:
    worker_env = {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "AWS_SECRET_ACCESS_KEY": "planted",
        "WARMSTART_TEMPORAL__ADDRESS": "temporal:7233",
    }
    assert inherited_env(worker_env) == {"PATH": "/usr/bin", "LANG": "C.UTF-8"}


@needs_root
async def test_a_launched_workload_sees_only_its_own_environment(
    tmp_path: Path, layout: NodeLayout
) -> None:
    base = inherited_env({"PATH": os.environ["PATH"], "AWS_SECRET_ACCESS_KEY": "planted"})
    activities = LocalProcessActivities(
        layout=layout, base_env=base, secret_environ={"NODE_KEY": "resolved-on-the-node"}
    )
    control = "$SNAPSHOT_CONTROL_DIR"
    script = f'env > "{control}/../env.txt"; touch "{control}/ready-for-snapshot"; sleep 60'
    spec = workload(
        tmp_path,
        command=("sh", "-c", script),
        env={"GREETING": "world"},
        secret_env={"API_KEY": {"env": "NODE_KEY"}},
    )
    env = ActivityEnvironment()
    launched = await env.run(
        activities.launch_workload, LaunchInput(workload=spec, checkpoint_id=CKPT)
    )
    try:
        request = AwaitReadyInput(workload=spec, checkpoint_id=CKPT, pid=launched.pid)
        await env.run(activities.await_workload_ready, request)
        seen = dict(
            line.split("=", 1)
            for line in (layout.workload("llama", CKPT).root / "env.txt").read_text().splitlines()
            if "=" in line
        )
    finally:
        stop = StopInput(pid=launched.pid, start_ticks=launched.start_ticks)
        await env.run(activities.stop_workload, stop)
    assert "AWS_SECRET_ACCESS_KEY" not in seen
    assert seen["GREETING"] == "world"
    assert seen["API_KEY"] == "resolved-on-the-node"
    assert seen["SNAPSHOT_CONTROL_DIR"] == str(layout.workload("llama", CKPT).control_dir)


def test_secrets_are_resolved_on_the_node(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "hf-token").write_text("hf_from_file\n")
    spec = workload(
        tmp_path, secret_env={"HF_TOKEN": {"file": "hf-token"}, "API_KEY": {"env": "NODE_KEY"}}
    )
    resolved = resolve_secrets(spec, {"NODE_KEY": "from-env"}, secrets)
    assert resolved == {"HF_TOKEN": "hf_from_file", "API_KEY": "from-env"}
    assert "hf_from_file" not in spec.model_dump_json()  # only the reference travels


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ({"file": "absent"}, r"secret S \(file:absent\): no .*/secrets/absent"),
        ({"env": "ABSENT"}, r"secret S \(env:ABSENT\): the node worker offers no variable ABSENT"),
    ],
)
def test_a_missing_secret_is_named(tmp_path: Path, ref: dict[str, str], message: str) -> None:
    spec = workload(tmp_path, secret_env={"S": ref})
    with pytest.raises(InvalidSpecError, match=message):
        resolve_secrets(spec, {}, tmp_path / "secrets")


@pytest.mark.parametrize(
    ("secret_env", "message"),
    [
        ({"S": {"file": "../../etc/shadow"}}, "must match"),
        ({"S": {"file": "a", "env": "B"}}, "exactly one of file or env"),
        ({"S": {}}, "exactly one of file or env"),
        ({"S": {"env": "not-a-var"}}, "should match pattern"),
        ({"1BAD": {"env": "OK"}}, "is not an environment variable name"),
    ],
)
def test_bad_secret_references_are_refused(
    tmp_path: Path, secret_env: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        workload(tmp_path, secret_env=secret_env)


async def test_a_failure_message_holds_a_short_tail_without_secret_values(
    tmp_path: Path, layout: NodeLayout, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    token = "tok_4d2a9e"
    activities = LocalProcessActivities(
        layout=layout, base_env={}, secret_environ={"NODE_KEY": token}
    )
    paths = layout.workload("llama", CKPT)
    paths.root.mkdir(parents=True)
    program = (
        f'for i in $(seq 50); do echo "line $i"; done; echo "auth with {token} failed"; exit 3'
    )
    launcher = 'sh -c "$1" >>"$2" 2>&1; echo $? >"$3"'
    paths.output_log.touch()
    shell = spawn(
        "sh", "-c", launcher, "launcher", program, str(paths.output_log), str(paths.exit_status)
    )
    spec = workload(tmp_path, secret_env={"API_KEY": {"env": "NODE_KEY"}})
    request = AwaitReadyInput(workload=spec, checkpoint_id=CKPT, pid=shell.pid)

    with pytest.raises(WorkloadExitedError) as caught:
        await ActivityEnvironment().run(activities.await_workload_ready, request)

    message = str(caught.value)
    assert token not in message and "auth with *** failed" in message
    output = message.split("last output:\n", 1)[1].splitlines()
    assert output[-1] == "auth with *** failed" and len(output) <= 8
