"""Many nodes, one checkpoint (issue 24, point 3; decision 0042): one version prefetched to M
simulated nodes from S3 with a cap on how many fetch at once.

The nodes are real node workers in this process, each with its own name, task queue, home
and node cache; the control worker runs the real `PrefetchWorkflow` against a real Temporal
dev server; the bucket is moto's S3 server in a process of its own, which counts what it
serves (`tests/fanout.py`). Per cap: the time from the workflow's start to its report, the
bytes the bucket served (each file of the version must be served once per node, never
more: checked), and the most nodes fetching at once (from the workflow's history). Usage,
from the repository root: `.venv/bin/python -m bench.prefetch_fanout --nodes 50 --mib 64
--caps 0,4,16`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

from tests.fanout import fan_out
from tests.s3server import ACCESS_KEY, SECRET_KEY, new_bucket, s3_client, s3_process
from workers.client import connect
from workers.devserver import DevServer
from workers.ports import free_port
from workers.settings import Settings, TemporalSettings

MiB = 1 << 20


async def main(nodes: int, mib: int, caps: list[int]) -> None:
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = DevServer(
            db_file=Path(tmp) / "t.db", port=port, ui_port=free_port(), headless=True
        )
        await server.start()
        try:
            settings = Settings(
                home=Path(tmp), temporal=TemporalSettings(address=f"127.0.0.1:{port}")
            )
            client = await connect(settings, wait_seconds=30)
            with s3_process(Path(tmp)) as endpoint:
                for cap in caps:
                    files = {
                        "criu/pages-1.img": os.urandom(mib * MiB),
                        "criu/core-1.img": os.urandom(70_000),
                        "workload-output.log": b"serving\n",
                    }
                    run = await fan_out(
                        client,
                        endpoint=endpoint,
                        bucket=new_bucket(s3_client(endpoint)),
                        tmp=Path(tmp) / f"cap-{cap}",
                        files=files,
                        nodes=nodes,
                        at_once=cap,
                    )
                    failed = [n.node for n in run.report.nodes if n.result is None]
                    once = set(run.file_reads_per_node(nodes).values()) == {1.0}
                    version = sum(run.version_files.values())
                    rows.append((cap, run.seconds, run.reads.total(), version, run, failed, once))
        finally:
            await server.stop()
    print(f"\n{nodes} nodes, one version of {mib} MiB of page image")
    print(
        f"{'cap':>5} {'seconds':>8} {'bucket MiB':>10} {'per node':>9} {'most at once':>12} "
        f"{'MiB/s':>7} {'each byte once':>14} failed"
    )
    for cap, seconds, served, version, run, failed, once in rows:
        print(
            f"{cap or 'all':>5} {seconds:>8.2f} {served / MiB:>10.1f} "
            f"{served / nodes / version:>8.3f}x {run.most_at_once:>12} "
            f"{served / MiB / seconds:>7.1f} {'yes' if once else 'NO':>14} {len(failed)}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--mib", type=int, default=64, help="size of the page image")
    parser.add_argument("--caps", default="0,4,16", help="nodes at once, 0: all")
    args = parser.parse_args()
    asyncio.run(main(args.nodes, args.mib, [int(c) for c in args.caps.split(",")]))
