"""Record replay-test histories from real local captures and restores of the sample worker.

Run as root from the repository root: `.venv/bin/python -m scripts.record_histories`.
Writes tests/histories/*.json with a fixed identity and machine paths replaced, so the
committed files say nothing about the machine that recorded them:

- capture-local.json               a capture that committed a checkpoint
- capture-local-failed.json        a capture whose workload exited before it was ready
- restore-local.json               a restore started with its search attributes (eager)
- restore-local-attrs-upserted.json  a restore whose starter set none (the workflow upserts)
- capture-local-cancelled.json     a capture cancelled while it awaited readiness
"""

from __future__ import annotations

import asyncio
import base64
import json
import platform
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from temporalio.client import Client

from activities.host.processes import terminate
from api.errors import PipelineFailedError
from api.identity import CheckpointIdentity
from api.naming import node_task_queue, restore_workflow_id
from api.workload import LocalWorkload
from workers.client import connect
from workers.compose import control_worker, node_worker
from workers.devserver import DevServer
from workers.operations import (
    LiveProgress,
    follow,
    local_capture_request,
    start_capture,
    start_restore,
)
from workers.ports import free_port
from workers.settings import NodeSettings, Settings, TemporalSettings
from workflows.contracts import CaptureRequest, RestoreRequest
from workflows.restore import RestoreWorkflow

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "histories"
IDENTITY = "warmstart-recorder"


def scrub(value: Any, replacements: dict[str, str]) -> Any:
    """Replace machine paths everywhere, including inside JSON payloads."""
    if isinstance(value, dict):
        encoding = value.get("metadata", {}).get("encoding")
        if encoding and base64.b64decode(encoding) == b"json/plain" and "data" in value:
            text = base64.b64decode(value["data"]).decode()
            value = {**value, "data": base64.b64encode(scrub(text, replacements).encode()).decode()}
        return {k: scrub(v, replacements) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, replacements) for v in value]
    if isinstance(value, str):
        for old, new in replacements.items():
            value = value.replace(old, new)
    return value


async def save(client: Client, workflow_id: str, name: str, replacements: dict[str, str]) -> None:
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    data = scrub(history.to_json_dict(), replacements)
    path = OUT / name
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path.relative_to(REPO)} ({len(data['events'])} events)")


def capture_request(settings: Settings, workload: LocalWorkload) -> CaptureRequest:
    identity = CheckpointIdentity(model=f"recorded/{workload.name}", backend_framework="vllm")
    return local_capture_request(settings, workload, identity)


async def record(client: Client, settings: Settings, replacements: dict[str, str]) -> None:
    port = free_port()
    worker = (sys.executable, "-m", "examples.inference_worker", "--port", str(port))
    sample = LocalWorkload(
        name="recorded",
        command=worker,
        cwd=str(settings.home),
        health_url=f"http://127.0.0.1:{port}/healthz",
    )
    captured = await follow(
        client, await start_capture(client, capture_request(settings, sample)), print
    )
    await save(
        client,
        f"capture/local/recorded/{captured.checkpoint_id}",
        "capture-local.json",
        replacements,
    )

    request = RestoreRequest(
        name="recorded",
        checkpoint_id=captured.checkpoint_id,
        version=captured.version,
        node=settings.node.name,
        control_task_queue=settings.node.control_task_queue,
    )
    handle = await start_restore(client, request)
    restored = await handle.result()
    await terminate(restored.pid, grace_seconds=2)
    await save(client, handle.id, "restore-local.json", replacements)

    bare = await client.start_workflow(
        RestoreWorkflow.run,
        request,
        id=restore_workflow_id(namespace="local", name="recorded", key=str(uuid.uuid4())),
        task_queue=node_task_queue(settings.node.name),
    )
    restored = await bare.result()
    await terminate(restored.pid, grace_seconds=2)
    await save(client, bare.id, "restore-local-attrs-upserted.json", replacements)

    failing = LocalWorkload(
        name="recorded-fails", command=("sh", "-c", "echo no GPU; exit 3"), cwd=str(settings.home)
    )
    request_fails = capture_request(settings, failing)
    try:
        await follow(client, await start_capture(client, request_fails), lambda _p: None)
    except PipelineFailedError as err:
        print(f"failed as expected: [{err.reason}] {err.message.splitlines()[0]}")
    await save(
        client,
        f"capture/local/recorded-fails/{request_fails.checkpoint_id}",
        "capture-local-failed.json",
        replacements,
    )

    never_ready = LocalWorkload(
        name="recorded-cancelled", command=("sleep", "600"), cwd=str(settings.home)
    )
    cancelled = await start_capture(client, capture_request(settings, never_ready))
    awaiting = asyncio.Event()

    def seen(live: LiveProgress) -> None:
        if live.progress.step == "await-ready":
            awaiting.set()

    following = asyncio.ensure_future(follow(client, cancelled, seen, every=0.1))
    await awaiting.wait()
    await cancelled.cancel()
    try:
        await following
    except PipelineFailedError as err:
        print(f"cancelled as expected: [{err.reason}] {err.message}")
    await save(client, cancelled.id, "capture-local-cancelled.json", replacements)


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        settings = Settings(
            home=Path(tmp),
            temporal=TemporalSettings(address=f"127.0.0.1:{port}", identity=IDENTITY),
            node=NodeSettings(name="local"),
        )
        server = DevServer(
            db_file=Path(tmp) / "temporal.db", port=port, ui_port=free_port(), headless=True
        )
        await server.start()
        replacements = {
            tmp: "/var/lib/warmstart",
            str(REPO): "/opt/warmstart",
            sys.executable: "/usr/bin/python3",
            platform.release(): "6.1.0-generic",
        }
        try:
            client = await connect(settings, wait_seconds=30)
            async with control_worker(client, settings), node_worker(client, settings):
                OUT.mkdir(exist_ok=True)
                await record(client, settings, replacements)
        finally:
            await server.stop()


if __name__ == "__main__":
    asyncio.run(main())
