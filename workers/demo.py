"""`make demo`: cold start vs. restore of the sample inference worker, end to end.

Both times run from the request to the worker's first correct HTTP answer.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.error
import urllib.request

from rich.console import Console
from rich.table import Table
from temporalio.client import Client

from activities.host.processes import terminate
from api.identity import CheckpointIdentity, checkpoint_id
from api.workload import LocalWorkload
from workers import display
from workers.display import workflow_ui_url
from workers.embedded import embedded
from workers.operations import (
    LiveProgress,
    follow,
    local_capture_request,
    start_capture,
    start_restore,
)
from workers.ports import free_port
from workers.settings import Settings
from workflows.contracts import RestoreRequest

NAME = "demo-worker"
# The sample worker ships as a module of the distribution: no source-tree paths.
SAMPLE_WORKER = (sys.executable, "-m", "examples.inference_worker")
PROMPTS = ("The capital of France is", "Checkpoint and restore", "warm GPUs serve fast")
IDENTITY = CheckpointIdentity(model="warmstart/cpu-stand-in", backend_framework="vllm")


def generate(port: int, prompt: str, timeout: float = 5.0) -> str | None:
    """The worker's completion for `prompt`, or None while it is not answering."""
    body = json.dumps({"prompt": prompt, "max_tokens": 16}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/generate",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return str(json.loads(response.read())["completion"])
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return None


async def first_answer(port: int, started: float, expected: str | None, deadline: float) -> float:
    """Seconds from `started` to the first answer (equal to `expected` when given)."""
    while time.monotonic() < deadline:
        answer = await asyncio.to_thread(generate, port, PROMPTS[0])
        if answer is not None and (expected is None or answer == expected):
            return time.monotonic() - started
        await asyncio.sleep(0.005)
    raise TimeoutError(f"the worker on port {port} did not answer correctly in time")


async def cold_start(settings: Settings, port: int, console: Console) -> tuple[float, list[str]]:
    log_path = settings.home / "demo" / "cold-start.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [*SAMPLE_WORKER, "--port", str(port)]
    with log_path.open("wb") as log:
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(*command, stdout=log, stderr=log)
    try:
        with console.status("cold start: warming up the sample worker"):
            seconds = await first_answer(port, started, None, started + 300)
        answers = [generate(port, p) or "" for p in PROMPTS]
    finally:
        await terminate(proc.pid, grace_seconds=5)
        await proc.wait()
    return seconds, answers


async def capture(
    client: Client, settings: Settings, port: int, console: Console
) -> tuple[float, str]:
    workload = LocalWorkload(
        name=NAME,
        command=(*SAMPLE_WORKER, "--port", str(port)),
        cwd=str(settings.home),
        health_url=f"http://127.0.0.1:{port}/healthz",
    )
    request = local_capture_request(settings, workload, IDENTITY)
    settings.home.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    handle = await start_capture(client, request)
    with console.status("capture: starting") as status:

        def show(live: LiveProgress) -> None:
            status.update(f"capture: {display.describe_progress(live)}")

        result = await follow(client, handle, show)
    console.print(f"captured {result.checkpoint_id} version {result.version}", highlight=False)
    return time.monotonic() - started, _link(settings, handle.id, handle.result_run_id)


async def restore(
    client: Client, settings: Settings, port: int, expected: str, console: Console
) -> tuple[float, str, int]:
    request = RestoreRequest(
        name=NAME,
        checkpoint_id=checkpoint_id(IDENTITY),
        node=settings.node.name,
        control_task_queue=settings.node.control_task_queue,
    )
    started = time.monotonic()
    handle = await start_restore(client, request)
    seconds = await first_answer(port, started, expected, started + 120)
    result = await handle.result()
    return seconds, _link(settings, handle.id, handle.result_run_id), result.pid


def _link(settings: Settings, workflow_id: str, run_id: str | None) -> str:
    t = settings.temporal
    return workflow_ui_url(t.ui_url, t.namespace, workflow_id, run_id or "")


def report(
    console: Console, cold: float, cap: float, res: float, same: bool, links: list[str]
) -> None:
    table = Table(title="warmstart demo: sample inference worker")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    table.add_row("cold start (request → first correct answer)", f"{cold:.2f}")
    table.add_row("capture (workflow start → checkpoint committed)", f"{cap:.2f}")
    table.add_row("restore (request → first correct answer)", f"{res:.3f}")
    table.add_row("speedup (cold start / restore)", f"{cold / res:.1f}x")
    table.add_row("restored answers identical", "yes" if same else "NO")
    console.print(table)
    console.print("Web UI (run `warmstart dev` to reopen them after the demo):")
    for link in links:
        console.print(f"  {link}", highlight=False, soft_wrap=True)


async def run_demo(settings: Settings, *, console: Console, workload_port: int = 0) -> int:
    port = workload_port or free_port()
    console.rule("1. cold start")
    cold, answers = await cold_start(settings, port, console)
    console.print(f"first correct answer after {cold:.2f} s: {answers[0]!r}", highlight=False)
    async with embedded(settings) as client:
        console.rule("2. capture (the worker exits once the checkpoint is committed)")
        cap, capture_link = await capture(client, settings, port, console)
        console.rule("3. restore")
        res, restore_link, pid = await restore(client, settings, port, answers[0], console)
        restored = [generate(port, p) or "" for p in PROMPTS]
        await terminate(pid, grace_seconds=5)
    same = restored == answers
    for prompt, before, after in zip(PROMPTS, answers, restored, strict=True):
        console.print(f"  {prompt!r}: cold {before!r} | restored {after!r}", highlight=False)
    report(console, cold, cap, res, same, [capture_link, restore_link])
    return 0 if same else 1
