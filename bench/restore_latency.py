"""Restore latency: the warmstart pipeline against raw `criu restore` of the same image.

Both are timed from the request to the restored process's first HTTP answer. Needs root
and CRIU >= 4.2. Usage: `.venv/bin/python bench/restore_latency.py [--runs N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from activities.processes import terminate  # noqa: E402
from activities.sentinels import STALE_SENTINELS, clear_sentinels  # noqa: E402
from activities.storage import WORKLOAD_LOG, CheckpointStore  # noqa: E402
from api.manifest import Manifest  # noqa: E402
from api.workload import Readiness  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.pipeline import capture, capture_request, sample_workload, shell_workload  # noqa: E402
from workers.client import connect  # noqa: E402
from workers.devserver import DevServer  # noqa: E402
from workers.pipelines import start_restore  # noqa: E402
from workers.runtime import control_worker, node_worker  # noqa: E402
from workers.settings import NodeSettings, Settings, TemporalSettings  # noqa: E402
from workflows.contracts import RestoreRequest  # noqa: E402


class Poller:
    """A separate process that reports when `url` first answers (see bench/poller.py)."""

    async def __aenter__(self) -> Poller:
        return self

    async def start(self, url: str) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(REPO / "bench" / "poller.py"), url,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
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
        proc = await asyncio.create_subprocess_exec(
            criu, "restore", "-D", str(version_dir / "criu"), "-W", str(work), "-o",
            "restore.log", "--restore-detached", "--pidfile", str(work / "pid"),
        )  # fmt: skip
        assert await proc.wait() == 0
        if manifest.source.readiness.kind == "sentinel":
            (Path(manifest.source.control_dir) / "restore-complete").write_text("done\n")
        seconds = await poller.answered_at() - started
    await terminate(int((work / "pid").read_text()), grace_seconds=2)
    shutil.rmtree(work)
    return seconds


async def pipeline_restore(client, settings, manifest: Manifest, url: str) -> float:  # type: ignore[no-untyped-def]
    request = RestoreRequest(
        name=manifest.source.name, checkpoint_id=manifest.checkpoint_id, node=settings.node.name,
        control_task_queue=settings.node.control_task_queue,
    )  # fmt: skip
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
            home=Path(tmp), temporal=TemporalSettings(address=f"127.0.0.1:{port}"),
            node=NodeSettings(name="bench"),
        )  # fmt: skip
        server = DevServer(
            db_file=Path(tmp) / "t.db", port=port, ui_port=free_port(), headless=True
        )
        await server.start()
        rows = []
        try:
            client = await connect(settings, wait_seconds=30)
            async with control_worker(client, settings), node_worker(client, settings):
                for label, workload, url in workloads():
                    result = await capture(client, capture_request(settings, workload))
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


def workloads():  # type: ignore[no-untyped-def]
    token_port, sample_port = free_port(), free_port()
    token = shell_workload(
        "bench-token", f"exec python3 {REPO}/tests/programs/token_server.py {token_port}",
        readiness=Readiness(kind="http", http_url=f"http://127.0.0.1:{token_port}/"),
    )  # fmt: skip
    yield "python http.server (probe)", token, f"http://127.0.0.1:{token_port}/"
    sample = sample_workload("bench-sample", sample_port, rounds=200)
    yield "sample worker (sentinels)", sample, f"http://127.0.0.1:{sample_port}/healthz"


def print_table(rows, runs: int) -> None:  # type: ignore[no-untyped-def]
    print(f"restore: request -> first HTTP answer, {runs} runs each (ms)")
    header = f"{'workload':30} {'image':>8} {'raw p50':>8} {'raw p90':>8} {'ws p50':>8} " \
             f"{'ws p90':>8} {'added p50':>9} {'ratio':>6}"  # fmt: skip
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
