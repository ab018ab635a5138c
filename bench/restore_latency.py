"""Restore latency: the warmstart pipeline against raw `criu restore` of the same image.

Both are timed from the request to the restored process's first HTTP answer. Needs root
and CRIU >= 4.2. Usage, from the repository root:
`.venv/bin/python -m bench.restore_latency [--runs N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from temporalio.client import Client

from activities.host.processes import terminate
from activities.host.sentinels import STALE_SENTINELS, clear_sentinels
from activities.storage.store import WORKLOAD_LOG, CheckpointStore
from api.identity import CheckpointIdentity
from api.manifest import Manifest
from api.workload import LocalWorkload, Readiness
from workers.client import connect
from workers.compose import control_worker, node_worker
from workers.devserver import DevServer
from workers.operations import follow, local_capture_request, start_capture, start_restore
from workers.ports import free_port
from workers.settings import NodeSettings, Settings, TemporalSettings
from workflows.contracts import RestoreRequest


class Poller:
    """A separate process that reports when `url` first answers (see bench/poller.py)."""

    async def __aenter__(self) -> Poller:
        return self

    async def start(self, url: str) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.poller", url, stdout=asyncio.subprocess.PIPE
        )
        assert self.proc.stdout is not None
        await self.proc.stdout.readline()  # "ready"

    async def answered_at(self) -> float:
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        await self.proc.wait()
        return float(line)

    async def __aexit__(self, *exc: object) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def prepare(version_dir: Path, manifest: Manifest) -> None:
    """What CRIU needs by path, done the same way for both contenders."""
    clear_sentinels(Path(manifest.source.control_dir), STALE_SENTINELS)
    shutil.copyfile(version_dir / WORKLOAD_LOG, manifest.source.log_path)


async def raw_restore(criu: str, version_dir: Path, manifest: Manifest, url: str) -> float:
    prepare(version_dir, manifest)
    work = Path(tempfile.mkdtemp())
    async with Poller() as poller:
        await poller.start(url)
        started = time.monotonic()
        dirs = ["-D", str(version_dir / "criu"), "-W", str(work)]
        outputs = ["-o", "restore.log", "--pidfile", str(work / "pid")]
        proc = await asyncio.create_subprocess_exec(
            criu, "restore", *dirs, *outputs, "--restore-detached"
        )
        assert await proc.wait() == 0
        if manifest.source.readiness.kind == "sentinel":
            (Path(manifest.source.control_dir) / "restore-complete").write_text("done\n")
        seconds = await poller.answered_at() - started
    await terminate(int((work / "pid").read_text()), grace_seconds=2)
    shutil.rmtree(work)
    return seconds


async def pipeline_restore(
    client: Client, settings: Settings, manifest: Manifest, url: str
) -> float:
    request = RestoreRequest(
        name=manifest.source.name,
        checkpoint_id=manifest.checkpoint_id,
        version=manifest.version,
        node=settings.node.name,
        control_task_queue=settings.node.control_task_queue,
    )
    async with Poller() as poller:
        await poller.start(url)
        started = time.monotonic()
        handle = await start_restore(client, request)
        seconds = await poller.answered_at() - started
    result = await handle.result()
    await terminate(result.pid, grace_seconds=2)
    return seconds


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(runs: int) -> None:
    criu = shutil.which("criu") or "/usr/local/sbin/criu"
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
        rows = []
        try:
            client = await connect(settings, wait_seconds=30)
            async with control_worker(client, settings), node_worker(client, settings):
                for label, workload, url in workloads():
                    identity = CheckpointIdentity(
                        model=f"bench/{workload.name}", backend_framework="vllm"
                    )
                    request = local_capture_request(settings, workload, identity)
                    handle = await start_capture(client, request)
                    result = await follow(client, handle, lambda _p: None)
                    store = CheckpointStore(settings.checkpoint_root)
                    version_dir = store.find(result.checkpoint_id)
                    manifest = store.verify(version_dir, checkpoint_id=result.checkpoint_id)
                    raw, piped = [], []
                    for _ in range(runs):
                        raw.append(await raw_restore(criu, version_dir, manifest, url))
                        piped.append(await pipeline_restore(client, settings, manifest, url))
                    rows.append((label, manifest.size_bytes, raw, piped))
        finally:
            await server.stop()
    print_table(rows, runs)


def workloads() -> Iterator[tuple[str, LocalWorkload, str]]:
    http_port, sample_port = free_port(), free_port()
    empty = tempfile.mkdtemp(prefix="bench-cwd-")  # http.server lists its cwd: keep it cheap
    http_url = f"http://127.0.0.1:{http_port}/"
    http = LocalWorkload(
        name="bench-http",
        command=(sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1"),
        cwd=empty,
        readiness=Readiness(kind="http", http_url=http_url),
        ready_timeout_seconds=60,
    )
    yield "python http.server (probe)", http, http_url
    sample_url = f"http://127.0.0.1:{sample_port}/healthz"
    worker = (sys.executable, "-m", "examples.inference_worker", "--port", str(sample_port))
    sample = LocalWorkload(
        name="bench-sample",
        command=(*worker, "--warmup-rounds", "200"),
        cwd=empty,
        health_url=sample_url,
        ready_timeout_seconds=120,
    )
    yield "sample worker (sentinels)", sample, sample_url


def print_table(rows: list[tuple[str, int, list[float], list[float]]], runs: int) -> None:
    print(f"restore: request -> first HTTP answer, {runs} runs each (ms)")
    columns = ("raw p50", "raw p90", "ws p50", "ws p90")
    header = f"{'workload':30} {'image':>8} " + " ".join(f"{c:>8}" for c in columns)
    header += f" {'added p50':>9} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for label, size, raw, piped in rows:
        r50, w50 = statistics.median(raw) * 1000, statistics.median(piped) * 1000
        print(
            f"{label:30} {size / 2**20:6.1f}Mi {r50:8.1f} {pct(raw, 0.9) * 1000:8.1f} {w50:8.1f} "
            f"{pct(piped, 0.9) * 1000:8.1f} {w50 - r50:9.1f} {w50 / r50:6.2f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    asyncio.run(main(parser.parse_args().runs))
