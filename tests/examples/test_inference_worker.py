"""Tests for the CPU stand-in inference worker used by the checkpoint/restore examples."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from workers.ports import free_port

ROUNDS = 3
DEADLINE_S = 30.0


def load_worker_module() -> ModuleType:
    import examples.inference_worker

    return examples.inference_worker


@dataclass
class Response:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(port: int, method: str, path: str, body: bytes | None = None) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return Response(resp.status, resp.read())
    finally:
        conn.close()


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            if condition():
                return
            if self.proc.poll() is not None:
                pytest.fail(f"worker exited ({self.proc.returncode}) before {what}:\n{self.log()}")
            time.sleep(0.05)
        pytest.fail(f"timed out waiting for {what}:\n{self.log()}")

    def healthy(self) -> bool:
        try:
            resp = request(self.port, "GET", "/healthz")
        except OSError:
            return False
        return resp.status == 200 and resp.body == b"ok"

    def wait_serving(self) -> None:
        self.wait_until(self.healthy, "/healthz to answer")

    def wait_exit(self) -> int:
        try:
            return self.proc.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker did not exit:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Worker:
        port = free_port()
        log_path = tmp_path / f"worker-{len(workers)}.log"
        child_env = {
            k: v
            for k, v in os.environ.items()
            if k not in {"SNAPSHOT_CONTROL_DIR", "DYN_SNAPSHOT_CONTROL_DIR", "WARMUP_ROUNDS"}
        }
        child_env.update(env or {})
        cmd = [sys.executable, "-m", "examples.inference_worker", "--port", str(port)]
        cmd += list(args) if "--warmup-rounds" in args else ["--warmup-rounds", str(ROUNDS), *args]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=child_env
            )
        worker = Worker(proc, port, log_path)
        workers.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in workers:
            worker.stop()


def generate(worker: Worker, prompt: str, max_tokens: int = 16) -> dict[str, Any]:
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens}).encode()
    resp = request(worker.port, "POST", "/generate", body)
    assert resp.status == 200, resp.body
    result: dict[str, Any] = resp.json()
    return result


def test_warm_up_is_deterministic_and_depends_on_rounds() -> None:
    module = load_worker_module()
    assert module.warm_up(2) == module.warm_up(2)
    assert module.warm_up(2).state_digest != module.warm_up(3).state_digest


def test_serves_deterministic_answers_across_processes(spawn: Callable[..., Worker]) -> None:
    first, second = spawn(), spawn()
    first.wait_serving()
    second.wait_serving()

    a = generate(first, "The quick brown fox", max_tokens=12)
    b = generate(second, "The quick brown fox", max_tokens=12)
    assert a == b
    assert len(a["tokens"]) == 12
    assert len(a["completion"].split()) == 12
    assert generate(first, "something else entirely") != a

    info_a = request(first.port, "GET", "/info").json()
    info_b = request(second.port, "GET", "/info").json()
    assert info_a["state_digest"] == info_b["state_digest"]
    assert info_a["instance_id"] != info_b["instance_id"]
    assert info_a["pid"] == first.proc.pid
    assert info_a["restored"] is False
    assert info_a["requests_served"] >= 2
    assert "serving on 127.0.0.1:" in first.log()


def test_cli_rounds_override_environment(spawn: Callable[..., Worker]) -> None:
    module = load_worker_module()
    worker = spawn("--warmup-rounds", "2", env={"WARMUP_ROUNDS": "5"})
    worker.wait_serving()
    assert request(worker.port, "GET", "/info").json()["state_digest"] == (
        module.warm_up(2).state_digest
    )


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"max_tokens": 4}',
        b'{"prompt": 5}',
        b'{"prompt": "hi", "max_tokens": 0}',
        b'{"prompt": "hi", "max_tokens": "many"}',
    ],
)
def test_bad_generate_request_is_rejected(spawn: Callable[..., Worker], body: bytes) -> None:
    worker = spawn()
    worker.wait_serving()
    resp = request(worker.port, "POST", "/generate", body)
    assert resp.status == 400
    assert isinstance(resp.json()["error"], str)


def wait_ready(worker: Worker, control_dir: Path) -> None:
    ready = control_dir / "ready-for-snapshot"
    worker.wait_until(ready.exists, "ready-for-snapshot")
    assert ready.read_text() == "ready\n"
    # The atomic write must not leave its temporary file behind.
    assert [p.name for p in control_dir.iterdir()] == ["ready-for-snapshot"]


def open_fds(pid: int) -> dict[int, str]:
    fd_dir = Path(f"/proc/{pid}/fd")
    return {int(fd.name): os.readlink(fd) for fd in fd_dir.iterdir()}


def test_snapshot_complete_makes_worker_exit(spawn: Callable[..., Worker], tmp_path: Path) -> None:
    control = tmp_path / "control"
    control.mkdir()
    worker = spawn(env={"SNAPSHOT_CONTROL_DIR": str(control)})
    wait_ready(worker, control)

    if sys.platform == "linux":
        # CRIU captures the process in this state: only stdio and the listener may be open.
        extra = {fd: target for fd, target in open_fds(worker.proc.pid).items() if fd > 2}
        assert len(extra) == 1, extra
        assert next(iter(extra.values())).startswith("socket:"), extra

    (control / "snapshot-complete").touch()
    assert worker.wait_exit() == 0
    assert "snapshot complete" in worker.log()
    assert "serving on" not in worker.log()


@pytest.mark.parametrize("env_name", ["SNAPSHOT_CONTROL_DIR", "DYN_SNAPSHOT_CONTROL_DIR"])
def test_restore_complete_starts_serving(
    spawn: Callable[..., Worker], tmp_path: Path, env_name: str
) -> None:
    control = tmp_path / "control"
    control.mkdir()
    worker = spawn(env={env_name: str(control)})
    wait_ready(worker, control)
    assert worker.proc.poll() is None

    (control / "restore-complete").touch()
    worker.wait_serving()
    info = request(worker.port, "GET", "/info").json()
    assert info["restored"] is True
    assert "restore complete" in worker.log()


@pytest.mark.parametrize(
    ("signum", "expected"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)], ids=["TERM", "INT"]
)
def test_signal_while_serving_exits_cleanly(
    spawn: Callable[..., Worker], signum: signal.Signals, expected: int
) -> None:
    worker = spawn()
    worker.wait_serving()
    worker.proc.send_signal(signum)
    assert worker.wait_exit() == expected
    assert "Traceback" not in worker.log()


def test_sigterm_while_waiting_for_snapshot_exits_cleanly(
    spawn: Callable[..., Worker], tmp_path: Path
) -> None:
    control = tmp_path / "control"
    control.mkdir()
    worker = spawn(env={"SNAPSHOT_CONTROL_DIR": str(control)})
    wait_ready(worker, control)
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait_exit() == 0
    assert "Traceback" not in worker.log()
