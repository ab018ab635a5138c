"""`warmstart dev`: dev server with persistent state and Web UI, workers, clean stop on Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import urllib.request
from pathlib import Path

from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client

from tests.conftest import needs_criu
from workers.ports import free_port
from workflows.visibility import ALL_KEYS

WARMSTART = str(Path(sys.executable).parent / "warmstart")


async def _read_until(stream: asyncio.StreamReader, marker: str, timeout: float) -> str:
    seen = ""
    async with asyncio.timeout(timeout):
        while marker not in seen:
            line = await stream.readline()
            if not line:
                break
            seen += line.decode()
    return seen


@needs_criu
async def test_dev_serves_ui_registers_attributes_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port, ui_port = free_port(), free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "COLUMNS": "200",
        "WARMSTART_HOME": str(tmp_path / "state"),
    }
    proc = await asyncio.create_subprocess_exec(
        WARMSTART,
        "dev",
        "--port",
        str(port),
        "--ui-port",
        str(ui_port),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        banner = await _read_until(proc.stdout, "Ctrl-C", 60)
        assert f"Web UI: http://localhost:{ui_port}" in banner, banner
        html = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/", timeout=10).read()
        )
        assert b"<html" in html.lower()
        client = await Client.connect(f"127.0.0.1:{port}")
        listed = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace="default")
        )
        assert {k.name for k in ALL_KEYS} <= set(listed.custom_attributes)
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert (tmp_path / "state" / "temporal.db").is_file()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
