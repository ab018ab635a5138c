"""Capture and restore at real sizes: a process holding N GiB of non-trivial memory, captured
and restored by warmstart (local path) side by side with raw `criu dump` / `criu restore` of
the same program and image, in the same run, alternating.

- capture: warmstart's capture (request → version committed: launch excluded, dump, digests,
  manifest) against raw `criu dump` of a second process of the same program; both with
  the frozen time CRIU records (`stats-dump`: from freezing the tree until it was dumped).
- restore: request → first correct answer (the workload's answer is a digest of samples of
  its whole memory, so a wrong page is a wrong answer), warmstart's RestoreWorkflow
  (started eagerly from the node worker's own client) against raw `criu restore
  --restore-detached` of the same committed image.

This machine kind backs guest memory lazily (first touch of never-used memory runs at about
200 MB/s): before timing, the benchmark touches and frees `--warm` GiB (default: three times
the largest size), so both contenders land in memory the host already backs.

With `--cluster`, each size is also restored through the cluster path into a standby
container against raw CRIU into one (`bench.cluster_restore`, its workload holding the same
memory; containerd and the API emulator as the test suite starts them).

Needs root and CRIU >= 4.2. From the repository root:
`.venv/bin/python -m bench.size_scaling --sizes 0.25,1,4 --runs 3 --cluster`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from temporalio.client import Client

from activities.criu.stats import frozen_ms
from activities.host.processes import terminate
from activities.storage.store import CheckpointStore
from api.identity import CheckpointIdentity
from api.manifest import Manifest
from api.workload import LocalWorkload, Readiness
from bench.restore_latency import Poller, prepare
from workers.client import connect
from workers.compose import control_worker, node_worker
from workers.devserver import DevServer
from workers.operations import follow, local_capture_request, start_capture, start_restore
from workers.ports import free_port
from workers.settings import NodeSettings, Settings, TemporalSettings
from workflows.contracts import RestoreRequest

MiB = 1 << 20
SAMPLES = 64
SEED = 23
# The workload: N MiB of a random 1 MiB block repeated, each MiB stamped with its index (no
# two pages of a MiB alike, no MiB like another, none zero); it answers GET / with the
# digest of SAMPLES slices spread over the whole state, read at each request.
HOLDER = f"""\
import hashlib, http.server, random, sys
port, mib = int(sys.argv[1]), int(sys.argv[2])
block = random.Random({SEED}).randbytes(1 << 20)
state = bytearray(block) * mib
for i in range(mib):
    state[i << 20:(i << 20) + 8] = i.to_bytes(8, 'little')
step = len(state) // {SAMPLES}
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        digest = hashlib.sha256()
        for k in range({SAMPLES}):
            digest.update(state[k * step:k * step + 4096])
        body = digest.hexdigest().encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *args): pass
http.server.HTTPServer(('127.0.0.1', port), Handler).serve_forever()
"""


def expected_answer(mib: int) -> str:
    """What HOLDER answers for `mib` MiB of state (computed the same way here)."""
    block = random.Random(SEED).randbytes(MiB)
    step = mib * MiB // SAMPLES
    digest = hashlib.sha256()
    for k in range(SAMPLES):
        start = k * step
        index, offset = divmod(start, MiB)
        page = bytearray(block[offset : offset + 4096])
        if offset == 0:  # the slice starts where the MiB's index is stamped
            page[:8] = index.to_bytes(8, "little")
        digest.update(bytes(page))
    return digest.hexdigest()


def answer(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return str(response.read().decode())


def warm_memory(gib: float) -> float:
    """Touch and free `gib` GiB once (in a child, so it is returned); its seconds."""
    started = time.monotonic()
    touch = (
        "import sys; n = int(float(sys.argv[1]) * (1 << 30)); b = bytearray(n); "
        "b[::4096] = b'\\x01' * len(range(0, n, 4096))"
    )
    subprocess.run([sys.executable, "-c", touch, str(gib)], check=True)
    return time.monotonic() - started


@dataclass
class Row:
    """One size's figures (seconds, frozen ms)."""

    gib: float
    image_bytes: int = 0
    capture: list[float] = field(default_factory=list)
    capture_frozen: list[float] = field(default_factory=list)
    raw_dump: list[float] = field(default_factory=list)
    raw_frozen: list[float] = field(default_factory=list)
    restore: list[float] = field(default_factory=list)
    raw_restore: list[float] = field(default_factory=list)
    cluster: list[float] = field(default_factory=list)  # into a standby container
    cluster_raw: list[float] = field(default_factory=list)


class Bench:
    def __init__(self, client: Client, settings: Settings, criu: str, tmp: Path) -> None:
        self.client, self.settings, self.criu, self.tmp = client, settings, criu, tmp

    def workload(self, mib: int, port: int) -> LocalWorkload:
        url = f"http://127.0.0.1:{port}/"
        return LocalWorkload(
            name=f"holder-{mib}",
            command=(sys.executable, "-c", HOLDER, str(port), str(mib)),
            cwd=str(self.tmp),
            readiness=Readiness(kind="http", http_url=url),
            ready_timeout_seconds=600,
        )

    async def capture(self, mib: int, port: int) -> tuple[float, Path, Manifest]:
        """warmstart's capture of a new HOLDER: seconds from the request (once the
        workload answers) until committed, its version and manifest."""
        identity = CheckpointIdentity(model=f"bench/holder-{mib}", backend_framework="vllm")
        request = local_capture_request(self.settings, self.workload(mib, port), identity)
        handle = await start_capture(self.client, request)
        result = await follow(self.client, handle, lambda _p: None)
        store = CheckpointStore(self.settings.checkpoint_root)
        version_dir = store.find(result.checkpoint_id)
        manifest = store.verify(version_dir, checkpoint_id=result.checkpoint_id)
        dump = result.step_seconds.get("dump", 0.0) + result.step_seconds.get("commit", 0.0)
        return dump, version_dir, manifest

    async def raw_dump(self, mib: int) -> tuple[float, float]:
        """Raw `criu dump` of a second HOLDER once it answers: seconds and frozen ms."""
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        work = Path(tempfile.mkdtemp(dir=self.tmp))
        with (work / "out.log").open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                HOLDER,
                str(port),
                str(mib),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                cwd=self.tmp,
            )
        await _until_answers(url)
        images = work / "images"
        images.mkdir()
        started = time.monotonic()
        dump = await asyncio.create_subprocess_exec(
            self.criu, "dump", "-t", str(proc.pid), "-D", str(images), "-o", "dump.log"
        )
        assert await dump.wait() == 0, (images / "dump.log").read_text()[-2000:]
        seconds = time.monotonic() - started
        await proc.wait()  # CRIU killed it once dumped
        frozen = frozen_ms(images)
        shutil.rmtree(work)
        return seconds, frozen

    async def raw_restore(self, version_dir: Path, manifest: Manifest, url: str) -> float:
        prepare(version_dir, manifest)
        work = Path(tempfile.mkdtemp(dir=self.tmp))
        async with Poller() as poller:
            await poller.start(url)
            started = time.monotonic()
            dirs = ["-D", str(version_dir / "criu"), "-W", str(work)]
            outputs = ["-o", "restore.log", "--pidfile", str(work / "pid")]
            proc = await asyncio.create_subprocess_exec(
                self.criu, "restore", *dirs, *outputs, "--restore-detached"
            )
            assert await proc.wait() == 0, (work / "restore.log").read_text()[-2000:]
            seconds = await poller.answered_at() - started
        got = await asyncio.to_thread(answer, url)
        await terminate(int((work / "pid").read_text()), grace_seconds=2)
        shutil.rmtree(work)
        return seconds if got == expected_answer(_mib(manifest)) else float("nan")

    async def restore(self, manifest: Manifest, url: str) -> float:
        request = RestoreRequest(
            name=manifest.source.name,
            checkpoint_id=manifest.checkpoint_id,
            version=manifest.version,
            node=self.settings.node.name,
            control_task_queue=self.settings.node.control_task_queue,
        )
        async with Poller() as poller:
            await poller.start(url)
            started = time.monotonic()
            handle = await start_restore(self.client, request)
            seconds = await poller.answered_at() - started
        result = await handle.result()
        stages = ", ".join(f"{k} {v * 1000:.0f}" for k, v in result.stage_seconds.items())
        print(f"  warmstart restore {seconds:.3f} s, stages (ms): {stages}", flush=True)
        got = await asyncio.to_thread(answer, url)
        await terminate(result.pid, grace_seconds=2)
        return seconds if got == expected_answer(_mib(manifest)) else float("nan")

    async def size(self, gib: float, runs: int) -> Row:
        mib = int(gib * 1024)
        assert mib % SAMPLES == 0, f"{gib} GiB: the state must be a multiple of {SAMPLES} MiB"
        row = Row(gib=gib)
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        version_dir = manifest = None
        for _ in range(runs):
            seconds, frozen = await self.raw_dump(mib)
            row.raw_dump.append(seconds)
            row.raw_frozen.append(frozen)
            seconds, version_dir, manifest = await self.capture(mib, port)
            row.capture.append(seconds)
            row.capture_frozen.append(frozen_ms(version_dir / "criu"))
        assert version_dir is not None and manifest is not None
        row.image_bytes = manifest.size_bytes
        for i in range(runs):  # alternating which goes first (a VM's first touch)
            if i % 2:
                row.restore.append(await self.restore(manifest, url))
            row.raw_restore.append(await self.raw_restore(version_dir, manifest, url))
            if not i % 2:
                row.restore.append(await self.restore(manifest, url))
        return row


def _mib(manifest: Manifest) -> int:
    return int(manifest.source.command[-1])


async def _until_answers(url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await asyncio.to_thread(answer, url)
            return
        except OSError:
            assert time.monotonic() < deadline, f"{url} did not answer in {timeout:.0f} s"
            await asyncio.sleep(0.2)


def median(values: list[float]) -> float:
    return statistics.median(values)


def table(rows: list[Row], runs: int) -> str:
    lines = [
        f"Median of {runs} runs each, alternating; seconds unless said.",
        "",
        "| state | image | raw dump | warmstart capture (dump + commit) | frozen raw / ours (ms) "
        "| raw restore | warmstart restore | ratio | added |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        raw, ours = median(row.raw_restore), median(row.restore)
        lines.append(
            f"| {row.gib:g} GiB | {row.image_bytes / 2**30:.2f} GiB | {median(row.raw_dump):.2f} "
            f"| {median(row.capture):.2f} | {median(row.raw_frozen):.0f} / "
            f"{median(row.capture_frozen):.0f} | {raw:.3f} | {ours:.3f} | {ours / raw:.2f}x "
            f"| {(ours - raw) * 1000:+.0f} ms |"
        )
    clustered = [row for row in rows if row.cluster]
    if clustered:
        lines += [
            "",
            "Cluster path (into a standby container, timed from the standby's start):",
            "",
            "| state | raw restore into the standby | cluster restore | ratio | added |",
            "|---|---|---|---|---|",
        ]
        for row in clustered:
            raw, ours = median(row.cluster_raw), median(row.cluster)
            lines.append(
                f"| {row.gib:g} GiB | {raw:.3f} | {ours:.3f} | {ours / raw:.2f}x "
                f"| {(ours - raw) * 1000:+.0f} ms |"
            )
    return "\n".join(lines)


def plot(rows: list[Row], *, title: str, raw: str, ours: str) -> str:
    """A Mermaid xychart (rendered where the Markdown is read): size against restore
    seconds, raw CRIU as bars and warmstart as a line."""
    sizes = ", ".join(f'"{row.gib:g} GiB"' for row in rows)
    raws = [median(getattr(row, raw)) for row in rows]
    ourss = [median(getattr(row, ours)) for row in rows]
    top = max(raws + ourss) * 1.1
    return "\n".join(
        [
            "```mermaid",
            "xychart-beta",
            f'    title "{title}: request to first correct answer (s), bars raw CRIU, line ours"',
            f"    x-axis [{sizes}]",
            f'    y-axis "seconds" 0 --> {top:.2f}',
            f"    bar [{', '.join(f'{v:.3f}' for v in raws)}]",
            f"    line [{', '.join(f'{v:.3f}' for v in ourss)}]",
            "```",
        ]
    )


async def main(sizes: list[float], runs: int, warm: float | None, cluster: bool) -> None:
    criu = shutil.which("criu") or "/usr/local/sbin/criu"
    warm = warm if warm is not None else 3 * max(sizes)
    print(f"warming {warm:g} GiB of memory first: {warm_memory(warm):.1f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="ws-size-") as tmp:
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
                bench = Bench(client, settings, criu, Path(tmp))
                for gib in sizes:
                    row = await bench.size(gib, runs)
                    print(table([row], runs).splitlines()[-1], flush=True)
                    rows.append(row)
        finally:
            await server.stop()
    if cluster:
        from bench.cluster_restore import cluster_rows

        for row in rows:
            got = await cluster_rows(runs, int(row.gib * 1024))
            row.cluster_raw, row.cluster = got["raw"], got["cluster"]
    print()
    print(table(rows, runs))
    print()
    print(plot(rows, title="Local", raw="raw_restore", ours="restore"))
    if cluster:
        print(plot(rows, title="Cluster", raw="cluster_raw", ours="cluster"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0.25,1,4", help="GiB, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warm", type=float, default=None, help="GiB to touch first")
    parser.add_argument(
        "--cluster", action="store_true", help="also restore into a standby container"
    )
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    asyncio.run(main(sizes, args.runs, args.warm, args.cluster))
