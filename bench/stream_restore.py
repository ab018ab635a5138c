"""Streamed restore (decision 0039) against download-then-restore of the same version from
the same S3 server.

A workload holds N GiB of seeded (never zero) memory and answers `/` by touching 16 pages
of it (`tests/programs/memory_server.py`); it is captured once per size by a node that
uploads it (page images stored plain: `WARMSTART_STORAGE__COMPRESSION=off`, see the
decision) and then forgets it. Three node workers that lack the version restore it,
alternating, each from an emptied node cache: one downloads then restores eagerly (the
default), one downloads then restores lazily, one streams. Each is timed from the request
to the first correct answer (a separate poller process) and to full residency. The S3
server is moto's, in a process of its own. Needs root, CRIU >= 4.2 and userfaultfd. Usage,
from the repository root: `.venv/bin/python -m bench.stream_restore --sizes 1 --runs 3`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import boto3
from temporalio.client import Client

from activities.host.processes import terminate
from api.identity import CheckpointIdentity
from api.workload import LocalWorkload, Readiness
from bench.lazy_restore import PROGRAM, SEED, Timing, expected_answer, warm_host_memory
from workers.client import connect
from workers.compose import control_worker, node_worker
from workers.devserver import DevServer
from workers.operations import follow, local_capture_request, start_capture, start_restore
from workers.ports import free_port
from workers.settings import (
    CriuSettings,
    NodeSettings,
    Settings,
    StorageSettings,
    TemporalSettings,
)
from workflows.contracts import RestoreRequest

CONTENDERS = ("download+eager", "download+lazy", "streamed")
KEY = "bench"


@contextlib.contextmanager
def s3_server(port: int):  # type: ignore[no-untyped-def]
    """moto's S3 server in a process of its own, stopped by its PID."""
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
                break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def node(settings: Settings, name: str, **criu: bool) -> Settings:
    stream = criu.pop("stream", False)
    # One home: the captured workload's paths must be the restoring node's own; each run
    # empties the node cache first.
    return replace(
        settings,
        node=replace(settings.node, name=name),
        criu=CriuSettings(**criu),
        storage=replace(settings.storage, stream_restores=stream),
    )


@contextlib.asynccontextmanager
async def nodes(client: Client, base: Settings) -> AsyncIterator[dict[str, Settings]]:
    found = {
        "capture": node(base, "capture"),
        "download+eager": node(base, "eager"),
        "download+lazy": node(base, "lazy", lazy_pages=True),
        "streamed": node(base, "stream", lazy_pages=True, stream=True),
    }
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(control_worker(client, base))
        for settings in found.values():
            await stack.enter_async_context(node_worker(client, settings))
        yield found


async def main(sizes: list[float], runs: int) -> None:
    warm = max(3.0, 2 * max(sizes) + 1)
    print(f"warming host memory: allocating, touching and freeing {warm:g} GiB once", flush=True)
    warm_host_memory(warm)
    os.environ.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=KEY)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, s3_server(free_port()) as endpoint:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket="bench"
        )
        port = free_port()
        base = Settings(
            home=Path(tmp),
            temporal=TemporalSettings(address=f"127.0.0.1:{port}"),
            node=NodeSettings(name="capture"),
            storage=StorageSettings(
                s3_bucket="bench", s3_endpoint=endpoint, s3_region="us-east-1", compression="off"
            ),
        )
        server = DevServer(
            db_file=Path(tmp) / "t.db", port=port, ui_port=free_port(), headless=True
        )
        await server.start()
        try:
            client = await connect(base, wait_seconds=30)
            async with nodes(client, base) as found:
                for gib in sizes:
                    rows.append(await measure(client, found, gib, runs))
        finally:
            await server.stop()
    print_table(rows, runs)


async def measure(
    client: Client, found: dict[str, Settings], gib: float, runs: int
) -> tuple[float, dict[str, list[tuple[float, float, dict[str, float]]]], float]:
    mib = int(gib * 1024)
    app_port = free_port()
    url = f"http://127.0.0.1:{app_port}/"
    capture = found["capture"]
    workload = LocalWorkload(
        name=f"stream-{mib}",
        command=(sys.executable, str(PROGRAM), str(app_port), str(mib), str(SEED)),
        cwd=str(PROGRAM.parent),
        readiness=Readiness(kind="http", http_url=url),
        ready_timeout_seconds=300,
    )
    identity = CheckpointIdentity(model=f"bench/{workload.name}", backend_framework="vllm")
    request = local_capture_request(capture, workload, identity)
    result = await follow(client, await start_capture(client, request), lambda _p: None)
    shutil.rmtree(capture.checkpoint_root / result.checkpoint_id)  # only the bucket has it
    pages = mib << 20
    storage = capture.storage.location()
    assert storage is not None
    get_ms = range_get_ms(storage.endpoint, storage.bucket, result.checkpoint_id, result.version)
    expected = expected_answer(mib)
    times: dict[str, list[tuple[float, float, dict[str, float]]]] = {n: [] for n in CONTENDERS}
    for turn in range(runs):
        for name in CONTENDERS[turn % 3 :] + CONTENDERS[: turn % 3]:  # each goes first once
            settings = found[name]
            shutil.rmtree(settings.home / "cache", ignore_errors=True)  # the node lacks it
            restore = RestoreRequest(
                name=workload.name,
                checkpoint_id=result.checkpoint_id,
                version=result.version,
                node=settings.node.name,
                control_task_queue=settings.node.control_task_queue,
                answer_timeout_seconds=300,
                storage=storage,
            )
            async with Timing(url, expected, app_port, pages) as timing:
                handle = await start_restore(client, restore)
                restored = await handle.result()
                answered, resident, pid = await timing.results()
            assert ("stream" in restored.stage_seconds) == (name == "streamed"), restored
            times[name].append((answered, resident, restored.stage_seconds))
            await terminate(pid, grace_seconds=2)
            await asyncio.sleep(1)  # the lazy helpers see their process gone and end
    return gib, times, get_ms


def range_get_ms(endpoint: str, bucket: str, checkpoint_id: str, version: str) -> float:
    """What one ranged GET of 1 MiB of the version's page image costs on this server (median
    of 5): the streamed restore's unit of work on a fault."""
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    key = f"{checkpoint_id}/versions/{version}/criu/pages-1.img"
    spent = []
    for i in range(5):
        started = time.monotonic()
        s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={i << 20}-{((i + 1) << 20) - 1}")[
            "Body"
        ].read()
        spent.append(time.monotonic() - started)
    return 1000 * statistics.median(spent)


def print_table(
    rows: list[tuple[float, dict[str, list[tuple[float, float, dict[str, float]]]], float]],
    runs: int,
) -> None:
    print(f"\nmedians of {runs} alternating runs; ratios against download+eager")
    print(
        f"{'size':>6} {'contender':<15} {'first answer s':>14} {'resident s':>10} "
        f"{'answer x':>8} {'sooner x':>8}  stages (s)"
    )
    for gib, times, get_ms in rows:
        medians = {
            name: (
                statistics.median(a for a, _, _ in values),
                statistics.median(r for _, r, _ in values),
                values[len(values) // 2][2],
            )
            for name, values in times.items()
        }
        base = medians["download+eager"][0]
        for name, (answer, resident, stages) in medians.items():
            staged = " ".join(f"{k}={v:.3f}" for k, v in stages.items())
            print(
                f"{gib:>5g}G {name:<15} {answer:>14.3f} {resident:>10.3f} "
                f"{answer / base:>8.2f} {base / answer:>8.2f}  {staged}"
            )
        print(f"{'':>7}one ranged GET of 1 MiB of its page image: {get_ms:.1f} ms")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--poll"]:
        from bench.lazy_restore import poll

        poll(sys.argv[2], sys.argv[3], 300.0)
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1", help="GiB held, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main([float(s) for s in args.sizes.split(",")], args.runs))
