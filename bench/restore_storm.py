"""Restore storm on one node (issue 24, point 2; decision 0040): N restores of one checkpoint
at once, against N cold starts of the same program.

A workload (`tests/programs/storm_server.py`: a warm-up standing in for loading a model,
then an HTTP token server on a port it shares through SO_REUSEPORT) is captured once by a
node that uploads it to S3 (moto's server, in a process of its own, recording what it
serves) and then forgets it. N `RestoreWorkflow` local restores of it, with distinct
workload names, start at once on that node: the first fetches the version into the node
cache, the others wait for that fetch, then at most `--cap` at a time go through CRIU
(`WARMSTART_CRIU__MAX_CONCURRENT_RESTORES`). Each restored process stays running (and is
checked to hold its listener) until all have answered, then is stopped by its PID. Then N
cold starts of the program run at once, timed until each listens.

Reported: time until all answer (and the first, the median) for both, the node's peak
memory (RSS sum of the N processes; drop of MemAvailable), peak disk (node cache and
restore work directories), and what the bucket served (bytes and GETs, counted by the
server). Needs root and CRIU >= 4.2. Usage, from the repository root:
`.venv/bin/python -m bench.restore_storm --restores 100 --cap 4`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from activities.host.processes import terminate
from api.identity import CheckpointIdentity
from api.workload import LocalWorkload, Readiness
from tests.pipeline import REPO, listening_pids
from tests.s3server import new_bucket, recorded_reads, s3_client, s3_process, start_recording
from workers.client import connect
from workers.compose import control_worker, node_worker
from workers.devserver import DevServer
from workers.operations import follow, local_capture_request, start_capture, start_restore
from workers.ports import free_port
from workers.settings import CriuSettings, NodeSettings, Settings, StorageSettings, TemporalSettings
from workflows.contracts import RestoreRequest, RestoreResult

PROGRAM = REPO / "tests" / "programs" / "storm_server.py"
KEY = "bench"


def mem_available() -> int:
    with open("/proc/meminfo") as info:
        for line in info:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def rss(pid: int) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def disk_bytes(*roots: Path) -> int:
    total = 0
    for root in roots:  # directories come and go meanwhile (staging, work directories)
        for folder, _dirs, files in os.walk(root):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total


@dataclass
class Peaks:
    """Sampled every 100 ms while a contender runs: the lowest MemAvailable and the most disk."""

    disk_roots: tuple[Path, ...] = ()
    start_available: int = 0
    low_available: int = 0
    disk: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    @contextlib.contextmanager
    def sampling(self) -> Iterator[Peaks]:
        self.start_available = self.low_available = mem_available()

        def sample() -> None:
            while not self._stop.wait(0.1):
                self.low_available = min(self.low_available, mem_available())
                self.disk = max(self.disk, disk_bytes(*self.disk_roots))

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()

    @property
    def drop(self) -> int:
        return self.start_available - self.low_available


@dataclass
class Outcome:
    name: str
    answered: list[float]
    rss_sum: int
    peaks: Peaks
    stages: dict[str, float] = field(default_factory=dict)


async def restores(client: object, settings: Settings, ckpt: str, n: int, port: int) -> Outcome:
    storage = settings.storage.location()
    layout_roots = tuple(settings.home / d for d in ("cache", "restores", "workloads"))
    peaks = Peaks(disk_roots=layout_roots)
    answered: list[float] = []
    results: list[RestoreResult] = []
    with peaks.sampling():
        started = time.monotonic()

        async def one(i: int) -> None:
            request = RestoreRequest(
                name=f"storm-{i}",
                checkpoint_id=ckpt,
                node=settings.node.name,
                control_task_queue=settings.node.control_task_queue,
                answer_timeout_seconds=600,
                storage=storage,
            )
            handle = await start_restore(client, request)  # type: ignore[arg-type]
            results.append(await handle.result())
            answered.append(time.monotonic() - started)

        await asyncio.gather(*(one(i) for i in range(n)))
        pids = [r.pid for r in results]
        missing = set(pids) - listening_pids(port)
        assert not missing, f"restored but not listening: {sorted(missing)}"
        rss_sum = sum(rss(pid) for pid in pids)
    for pid in pids:
        await terminate(pid, grace_seconds=2)
    stages: dict[str, float] = {}
    for r in results:
        for stage, seconds in r.stage_seconds.items():
            stages[stage] = stages.get(stage, 0.0) + seconds / n
    stages["criu-running max"] = max(r.criu_running for r in results)
    return Outcome("restore", sorted(answered), rss_sum, peaks, stages)


def cold_starts(n: int, port: int, rounds: int) -> Outcome:
    peaks = Peaks()
    answered: list[float] = []
    with peaks.sampling():
        started = time.monotonic()
        procs = [
            subprocess.Popen(
                [sys.executable, str(PROGRAM), str(port), str(rounds)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(n)
        ]
        try:
            for proc in procs:
                assert proc.stdout is not None
                line = proc.stdout.readline()
                assert line.startswith("listening"), line
                answered.append(time.monotonic() - started)
            missing = {p.pid for p in procs} - listening_pids(port)
            assert not missing, f"started but not listening: {sorted(missing)}"
            rss_sum = sum(rss(p.pid) for p in procs)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(10)
    return Outcome("cold start", sorted(answered), rss_sum, peaks)


async def main(n: int, cap: int, rounds: int) -> None:
    os.environ.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=KEY)
    with tempfile.TemporaryDirectory() as tmp, s3_process(Path(tmp)) as endpoint:
        bucket = new_bucket(s3_client(endpoint))
        port = free_port()
        settings = Settings(
            home=Path(tmp) / "home",
            temporal=TemporalSettings(address=f"127.0.0.1:{port}"),
            node=NodeSettings(name="storm"),
            criu=CriuSettings(max_concurrent_restores=cap),
            storage=StorageSettings(s3_bucket=bucket, s3_endpoint=endpoint, s3_region="us-east-1"),
        )
        server = DevServer(
            db_file=Path(tmp) / "t.db", port=port, ui_port=free_port(), headless=True
        )
        await server.start()
        try:
            client = await connect(settings, wait_seconds=30)
            async with control_worker(client, settings), node_worker(client, settings):
                app = free_port()
                workload = LocalWorkload(
                    name="storm",
                    command=(sys.executable, str(PROGRAM), str(app), str(rounds)),
                    cwd=str(REPO),
                    readiness=Readiness(kind="http", http_url=f"http://127.0.0.1:{app}/"),
                    ready_timeout_seconds=600,
                )
                identity = CheckpointIdentity(model="bench/storm", backend_framework="vllm")
                request = local_capture_request(settings, workload, identity)
                handle = await start_capture(client, request)
                captured = await follow(client, handle, lambda _p: None)
                ckpt = captured.checkpoint_id
                shutil.rmtree(settings.checkpoint_root / ckpt)  # only the bucket has it
                start_recording(endpoint)
                restored = await restores(client, settings, ckpt, n, app)
                reads = recorded_reads(endpoint, bucket)
                listed = s3_client(endpoint).list_objects_v2(
                    Bucket=bucket, Prefix=f"{ckpt}/versions/{captured.version}/"
                )["Contents"]
                sizes = {o["Key"]: o["Size"] for o in listed}
            cold = cold_starts(n, app, rounds)
        finally:
            await server.stop()
    prefix = f"{ckpt}/versions/{captured.version}/"
    served = reads.total(prefix)
    once = all(
        reads.bytes.get(k, 0) == n for k, n in sizes.items() if not k.endswith("manifest.json")
    )
    gets = sum(g for k, g in reads.gets.items() if k.startswith(prefix))
    print(f"\n{n} at once on one node, CRIU cap {cap}, warm-up {rounds} rounds")
    print(
        f"{'contender':<11} {'first s':>8} {'median s':>8} {'all s':>8} "
        f"{'RSS sum MiB':>11} {'MemAvail drop MiB':>17} {'disk peak MiB':>13}"
    )
    for out in (restored, cold):
        a = out.answered
        print(
            f"{out.name:<11} {a[0]:>8.2f} {statistics.median(a):>8.2f} {a[-1]:>8.2f} "
            f"{out.rss_sum / 2**20:>11.0f} {out.peaks.drop / 2**20:>17.0f} "
            f"{out.peaks.disk / 2**20:>13.1f}"
        )
    stages = " ".join(f"{k}={v:.3f}" for k, v in restored.stages.items())
    print(f"restore stages (mean s per restore): {stages}")
    print(
        f"bucket served {served / 2**20:.2f} MiB in {gets} GETs of a version of "
        f"{sum(sizes.values()) / 2**20:.2f} MiB; every file exactly once: {once}"
    )
    for key, n_read in sorted(reads.bytes.items()):
        if key.startswith(prefix):
            print(f"  {key[len(prefix) :]}: {reads.gets[key]} GET(s), {n_read} bytes")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restores", type=int, default=100)
    parser.add_argument(
        "--cap", type=int, default=4, help="WARMSTART_CRIU__MAX_CONCURRENT_RESTORES"
    )
    parser.add_argument("--warmup-rounds", type=int, default=800, help="SHA-256 rounds of 1 MiB")
    args = parser.parse_args()
    asyncio.run(main(args.restores, args.cap, args.warmup_rounds))
