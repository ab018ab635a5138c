"""Record replay-test histories from real local captures and restores of the sample worker.

Run as root from the repository root: `.venv/bin/python -m scripts.record_histories`.
Writes tests/histories/*.json with a fixed identity and machine paths replaced, so the
committed files say nothing about the machine that recorded them:

- capture-local.json               a capture that committed a checkpoint
- capture-local-failed.json        a capture whose workload exited before it was ready
- restore-local.json               a restore started with its search attributes (eager)
- restore-local-attrs-upserted.json  a restore whose starter set none (the workflow upserts)
- capture-local-cancelled.json     a capture cancelled while it awaited readiness
- capture-local-verified.json      a verified capture whose test restore answered
- capture-local-verify-failed.json a verified capture whose test restore did not answer

`--only verified` records the last two alone (the others then keep their older runs).
"""

from __future__ import annotations

import argparse
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
from api.workload import LocalWorkload, Readiness
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


async def record_verified(client: Client, settings: Settings, replacements: dict[str, str]) -> None:
    """Verified captures (decision 0045): one whose test restore answered, one whose test
    restore did not (a program that answers only as the process it started as)."""
    programs = REPO / "tests" / "programs"
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    for name, program, history in (
        ("recorded-verified", "token_server.py", "capture-local-verified.json"),
        ("recorded-verify-fails", "process_bound_server.py", "capture-local-verify-failed.json"),
    ):
        workload = LocalWorkload(
            name=name,
            command=(sys.executable, str(programs / program), str(port)),
            cwd=str(settings.home),
            readiness=Readiness(kind="http", http_url=url),
        )
        request = capture_request(settings, workload).model_copy(
            update={"verify": True, "verify_answer_seconds": 2.0}
        )
        try:
            await follow(client, await start_capture(client, request), lambda _p: None)
        except PipelineFailedError as err:
            print(f"failed as expected: [{err.reason}] {err.message.splitlines()[0]}")
        workflow_id = f"capture/local/{name}/{request.checkpoint_id}"
        await save(client, workflow_id, history, replacements)


async def main(only: str) -> None:
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
                if only == "all":
                    await record(client, settings, replacements)
                await record_verified(client, settings, replacements)
        finally:
            await server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=("all", "verified"), default="all")
    asyncio.run(main(parser.parse_args().only))
