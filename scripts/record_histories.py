"""Record replay-test histories from a real local capture and restore of the sample worker.

Run as root from the repository root: `.venv/bin/python scripts/record_histories.py`.
Writes tests/histories/*.json with a fixed identity and machine paths replaced, so the
committed files say nothing about the machine that recorded them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

from temporalio.client import Client

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import free_port  # noqa: E402
from tests.pipeline import capture, capture_request, restore, sample_workload  # noqa: E402
from workers.client import connect  # noqa: E402
from workers.devserver import DevServer  # noqa: E402
from workers.runtime import control_worker, node_worker  # noqa: E402
from workers.settings import NodeSettings, Settings, TemporalSettings  # noqa: E402

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


async def save(client: Client, workflow_id: str, path: Path, replacements: dict[str, str]) -> None:
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    data = scrub(history.to_json_dict(), replacements)
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path.relative_to(REPO)} ({len(data['events'])} events)")


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        settings = Settings(
            home=Path(tmp),
            temporal=TemporalSettings(address=f"127.0.0.1:{port}", identity=IDENTITY),
            node=NodeSettings(name="local"),
        )
        server = DevServer(db_file=Path(tmp) / "temporal.db", port=port, ui_port=free_port(),
                           headless=True)  # fmt: skip
        await server.start()
        try:
            client = await connect(settings, wait_seconds=30)
            async with control_worker(client, settings), node_worker(client, settings):
                request = capture_request(settings, sample_workload("recorded", free_port()))
                captured = await capture(client, request)
                restored = await restore(client, settings, "recorded", captured.checkpoint_id)
                from activities.processes import terminate

                await terminate(restored.pid, grace_seconds=2)
            replacements = {tmp: "/var/lib/warmstart", str(REPO): "/opt/warmstart",
                            sys.executable: "/usr/bin/python3",
                            platform.release(): "6.1.0-generic"}  # fmt: skip
            out = REPO / "tests" / "histories"
            out.mkdir(exist_ok=True)
            await save(client, f"capture/local/recorded/{captured.checkpoint_id}",
                       out / "capture-local.json", replacements)  # fmt: skip
            async for wf in client.list_workflows("WorkflowType = 'RestoreWorkflow'"):
                await save(client, wf.id, out / "restore-local.json", replacements)
        finally:
            await server.stop()


if __name__ == "__main__":
    asyncio.run(main())
