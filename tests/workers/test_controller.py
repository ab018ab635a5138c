"""`warmstart controller` composed: the cluster control worker with the real
CaptureWorkflow and the watcher under its Lease, against an emulated API server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio.client import Client

from tests.kube import Cluster, start_cluster
from workers.controller import run_controller
from workers.settings import KubeSettings, NodeSettings, Settings, TemporalSettings

pytestmark = pytest.mark.timeout(120)


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async for running in start_cluster():
        yield running


async def test_the_controller_takes_the_lease_and_creates_the_capture_job(
    client: Client, cluster: Cluster, tmp_path: Path
) -> None:
    settings = Settings(
        home=tmp_path,
        temporal=TemporalSettings(address=client.service_client.config.target_host),
        node=NodeSettings(control_task_queue=f"control-{uuid.uuid4().hex[:8]}"),
        kube=KubeSettings(server=cluster.api.configuration.host, read_every_seconds=1),
    )
    stop = asyncio.Event()
    controller = asyncio.ensure_future(run_controller(settings, stop))
    try:
        await cluster.create(
            "checkpoints",
            {
                "apiVersion": "warmstart.dev/v1alpha1",
                "kind": "Checkpoint",
                "metadata": {"name": "llama", "namespace": "inference"},
                "spec": {
                    "identity": {"model": "meta-llama/Llama-2-7b-hf", "backendFramework": "vllm"},
                    "job": {
                        "podTemplateSpec": {
                            "spec": {"containers": [{"name": "main", "image": "i"}]}
                        }
                    },
                },
            },
        )

        async def status() -> dict[str, Any]:
            return (await cluster.get("checkpoints", "inference", "llama")).get("status") or {}

        for _ in range(800):
            if (await status()).get("jobName"):
                break
            assert not controller.done(), controller.exception()
            await asyncio.sleep(0.05)
        st = await status()
        assert (st["phase"], st["jobName"]) == ("Creating", "llama-96429b2725761a09")
        jobs = await cluster.run(cluster.batch.list_namespaced_job, "inference")
        assert [j.metadata.name for j in jobs.items] == ["llama-96429b2725761a09"]
        lease = await cluster.run(
            cluster.leases.read_namespaced_lease, "warmstart-watcher", "warmstart-system"
        )
        assert lease.spec.holder_identity
        # Under the same Lease, the webhook's certificate is made (decision 0032).
        for _ in range(200):
            secrets = await cluster.run(cluster.core.list_namespaced_secret, "warmstart-system")
            if secrets.items:
                break
            await asyncio.sleep(0.05)
        assert [s.metadata.name for s in secrets.items] == ["warmstart-webhook-tls"]
        assert set(secrets.items[0].data) == {"tls.crt", "tls.key", "ca.crt"}
    finally:
        stop.set()
        await asyncio.wait_for(controller, 60)
    lease = await cluster.run(
        cluster.leases.read_namespaced_lease, "warmstart-watcher", "warmstart-system"
    )
    assert not lease.spec.holder_identity  # released on a clean stop
