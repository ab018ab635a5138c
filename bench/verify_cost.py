"""What a verified capture costs (decision 0045): its `verify` step against the whole capture.

Each workload is captured `--runs` times plain and `--runs` times with `verify`, alternating,
through the real pipeline (dev server, control and node workers, CRIU). Reported per
workload: the checkpoint's size, the capture's wall time (start to result) plain and
verified, the `verify` step's seconds (`step_seconds["verify"]`), what verifying added to
the wall time, and the step's share of the verified capture. Workloads: the sample inference worker
(sentinels, a health URL) and `tests/programs/memory_server.py` holding `--mib` MiB.

This machine kind backs guest memory lazily: `--warm` GiB are touched and freed first.
Needs root and CRIU >= 4.2. From the repository root:
`.venv/bin/python -m bench.verify_cost --runs 5`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowHandle

from activities.contracts import VerifyResult
from api.identity import CheckpointIdentity
from api.workload import LocalWorkload, Readiness
from bench.predump import warm
from workers.client import connect
from workers.compose import control_worker, node_worker
from workers.devserver import DevServer
from workers.operations import follow, local_capture_request, start_capture
from workers.ports import free_port
from workers.settings import NodeSettings, Settings, TemporalSettings

REPO = Path(__file__).resolve().parents[1]
MEMORY_SERVER = REPO / "tests" / "programs" / "memory_server.py"


@dataclass
class Runs:
    plain: list[float] = field(default_factory=list)
    verified: list[float] = field(default_factory=list)
    verify: list[float] = field(default_factory=list)
    stages: list[dict[str, float]] = field(default_factory=list)
    size: int = 0


@dataclass
class Captured:
    seconds: float
    step_seconds: dict[str, float]
    size: int
    verify_stages: dict[str, float]


async def capture(
    client: Client, settings: Settings, workload: LocalWorkload, *, verify: bool
) -> Captured:
    identity = CheckpointIdentity(model=f"bench/{workload.name}", backend_framework="vllm")
    request = local_capture_request(settings, workload, identity, verify=verify)
    started = time.monotonic()
    handle = await start_capture(client, request)
    result = await follow(client, handle, lambda _p: None)
    seconds = time.monotonic() - started
    stages = await verify_stages(client, handle) if verify else {}
    return Captured(seconds, result.step_seconds, result.size_bytes, stages)


async def verify_stages(client: Client, handle: WorkflowHandle[Any, Any]) -> dict[str, float]:
    """The test restore's own stages, from its activity's result in the run's history."""
    scheduled = 0
    async for event in handle.fetch_history_events():
        attrs = event.activity_task_scheduled_event_attributes
        if attrs.activity_type.name == "verify_version":
            scheduled = event.event_id
        done = event.activity_task_completed_event_attributes
        if scheduled and done.scheduled_event_id == scheduled:
            [found] = await client.data_converter.decode(done.result.payloads, [VerifyResult])
            return dict(found.stage_seconds)
    raise AssertionError(f"{handle.id}: no completed verify step")


def workloads(mib: int) -> Iterator[tuple[str, LocalWorkload]]:
    sample_port, memory_port = free_port(), free_port()
    worker = (sys.executable, "-m", "examples.inference_worker", "--port", str(sample_port))
    yield (
        "sample worker (sentinels)",
        LocalWorkload(
            name="bench-verify-sample",
            command=(*worker, "--warmup-rounds", "50"),
            cwd=str(REPO),
            health_url=f"http://127.0.0.1:{sample_port}/healthz",
            ready_timeout_seconds=120,
        ),
    )
    url = f"http://127.0.0.1:{memory_port}/"
    yield (
        f"memory server {mib} MiB (probe)",
        LocalWorkload(
            name="bench-verify-memory",
            command=(sys.executable, str(MEMORY_SERVER), str(memory_port), str(mib), "7"),
            cwd=str(REPO),
            readiness=Readiness(kind="http", http_url=url),
            ready_timeout_seconds=300,
        ),
    )


async def main(runs: int, mib: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        settings = Settings(
            home=Path(tmp),
            temporal=TemporalSettings(address=f"127.0.0.1:{port}"),
            node=NodeSettings(name="bench"),
        )
        server = DevServer(
            db_file=Path(tmp) / "t.db", port=port, ui_port=free_port(), headless=True
        )
        await server.start()
        rows: dict[str, Runs] = {}
        try:
            client = await connect(settings, wait_seconds=30)
            async with control_worker(client, settings), node_worker(client, settings):
                for label, workload in workloads(mib):
                    found = rows.setdefault(label, Runs())
                    await capture(client, settings, workload, verify=False)  # warm-up run
                    for _ in range(runs):
                        plain = await capture(client, settings, workload, verify=False)
                        found.plain.append(plain.seconds)
                        found.size = plain.size
                        verified = await capture(client, settings, workload, verify=True)
                        found.verified.append(verified.seconds)
                        found.verify.append(verified.step_seconds["verify"])
                        found.stages.append(verified.verify_stages)
        finally:
            await server.stop()
    print_table(rows, runs)


def print_table(rows: dict[str, Runs], runs: int) -> None:
    print(f"capture wall time (start -> result), plain vs verified, {runs} runs each, p50 (s)")
    columns = ("image", "plain", "verified", "verify", "added", "share")
    header = f"{'workload':32} " + " ".join(f"{c:>8}" for c in columns)
    print(header)
    print("-" * len(header))
    for label, found in rows.items():
        plain, verified = statistics.median(found.plain), statistics.median(found.verified)
        step = statistics.median(found.verify)
        print(
            f"{label:32} {found.size / 2**20:6.1f}Mi {plain:8.2f} {verified:8.2f} {step:8.2f} "
            f"{verified - plain:8.2f} {step / verified:7.0%}"
        )
    print("the verify step's own stages, p50 (ms)")
    for label, found in rows.items():
        names = list(found.stages[0])
        medians = {n: statistics.median(s.get(n, 0.0) for s in found.stages) for n in names}
        print(f"{label:32} " + ", ".join(f"{n} {v * 1000:.0f}" for n, v in medians.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mib", type=int, default=256, help="memory server size (MiB)")
    parser.add_argument("--warm", type=float, default=1.0, help="GiB to touch first")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warm(args.warm)
    asyncio.run(main(args.runs, args.mib))
