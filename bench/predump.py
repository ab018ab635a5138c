"""Frozen time of a capture with pre-dumps against a plain dump (decision 0037).

A process holding N GiB of seeded memory rewrites a tenth of its pages before the dump
and again between the last pre-dump round and the final dump;
each run dumps a fresh one through the local dump activity, alternating plain and with
`--pre-dumps` rounds, and reports CRIU's frozen time (`stats-dump`) and the dump's wall
time. Where this kernel cannot track dirty pages, the pre-dump runs fall back to plain
dumps and the reason is printed (the figures then compare plain with plain).

This machine kind backs guest memory lazily: `--warm` GiB are touched and freed first.
Needs root and CRIU >= 4.2. From the repository root:
`.venv/bin/python -m bench.predump --sizes 1 --runs 3`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from temporalio.testing import ActivityEnvironment

from activities.contracts import DumpInput
from activities.criu.command import IMAGES_DIR, Criu
from activities.criu.predump import PreDumps, captured_criu_info
from activities.local.dump import CriuActivities
from activities.storage.store import CheckpointStore
from api.manifest import CriuInfo
from workers.settings import CriuSettings

# N MiB of random blocks; on SIGUSR1 a tenth of the pages (the next tenth each time) is
# rewritten, then "dirtied" is printed. "ready" once filled.
HOLDER = """\
import random, signal, sys
mib = int(sys.argv[1])
state = bytearray(random.Random(23).randbytes(1 << 20)) * mib
sweep = [0]
def dirty(*_):
    for page in range(sweep[0] % 10, len(state) >> 12, 10):
        state[page << 12] = (state[page << 12] + 1) % 256
    sweep[0] += 1
    print("dirtied", flush=True)
signal.signal(signal.SIGUSR1, dirty)
print("ready", flush=True)
while True:
    signal.pause()
"""


def warm(gib: float) -> None:
    block = bytearray(int(gib * (1 << 30)))
    for at in range(0, len(block), 4096):
        block[at] = 1
    del block


async def one(criu: Criu, mib: int, rounds: int, tmp: Path) -> tuple[float, float, str]:
    proc = subprocess.Popen(  # noqa: ASYNC220 (a benchmark: nothing else runs meanwhile)
        [sys.executable, "-c", HOLDER, str(mib)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    store = CheckpointStore(Path(tempfile.mkdtemp(dir=tmp)))

    class Dirtying(PreDumps):
        """Dirties a tenth of the pages once the rounds are done, before the final dump."""

        async def _pre_dump(self, command: list[str], rounds: Path, *, what: str) -> str:
            why = await super()._pre_dump(command, rounds, what=what)
            dirty()
            return why

    def dirty() -> None:
        os.kill(proc.pid, 10)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"dirtied"

    pre = PreDumps(criu=criu, rounds=0) if rounds == 0 else Dirtying(criu=criu, rounds=rounds)
    dirty()
    activities = CriuActivities(criu=criu, store=store, pre_dumps=pre)
    request = DumpInput(checkpoint_id="b" * 16, version="v1", name="bench", pid=proc.pid)
    started = time.monotonic()
    await ActivityEnvironment().run(activities.dump_checkpoint, request)
    seconds = time.monotonic() - started
    proc.wait()
    staging = store.staging_dir("b" * 16, "v1")
    info = captured_criu_info(CriuInfo(version=""), staging)
    shutil.rmtree(store.root)
    assert info.frozen_ms is not None, list((staging / IMAGES_DIR).iterdir())
    return info.frozen_ms, seconds, info.pre_dump_fallback


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1", help="GiB, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pre-dumps", type=int, default=2)
    parser.add_argument("--warm", type=float, default=3.0, help="GiB touched and freed first")
    args = parser.parse_args()
    path = CriuSettings().resolve()
    assert path is not None, "criu is not installed"
    criu = Criu(path)
    warm(args.warm)
    with tempfile.TemporaryDirectory() as tmp:
        for gib in (float(size) for size in args.sizes.split(",")):
            plain: list[float] = []
            pre: list[float] = []
            walls: dict[int, list[float]] = {0: [], args.pre_dumps: []}
            reasons: set[str] = set()
            for _ in range(args.runs):
                for rounds, into in ((0, plain), (args.pre_dumps, pre)):
                    frozen, wall, why = await one(criu, int(gib * 1024), rounds, Path(tmp))
                    into.append(frozen)
                    walls[rounds].append(wall)
                    if why:
                        reasons.add(why)
            ratio = statistics.median(pre) / statistics.median(plain)
            print(
                f"{gib:g} GiB: frozen plain {statistics.median(plain):.0f} ms "
                f"(runs {', '.join(f'{f:.0f}' for f in plain)}; "
                f"dump {statistics.median(walls[0]):.2f} s), "
                f"with {args.pre_dumps} pre-dumps {statistics.median(pre):.0f} ms "
                f"(runs {', '.join(f'{f:.0f}' for f in pre)}; "
                f"dump {statistics.median(walls[args.pre_dumps]):.2f} s): {ratio:.2f}x"
            )
            for why in sorted(reasons):
                print(f"  fell back to plain dumps: {why}")


if __name__ == "__main__":
    asyncio.run(main())
