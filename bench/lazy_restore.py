"""Lazy restore (decision 0034) against raw eager `criu restore` of the same image.

A workload holds N GiB of seeded (never zero) memory and answers `/` by touching 16 pages
of it (`tests/programs/memory_server.py`); it is captured once per size. Then, alternating,
per run: raw eager `criu restore`; raw lazy (`criu lazy-pages` + `criu restore
--lazy-pages`); warmstart's lazy restore through the pipeline (a node worker with
`WARMSTART_CRIU__LAZY_PAGES=true`). Each is timed from the request to the first correct
answer (a separate poller process) and to full residency (the restored process's anonymous
RSS reaching the dumped pages' size). Needs root, CRIU >= 4.2 and userfaultfd. Usage, from
the repository root: `.venv/bin/python -m bench.lazy_restore --sizes 0.25,1 --runs 3`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
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
from workers.settings import CriuSettings, NodeSettings, Settings, TemporalSettings
from workflows.contracts import RestoreRequest

PROGRAM = Path(__file__).resolve().parents[1] / "tests" / "programs" / "memory_server.py"
SEED = 2304
RESIDENT_SHARE = 0.97
CONTENDERS = ("raw eager", "raw lazy", "warmstart lazy")


def expected_answer(mib: int) -> str:
    rng = random.Random(SEED)
    memory = b"".join(rng.randbytes(1 << 20) for _ in range(mib))  # as the program fills it
    return " ".join(str(memory[(len(memory) - 1) * i // 15]) for i in range(16))


def poll(url: str, expected: str, timeout: float) -> None:
    """The poller process: prints "ready", then the monotonic time of the first answer
    equal to `expected`."""
    print("ready", flush=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.read().decode() == expected:
                    print(f"{time.monotonic():.6f}", flush=True)
                    return
        except OSError:
            pass
        time.sleep(0.0005)
    sys.exit(f"no correct answer from {url} within {timeout} s")


class Timing:
    """One restore: the request's start, then the first correct answer and full residency."""

    def __init__(self, url: str, expected: str, port: int, pages_bytes: int) -> None:
        self.url, self.expected, self.port, self.pages_bytes = url, expected, port, pages_bytes

    async def __aenter__(self) -> Timing:
        self.poller = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.lazy_restore", "--poll", self.url, self.expected,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.poller.stdout is not None
        await self.poller.stdout.readline()
        self.started = time.monotonic()
        self.resident = asyncio.ensure_future(self._resident())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.poller.returncode is None:
            self.poller.kill()
            await self.poller.wait()
        self.resident.cancel()

    async def results(self) -> tuple[float, float, int]:
        assert self.poller.stdout is not None
        answered = float(await self.poller.stdout.readline())
        resident, pid = await asyncio.wait_for(self.resident, 300)
        return answered - self.started, resident - self.started, pid

    async def _resident(self) -> tuple[float, int]:
        """When the restored workload's anonymous RSS reached the dumped pages' size."""
        needle = f"{PROGRAM}\0{self.port}\0".encode()
        pid = 0
        while not pid:
            pid = next((p for p in _pids() if needle in _cmdline(p)), 0)
            await asyncio.sleep(0.002)
        while _rss_anon(pid) < RESIDENT_SHARE * self.pages_bytes:  # noqa: ASYNC110 (/proc)
            await asyncio.sleep(0.002)
        return time.monotonic(), pid


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _rss_anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def prepare(version_dir: Path, manifest: Manifest) -> None:
    """What CRIU needs by path, done the same way for the raw contenders."""
    clear_sentinels(Path(manifest.source.control_dir), STALE_SENTINELS)
    shutil.copyfile(version_dir / WORKLOAD_LOG, manifest.source.log_path)


async def raw_restore(
    criu: str, version_dir: Path, timing: Timing, *, lazy: bool
) -> tuple[float, float, float]:
    """Raw CRIU: eager, or `criu lazy-pages` then `criu restore --lazy-pages`. Returns the
    first answer, full residency and the lazy-pages daemon's exit (0 when eager)."""
    work = Path(tempfile.mkdtemp())
    dirs = ["-D", str(version_dir / "criu"), "-W", str(work)]
    daemon = None
    async with timing:
        if lazy:
            read_end, write_end = os.pipe()
            daemon = await asyncio.create_subprocess_exec(
                criu, "lazy-pages", *dirs, "-o", "lazy.log", "--status-fd", str(write_end),
                pass_fds=(write_end,),
            )  # fmt: skip
            os.close(write_end)
            assert await asyncio.to_thread(os.read, read_end, 1) == b"\0"
            os.close(read_end)
        outputs = ["-o", "restore.log", "--pidfile", str(work / "pid")]
        extra = ["--lazy-pages"] if lazy else []
        proc = await asyncio.create_subprocess_exec(
            criu, "restore", *dirs, *outputs, "--restore-detached", *extra
        )
        assert await proc.wait() == 0
        answered, resident, pid = await timing.results()
        daemon_exit = 0.0
        if daemon is not None:
            await asyncio.wait_for(daemon.wait(), 300)
            daemon_exit = time.monotonic() - timing.started
    await terminate(pid, grace_seconds=2)
    shutil.rmtree(work)
    return answered, resident, daemon_exit


async def pipeline_restore(client: Client, settings: Settings, manifest: Manifest) -> None:
    request = RestoreRequest(
        name=manifest.source.name,
        checkpoint_id=manifest.checkpoint_id,
        version=manifest.version,
        node=settings.node.name,
        control_task_queue=settings.node.control_task_queue,
        answer_timeout_seconds=120,
    )
    handle = await start_restore(client, request)
    result = await handle.result()
    assert "lazy-pages" in result.stage_seconds, result.stage_seconds
    await terminate(result.pid, grace_seconds=2)


def warm_host_memory(gib: float) -> None:
    """Allocate, touch and free `gib` GiB once: this VM's guest memory is backed lazily by
    its host, and a first touch of never-used memory is slow (~200 MB/s)."""
    size = int(gib * (1 << 30))
    touch = f"b = bytearray({size}); b[::4096] = b'\\1' * len(range(0, {size}, 4096))"
    subprocess.run([sys.executable, "-c", touch], check=True)


async def main(sizes: list[float], runs: int) -> None:
    criu = CriuSettings().resolve() or "criu"
    warm = max(3.0, 2 * max(sizes) + 1)
    print(f"warming host memory: allocating, touching and freeing {warm:g} GiB once", flush=True)
    warm_host_memory(warm)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        settings = Settings(
            home=Path(tmp),
            temporal=TemporalSettings(address=f"127.0.0.1:{port}"),
            node=NodeSettings(name="bench"),
            criu=CriuSettings(lazy_pages=True),
        )
        server = DevServer(
            db_file=Path(tmp) / "t.db", port=port, ui_port=free_port(), headless=True
        )
        await server.start()
        try:
            client = await connect(settings, wait_seconds=30)
            async with control_worker(client, settings), node_worker(client, settings):
                for gib in sizes:
                    rows.append(await measure(client, settings, criu, gib, runs))
        finally:
            await server.stop()
    print_table(rows, runs)


async def measure(
    client: Client, settings: Settings, criu: str, gib: float, runs: int
) -> tuple[float, int, dict[str, list[tuple[float, float]]], list[float]]:
    mib = int(gib * 1024)
    app_port = free_port()
    url = f"http://127.0.0.1:{app_port}/"
    workload = LocalWorkload(
        name=f"lazy-{mib}",
        command=(sys.executable, str(PROGRAM), str(app_port), str(mib), str(SEED)),
        cwd=str(PROGRAM.parent),
        readiness=Readiness(kind="http", http_url=url),
        ready_timeout_seconds=300,
    )
    identity = CheckpointIdentity(model=f"bench/{workload.name}", backend_framework="vllm")
    request = local_capture_request(settings, workload, identity)
    result = await follow(client, await start_capture(client, request), lambda _p: None)
    store = CheckpointStore(settings.checkpoint_root)
    version_dir = store.find(result.checkpoint_id)
    manifest = store.verify(version_dir, checkpoint_id=result.checkpoint_id)
    pages = sum(f.stat().st_size for f in (version_dir / "criu").glob("pages-*.img"))
    expected = expected_answer(mib)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in CONTENDERS}
    daemon_exits = []
    for _ in range(runs):
        for name in CONTENDERS:
            timing = Timing(url, expected, app_port, pages)
            if name == "warmstart lazy":
                async with timing:
                    await pipeline_restore(client, settings, manifest)
                    answered, resident, _pid = await timing.results()
            else:
                prepare(version_dir, manifest)
                lazy = name == "raw lazy"
                answered, resident, exit_at = await raw_restore(
                    criu, version_dir, timing, lazy=lazy
                )
                if lazy:
                    daemon_exits.append(exit_at)
            times[name].append((answered, resident))
    return gib, pages, times, daemon_exits


def print_table(
    rows: list[tuple[float, int, dict[str, list[tuple[float, float]]], list[float]]], runs: int
) -> None:
    print(f"\nmedians of {runs} alternating runs; ratios against raw eager `criu restore`")
    print(
        f"{'size':>6} {'pages MiB':>9} {'contender':<15} {'first answer s':>14} "
        f"{'resident s':>10} {'answer x':>8} {'resident x':>10}"
    )
    for gib, pages, times, exits in rows:
        medians = {
            name: (
                statistics.median(a for a, _ in values),
                statistics.median(r for _, r in values),
            )
            for name, values in times.items()
        }
        base_answer, base_resident = medians["raw eager"]
        for name, (answer, resident) in medians.items():
            print(
                f"{gib:>5g}G {pages >> 20:>9} {name:<15} {answer:>14.3f} {resident:>10.3f} "
                f"{answer / base_answer:>8.2f} {resident / base_resident:>10.2f}"
            )
        if exits:
            print(f"{'':>16} raw lazy-pages daemon exited after {statistics.median(exits):.3f} s")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--poll"]:
        poll(sys.argv[2], sys.argv[3], 300.0)
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.25,1", help="GiB held, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main([float(s) for s in args.sizes.split(",")], args.runs))
