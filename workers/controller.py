"""Composition root of the cluster controller (`warmstart controller`): the control worker
with the Kubernetes control activities, and the watcher under its Lease, in one process
(they stay separate modules); under the same Lease, unless switched off, the webhook's
certificate (`workers.webhook_certificate`, decision 0032)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket

from temporalio.client import Client

from activities.kube.client import api_client
from workers.client import connect
from workers.compose import cluster_control_worker
from workers.leader import LeaseElector
from workers.metrics import serving_metrics, watching_backlog
from workers.operations import remote_storage
from workers.settings import Settings
from workers.watcher import WatcherSettings, run_watcher
from workers.webhook_certificate import WebhookCertificate


async def run_controller(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Until `stop` is set (default: until SIGINT or SIGTERM)."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    temporal = await connect(settings)
    api = api_client(settings.kube)
    identity = settings.kube.identity or os.environ.get("HOSTNAME") or socket.gethostname()
    elector = LeaseElector(
        api,
        namespace=settings.kube.namespace,
        identity=identity,
        duration_seconds=settings.kube.lease_seconds,
    )
    kube = settings.kube
    watcher = WatcherSettings(
        control_task_queue=settings.node.control_task_queue,
        kube=kube,
        read_every_seconds=kube.read_every_seconds,
        node_timeout_seconds=kube.node_timeout_seconds,
        storage=remote_storage(settings),
    )

    async def watcher_client() -> Client:
        return await connect(settings)  # made in kopf's own loop

    alongside = []
    if settings.certificate.manage:
        certificate = WebhookCertificate(
            api, namespace=settings.kube.namespace, settings=settings.certificate
        )
        alongside.append(certificate.run)

    telemetry = settings.telemetry
    try:
        async with (
            serving_metrics(telemetry),
            watching_backlog(
                temporal,
                [settings.node.control_task_queue] if telemetry.metrics != "off" else [],
                every_seconds=telemetry.backlog_every_seconds,
            ),
            cluster_control_worker(temporal, settings, api),
        ):
            print(
                f"controller {identity}: control queue {settings.node.control_task_queue}, "
                f"leases in {settings.kube.namespace}",
                flush=True,
            )
            with contextlib.suppress(asyncio.CancelledError):
                await run_watcher(
                    watcher,
                    connect=watcher_client,
                    elector=elector,
                    stop=stop,
                    alongside=alongside,
                )
    finally:
        api.close()  # type: ignore[no-untyped-call]
