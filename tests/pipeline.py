"""Helpers for tests that drive the real pipelines (importable as `tests.pipeline`)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any

from temporalio.client import Client

from activities.contracts import RemoteStorage
from api.identity import CheckpointIdentity
from api.workload import LocalWorkload, Readiness
from workers.operations import follow, local_capture_request, start_capture, start_restore
from workers.settings import Settings
from workflows.contracts import CaptureRequest, CaptureResult, RestoreRequest, RestoreResult

REPO = Path(__file__).resolve().parents[1]


def sample_workload(name: str, port: int, *, rounds: int = 50) -> LocalWorkload:
    worker = (sys.executable, "-m", "examples.inference_worker")
    return LocalWorkload(
        name=name,
        command=(*worker, "--port", str(port), "--warmup-rounds", str(rounds)),
        cwd=str(REPO),
        health_url=f"http://127.0.0.1:{port}/healthz",
        ready_timeout_seconds=60,
    )


def shell_workload(name: str, script: str, *, readiness: Readiness | None = None) -> LocalWorkload:
    return LocalWorkload(
        name=name,
        command=("sh", "-c", script),
        cwd=str(REPO),
        readiness=readiness or Readiness(),
        ready_timeout_seconds=30,
    )


def capture_request(
    settings: Settings, workload: LocalWorkload, *, leave_running: bool = False
) -> CaptureRequest:
    identity = CheckpointIdentity(model=f"test/{workload.name}", backend_framework="vllm")
    return local_capture_request(settings, workload, identity, leave_running=leave_running)


async def capture(client: Client, request: CaptureRequest) -> CaptureResult:
    handle = await start_capture(client, request)
    return await follow(client, handle, lambda _s: None, every=0.2)


async def restore(
    client: Client,
    settings: Settings,
    name: str,
    ckpt: str,
    timeout: float = 30,
    *,
    storage: RemoteStorage | None = None,
    env: dict[str, str] | None = None,
) -> RestoreResult:
    request = RestoreRequest(
        env=env or {},
        name=name,
        checkpoint_id=ckpt,
        node=settings.node.name,
        answer_timeout_seconds=timeout,
        control_task_queue=settings.node.control_task_queue,
        storage=storage,
    )
    handle = await start_restore(client, request)
    return await follow(client, handle, lambda _s: None, every=0.2)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def listening_pids(port: int) -> set[int]:
    """The processes holding a TCP socket that listens on `port` (this network namespace),
    each found by its own descriptors: with SO_REUSEPORT many may listen on one port."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    inodes.add(fields[9])
    pids: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    pids.add(int(proc.name))
                    break
    return pids
