"""Composition root of the embedded default: a dev server with persistent state plus both
workers in one process (`warmstart dev`, `warmstart worker`, the demo)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator

from temporalio.client import Client

from activities.host.layout import NodeLayout
from api.naming import node_task_queue
from workers.client import connect
from workers.compose import control_worker, node_worker
from workers.devserver import DevServer
from workers.housekeeping import tidy_node
from workers.local_restore import serving_local_restores
from workers.metrics import serving_metrics, watching_backlog
from workers.ports import port_open
from workers.settings import Settings

# The frontend port opens before the server reports itself healthy.
STARTUP_SECONDS = 30.0


@contextlib.asynccontextmanager
async def dev_server(settings: Settings) -> AsyncIterator[DevServer]:
    server = DevServer(
        db_file=settings.dev_server_db,
        port=settings.temporal.port,
        ui_port=settings.temporal.ui_port,
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def running_workers(
    client: Client, settings: Settings, role: str = "all"
) -> AsyncIterator[None]:
    """The control worker, this node's worker, or both (`role`)."""
    async with contextlib.AsyncExitStack() as stack:
        if role in ("all", "control"):
            await stack.enter_async_context(control_worker(client, settings))
        if role in ("all", "node"):
            await tidy_node(client, NodeLayout(settings.home))
            await stack.enter_async_context(node_worker(client, settings))
            await stack.enter_async_context(serving_local_restores(client, settings))
            if settings.node.cluster:  # it restores pods
                from workers.restore_targets import watching_restore_targets

                await stack.enter_async_context(watching_restore_targets(client, settings))
        yield


@contextlib.asynccontextmanager
async def embedded(settings: Settings) -> AsyncIterator[Client]:
    """A client to a running `warmstart dev`, or a server and workers started here."""
    if port_open(settings.temporal.port):
        yield await connect(settings)
        return
    async with dev_server(settings):
        client = await connect(settings, wait_seconds=STARTUP_SECONDS)
        async with running_workers(client, settings):
            yield client


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _served(settings: Settings, role: str = "all") -> list[str]:
    queues = {"control": settings.node.control_task_queue}
    queues["node"] = node_task_queue(settings.node.name)
    return [queue for kind, queue in queues.items() if role in ("all", kind)]


def _queues(settings: Settings, role: str = "all") -> str:
    return ", ".join(_served(settings, role))


@contextlib.asynccontextmanager
async def _metrics(client: Client, settings: Settings, role: str) -> AsyncIterator[None]:
    """Metrics exported, and the served queues' backlogs watched, where settings say."""
    telemetry = settings.telemetry
    if telemetry.metrics == "off":
        yield
        return
    every = telemetry.backlog_every_seconds
    async with (
        serving_metrics(telemetry),
        watching_backlog(client, _served(settings, role), every_seconds=every),
    ):
        yield


async def run_workers(settings: Settings, role: str = "all") -> None:
    """`warmstart worker`: the workers of `role` against `settings.temporal.address` until
    a signal."""
    stop = _stop_on_signals()
    client = await connect(settings)
    async with _metrics(client, settings, role), running_workers(client, settings, role):
        print(f"workers on {settings.temporal.address}: {_queues(settings, role)}", flush=True)
        await stop.wait()


async def run_dev(settings: Settings) -> None:
    """`warmstart dev`: run until Ctrl-C or SIGTERM, then stop workers and server cleanly."""
    stop = _stop_on_signals()
    async with dev_server(settings):
        client = await connect(settings, wait_seconds=STARTUP_SECONDS)
        async with _metrics(client, settings, "all"), running_workers(client, settings):
            print(
                f"Temporal dev server on {settings.temporal.address} "
                f"(state {settings.dev_server_db})\n"
                f"Web UI: {settings.temporal.ui_url}\n"
                f"workers: {_queues(settings)}\nCtrl-C stops them.",
                flush=True,
            )
            await stop.wait()
            print("stopping workers and server…", flush=True)
