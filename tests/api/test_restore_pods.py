"""The standby entrypoint of restore targets, run by the real /bin/sh; the test plays the
node (it writes the sentinels) and the restored process (a process of its own, so that its
zombie stays readable). The pod shaping itself is tested through the webhook
(tests/workers/test_webhook.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.restore_pods import STANDBY_DEADLINE_ENV, STANDBY_NAME, STANDBY_SCRIPT

pytestmark = pytest.mark.timeout(30)
Started = list[subprocess.Popen[str]]
COLD = ["/bin/sh", "-c", 'echo "cold:$#:$*"', "workload", "a b", "c"]


@pytest.fixture
def control(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def started() -> Iterator[Started]:
    procs: Started = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)  # reaps it and closes its pipe


def standby(control: Path, started: Started) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        ["/bin/sh", "-c", STANDBY_SCRIPT, STANDBY_NAME, *COLD],
        env={"SNAPSHOT_CONTROL_DIR": str(control), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        text=True,
    )
    started.append(proc)
    return proc


def workload(started: Started, script: str) -> subprocess.Popen[str]:
    """The "restored process": ours, so that it stays a zombie until we reap it."""
    proc = subprocess.Popen(["/bin/sh", "-c", script], text=True)
    started.append(proc)
    return proc


def zombie(proc: subprocess.Popen[str]) -> None:
    """Wait (without reaping) until `proc` has exited."""
    stat = Path(f"/proc/{proc.pid}/stat")
    deadline = time.monotonic() + 10
    while stat.read_text().rpartition(") ")[2][0] != "Z":
        assert time.monotonic() < deadline, f"process {proc.pid} did not exit"
        time.sleep(0.005)


def sleeping(proc: subprocess.Popen[str], seconds: str) -> None:
    """Wait until the standby runs `sleep <seconds>`: 0.05 while it waits for a sentinel, 1
    while it watches the restored process."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    deadline = time.monotonic() + 10
    while True:
        assert proc.poll() is None, "the standby exited"
        assert time.monotonic() < deadline, f"the standby never ran sleep {seconds}"
        for child in children.read_text().split():
            try:
                if Path(f"/proc/{child}/cmdline").read_bytes() == f"sleep\0{seconds}\0".encode():
                    return
            except FileNotFoundError:
                pass
        time.sleep(0.005)


def publish(control: Path, name: str, text: str) -> None:
    """Write a sentinel as the node does: to a temporary name, then rename."""
    (control / f".{name}.tmp").write_text(text)
    (control / f".{name}.tmp").rename(control / name)


def test_restarted_after_a_restore_it_starts_cold(control: Path, started: Started) -> None:
    publish(control, "restore-complete", "1\n")
    proc = standby(control, started)
    out, _ = proc.communicate(timeout=10)
    assert (proc.returncode, out) == (0, "cold:2:a b c\n")


def test_a_failed_restore_starts_the_original_command(control: Path, started: Started) -> None:
    proc = standby(control, started)
    sleeping(proc, "0.05")
    publish(control, "restore-failed", "criu restore failed\n")
    out, _ = proc.communicate(timeout=10)
    assert (proc.returncode, out) == (0, "cold:2:a b c\n")


def test_a_cold_start_leaves_dynamos_snapshot_mode_off(control: Path, started: Started) -> None:
    """A Dynamo worker started cold with DYN_SNAPSHOT_CONTROL_DIR set would wait for a
    snapshot for ever, and with SNAPSHOT_RESTORE_STANDBY=1 it would only sleep."""
    show = (
        'echo "${DYN_SNAPSHOT_CONTROL_DIR-unset}:${SNAPSHOT_RESTORE_STANDBY-unset}:'
        '$SNAPSHOT_CONTROL_DIR"'
    )
    env = {
        "SNAPSHOT_CONTROL_DIR": str(control),
        "DYN_SNAPSHOT_CONTROL_DIR": str(control),
        "SNAPSHOT_RESTORE_STANDBY": "1",
        "PATH": "/usr/bin:/bin",
    }
    publish(control, "restore-failed", "criu restore failed\n")
    proc = subprocess.Popen(
        ["/bin/sh", "-c", STANDBY_SCRIPT, STANDBY_NAME, "/bin/sh", "-c", show],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    started.append(proc)
    out, _ = proc.communicate(timeout=10)
    assert (proc.returncode, out) == (0, f"unset:unset:{control}\n")


def test_it_exits_with_the_restored_process_status(control: Path, started: Started) -> None:
    restored = workload(started, "exit 7")
    zombie(restored)
    proc = standby(control, started)
    sleeping(proc, "0.05")
    publish(control, "restore-complete", f"{restored.pid}\n")
    assert proc.wait(timeout=10) == 7
    assert proc.stdout is not None and proc.stdout.read() == ""


def test_it_lives_while_the_restored_process_lives(control: Path, started: Started) -> None:
    restored = workload(started, "exec sleep 60")
    proc = standby(control, started)
    sleeping(proc, "0.05")
    publish(control, "restore-complete", f"{restored.pid}\n")
    sleeping(proc, "1")
    restored.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=10) == 128 + signal.SIGKILL


def test_sigterm_goes_to_the_restored_process(control: Path, started: Started) -> None:
    restored = workload(started, "exec sleep 60")
    proc = standby(control, started)
    sleeping(proc, "0.05")
    publish(control, "restore-complete", f"{restored.pid}\n")
    sleeping(proc, "1")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    assert restored.wait(timeout=1) == -signal.SIGTERM


@pytest.mark.parametrize("content", ["", "abc\n", "-1\n"])
def test_a_sentinel_without_a_pid_exits_1(control: Path, started: Started, content: str) -> None:
    proc = standby(control, started)
    sleeping(proc, "0.05")
    publish(control, "restore-complete", content)
    assert proc.wait(timeout=10) == 1


def test_the_script_survives_kubernetes_command_expansion() -> None:
    """Kubernetes turns `$$` into `$` and `$(NAME)` into NAME's value in a command."""
    assert "$$" not in STANDBY_SCRIPT
    assert not re.search(r"\$\([A-Za-z_]", STANDBY_SCRIPT)


def test_with_no_node_acting_it_starts_cold_at_its_own_deadline(
    control: Path, started: Started
) -> None:
    proc = subprocess.Popen(
        ["/bin/sh", "-c", STANDBY_SCRIPT, STANDBY_NAME, *COLD],
        env={
            "SNAPSHOT_CONTROL_DIR": str(control),
            "PATH": "/usr/bin:/bin",
            STANDBY_DEADLINE_ENV: "1",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started.append(proc)
    begun = time.monotonic()
    out, err = proc.communicate(timeout=10)
    assert (proc.returncode, out) == (0, "cold:2:a b c\n")
    assert "no restore within 1 s; starting cold" in err
    assert 1.0 <= time.monotonic() - begun < 5


@pytest.mark.skipif(os.geteuid() != 0, reason="a PID namespace of its own needs root")
def test_a_cold_start_first_kills_what_a_dead_restore_left(control: Path, started: Started) -> None:
    """As in a pod: the standby is PID 1 of its PID namespace, and a tree whose restore
    died with its node worker is reparented to it (CRIU runs in that namespace, so its
    children go to the namespace's init when it dies; here a shell entered into the
    namespace plays CRIU and is killed). The cold start never runs beside that tree."""
    serving = ["/bin/sh", "-c", "echo cold; exec sleep 60"]  # lives on, as a workload does
    standby_argv = ["/bin/sh", "-c", STANDBY_SCRIPT, STANDBY_NAME, *serving]
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", *standby_argv],
        env={"SNAPSHOT_CONTROL_DIR": str(control), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        text=True,
    )
    started.append(proc)
    init = wait_for_child(proc.pid)  # the standby, PID 1 of the new namespace
    try:
        entering = subprocess.Popen(
            ["nsenter", "--target", str(init), "--pid", "--", "/bin/sh", "-c", "sleep 60 & wait"]
        )
        restorer = wait_for_child(entering.pid)  # in the standby's namespace
        left = wait_for_child(restorer)
        os.kill(restorer, signal.SIGKILL)
        entering.wait(timeout=10)
        deadline = time.monotonic() + 10
        while parent(left) != init:  # reparented to the namespace's init, the standby
            assert time.monotonic() < deadline, "the left-over tree was not reparented"
            time.sleep(0.01)
        assert state(left) not in ("Z", "")
        publish(control, "restore-failed", "node worker lost\n")
        assert proc.stdout is not None and proc.stdout.readline() == "cold\n"
        # Killed by the standby before it started cold (SIGKILL lands asynchronously).
        deadline = time.monotonic() + 10
        while state(left) not in ("Z", ""):
            assert time.monotonic() < deadline, f"the left-over tree lives on ({state(left)})"
            time.sleep(0.01)
        assert proc.poll() is None  # the cold start runs on
    finally:
        os.kill(init, signal.SIGKILL)  # the namespace's init: all of it goes
        proc.wait(timeout=10)


def wait_for_child(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    deadline = time.monotonic() + 10
    while not children.read_text().split():
        assert time.monotonic() < deadline, f"process {pid} started no child"
        time.sleep(0.005)
    return int(children.read_text().split()[0])


def parent(pid: int) -> int:
    """Its parent's PID; 0 when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(") ")[2].split()[1])
    except FileNotFoundError:
        return 0


def state(pid: int) -> str:
    """Its state letter (Z: dead, not yet reaped); "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(") ")[2].split()[0]
    except FileNotFoundError:
        return ""
