"""A node worker SIGKILLed during a real CRIU dump: real dev server, the node worker as its
own process (`warmstart worker --role node`), real CRIU, a real workload.

Afterwards: CRIU died with the worker, the capture ended Failed with NodeLost (not a
timeout or a cleanup's error), and the restarted node worker left no staging and no
workload running.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from temporalio.client import Client

from activities.host.layout import NodeLayout
from activities.host.processes import children, is_alive, start_ticks
from activities.local.state import read_status
from activities.storage.catalog import LocalCatalog
from activities.storage.store import CheckpointStore
from api.errors import PipelineFailedError
from api.reasons import Phase, Reason
from tests.conftest import needs_criu
from tests.pipeline import capture_request, shell_workload
from tests.waiting import wait_until
from workers.compose import control_worker
from workers.operations import follow, start_capture
from workers.settings import Settings

pytestmark = [needs_criu, pytest.mark.timeout(180)]

# 256 MiB of touched memory: a dump long enough to be caught running.
BIG = (
    "import os, time\n"
    "memory = bytearray(b'Z') * (256 << 20)\n"
    "open(os.environ['SNAPSHOT_CONTROL_DIR'] + '/ready-for-snapshot', 'w').close()\n"
    "time.sleep(600)\n"
)


class NodeWorker:
    """`warmstart worker --role node` in its own process, configured like a real node."""

    def __init__(self, client: Client, settings: Settings) -> None:
        self.env = {
            **os.environ,
            "WARMSTART_HOME": str(settings.home),
            "WARMSTART_NODE__NAME": settings.node.name,
            "WARMSTART_NODE__CONTROL_TASK_QUEUE": settings.node.control_task_queue,
            "WARMSTART_TEMPORAL__ADDRESS": client.service_client.config.target_host,
        }
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> subprocess.Popen[str]:
        self.stop()
        command = [sys.executable, "-c", "from workers.cli import main; main()"]
        self.proc = subprocess.Popen(
            [*command, "worker", "--role", "node"],
            env=self.env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "workers on …" once it polls
        assert line.startswith("workers on"), f"node worker did not start: {line!r}"
        return self.proc

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.proc = None


@pytest.fixture
def node(client: Client, settings: Settings) -> Iterator[NodeWorker]:
    worker = NodeWorker(client, settings)
    yield worker
    worker.stop()


def _criu_child(pid: int) -> int | None:
    for child in children(pid):
        try:
            if Path(f"/proc/{child}/comm").read_text().strip() == "criu":
                return child
        except OSError:
            continue
    return None


async def test_node_worker_killed_mid_dump(
    client: Client, settings: Settings, node: NodeWorker
) -> None:
    layout = NodeLayout(settings.home)
    store = CheckpointStore(settings.checkpoint_root)
    workload = shell_workload("big", f'exec {sys.executable} -c "{BIG}"')
    request = capture_request(settings, workload).model_copy(update={"node_timeout_seconds": 3})
    async with control_worker(client, settings):
        worker = await asyncio.to_thread(node.start)
        handle = await start_capture(client, request)

        criu: list[int] = []

        def dumping() -> bool:
            found = _criu_child(worker.pid)
            criu.extend([found] if found else [])
            return bool(criu)

        await wait_until(dumping, "CRIU to start dumping")
        record = layout.read_launch("big", request.checkpoint_id)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        await wait_until(lambda: not is_alive(criu[0]), "CRIU to die with its worker")
        assert store.staged(), "the dump had staged files when its worker died"

        with pytest.raises(PipelineFailedError) as err:
            await follow(client, handle, lambda _p: None, every=0.5)

    assert err.value.reason == Reason.NODE_LOST, err.value.message
    assert "dump_checkpoint" in err.value.message
    status = read_status(settings.home, "capture", "local", "big")
    assert status is not None and (status.phase, status.reason) == (Phase.FAILED, "NodeLost")
    assert LocalCatalog(settings.checkpoint_root).checkpoints() == []

    # The node comes back: before taking work it stops the orphaned workload and staging.
    await asyncio.to_thread(node.start)
    assert store.staged() == []
    assert start_ticks(record.pid) != record.start_ticks, "the workload still runs"
