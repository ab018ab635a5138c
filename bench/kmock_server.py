"""kmock's emulated API server (`tests.kube`) in a process of its own, so that the scale bench
reads its CPU apart from its own: it prints its URL on one line, then serves until its
standard input closes. Label and field selectors are honoured (as an API server does), and
answered requests are not kept (kmock's log of them is for tests' assertions).

Usage (the scale bench starts it): `.venv/bin/python -m bench.kmock_server`
"""

from __future__ import annotations

import asyncio
import sys

import kmock

from tests.kube import Cluster, Emulator


async def serve() -> None:
    async with Emulator() as emulator, kmock.Server(emulator) as server:
        emulator.selectors = emulator.forgets_requests = True
        cluster = Cluster(emulator, str(server.url))  # declares the resources for discovery
        try:
            print(cluster.url, flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        finally:
            cluster.close()


if __name__ == "__main__":
    asyncio.run(serve())
