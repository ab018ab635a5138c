"""A node worker's start stops workloads and removes staging of captures that ended
without cleaning up, and leaves those of running captures alone."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowHandle

from activities.host.files import write_atomically
from activities.host.layout import LaunchRecord, NodeLayout
from activities.host.processes import is_alive, start_ticks
from activities.storage.store import CheckpointStore
from api.identity import CheckpointIdentity
from api.workload import LocalWorkload
from workers.housekeeping import stop_orphaned_workloads, sweep_orphaned_staging
from workers.operations import start_capture
from workflows.contracts import CaptureRequest
from workflows.visibility import CHECKPOINT_ID


def _launched(layout: NodeLayout, name: str, workflow_id: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["sleep", "600"])
    workload = LocalWorkload(name=name, command=("sleep", "600"), cwd="/")
    record = LaunchRecord(
        workload=workload, pid=proc.pid, start_ticks=start_ticks(proc.pid), workflow_id=workflow_id
    )
    paths = layout.workload(name, "0123456789abcdef")
    paths.root.mkdir(parents=True)
    write_atomically(paths.launch_record, record.model_dump_json().encode(), durable=False)
    return proc


async def _running_capture(client: Client, name: str) -> WorkflowHandle[Any, Any]:
    """A capture that stays running: no worker polls its queue."""
    workload = LocalWorkload(name=name, command=("sleep", "600"), cwd="/")
    identity = CheckpointIdentity(model=f"m/{uuid.uuid4()}", backend_framework="vllm")
    request = CaptureRequest.local(workload, identity, control_task_queue="nobody-polls")
    return await start_capture(client, request)


async def test_stops_workloads_of_ended_captures_and_leaves_running_ones(
    client: Client, tmp_path: Path
) -> None:
    layout = NodeLayout(tmp_path)
    # A capture still running (no worker polls its queue, so it waits at its first task).
    running = await _running_capture(client, "live")
    live = _launched(layout, "live", running.id)
    orphan = _launched(layout, "orphan", f"capture/test/{uuid.uuid4()}")  # no such workflow
    try:
        stopped = await stop_orphaned_workloads(client, layout)
        assert [record.workload.name for record in stopped] == ["orphan"]
        assert orphan.wait(timeout=10) is not None
        assert is_alive(live.pid)

        await running.terminate("the test is done with it")
        stopped = await stop_orphaned_workloads(client, layout)
        assert [record.workload.name for record in stopped] == ["live"]
        assert live.wait(timeout=10) is not None
    finally:
        for proc in (live, orphan):
            proc.kill()
            proc.wait()


async def test_removes_staging_no_running_capture_writes(client: Client, tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    running = await _running_capture(client, "dumping")
    try:
        ckpt = (await running.describe()).typed_search_attributes.get(CHECKPOINT_ID)
        assert ckpt is not None
        # The sweep asks visibility, which lists a started capture a moment later.
        query = f"{CHECKPOINT_ID.name} = '{ckpt}' AND ExecutionStatus = 'Running'"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while not [run async for run in client.list_workflows(query, limit=1)]:
            assert loop.time() < deadline, "the running capture never became visible"
            await asyncio.sleep(0.2)
        live = store.fresh_staging(ckpt, "v1")
        orphan = store.fresh_staging("0123456789abcdef", "v1")
        (orphan / "pages-1.img").write_bytes(b"x" * 4096)

        assert await sweep_orphaned_staging(client, store) == [orphan]
        assert live.is_dir() and not orphan.exists()
    finally:
        await running.terminate("the test is done with it")
    # Visibility (what the sweep asks) shows the termination a moment after it happened.
    deadline = loop.time() + 20
    while not (removed := await sweep_orphaned_staging(client, store)):
        assert loop.time() < deadline, "the ended capture never left the running list"
        await asyncio.sleep(0.2)
    assert removed == [live]
