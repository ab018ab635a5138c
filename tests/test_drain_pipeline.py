"""Capture before a drain through the real pipeline (decision 0044): on a real kube-apiserver
with the webhook registered, a pod that opted in runs in a real containerd container on the
stack's node; the node is cordoned; the watcher creates the PodSnapshot, the real
CaptureWorkflow and node worker dump the container with CRIU and leave it serving; the
eviction is refused with 429 until the PodSnapshot is Ready, then allowed. The test plays the
scheduler and the kubelet (tests/cluster_stack.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from temporalio.client import Client

from api.drain import CAPTURE_ON_DRAIN_ANNOTATION, snapshot_name
from api.jobs import JobSettings
from api.restore_pods import RestoreSettings
from tests.cluster_stack import SERVING, answer_in, eventually, running_stack
from tests.containers import Kubelet, needs_containerd
from tests.kube import Cluster
from tests.test_webhook_apiserver import in_effect, register
from workers.checkpoints import checkpoint_reader
from workers.eviction import DrainReads, Evictions
from workers.settings import WebhookSettings
from workers.webhook import admission_app, self_signed_certificate, server_ssl_context, serving

pytestmark = [needs_containerd, pytest.mark.timeout(240)]
NAMESPACE = "inference"


@contextlib.asynccontextmanager
async def webhook_in_effect(cluster: Cluster, tmp_path: Any) -> AsyncIterator[None]:
    """The webhook serving on 127.0.0.1, registered through the install's configurations."""
    cert, key = self_signed_certificate(hosts=["127.0.0.1"])
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    hook = WebhookSettings(
        host="127.0.0.1",
        port=0,
        cert_file=str(tmp_path / "tls.crt"),
        key_file=str(tmp_path / "tls.key"),
    )
    app = admission_app(
        read=checkpoint_reader(cluster.custom, timeout_seconds=2),
        settings=RestoreSettings(jobs=JobSettings(checkpoint_claim="ckpts")),
        drain=Evictions(DrainReads(core=cluster.core, custom=cluster.custom, timeout_seconds=2)),
    )
    async with serving(app, settings=hook, context=server_ssl_context(hook)) as port:
        await register(cluster, url=f"https://127.0.0.1:{port}", ca=cert)
        await in_effect(cluster)
        yield


async def evict(cluster: Cluster, name: str) -> None:
    body = {
        "apiVersion": "policy/v1beta1",
        "kind": "Eviction",
        "metadata": {"name": name, "namespace": NAMESPACE},
    }
    await cluster.run(cluster.core.create_namespaced_pod_eviction, name, NAMESPACE, body)


@pytest.mark.parametrize("cluster", ["kube-apiserver"], indirect=True)
async def test_a_cordon_captures_a_real_container_and_the_eviction_waits_for_it(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Any
) -> None:
    async with (
        running_stack(client, cluster, kubelet, tmp_path) as stack,
        webhook_in_effect(cluster, tmp_path),
    ):
        await cluster.run(cluster.core.create_node, {"metadata": {"name": stack.node}})
        body = {
            "metadata": {
                "name": "llama-0",
                "annotations": {CAPTURE_ON_DRAIN_ANNOTATION: "true"},
            },
            "spec": {
                "nodeName": stack.node,
                "containers": [
                    {
                        "name": "main",
                        "image": "local/workload",
                        "command": ["python3", "-c", SERVING],
                    }
                ],
            },
        }
        pod = await cluster.run(cluster.core.create_namespaced_pod, NAMESPACE, body)
        # The kubelet: the container runs, serves, and the pod says Running and Ready.
        cid, control = kubelet.run(pod.metadata.uid, "main", ["python3", "-c", SERVING])
        await eventually(
            lambda: asyncio.sleep(0, (control / "ready-for-snapshot").exists()), "the workload"
        )
        token = (control / "token").read_text()
        await cluster.run(
            cluster.core.patch_namespaced_pod_status,
            "llama-0",
            NAMESPACE,
            {"status": {"phase": "Running"}},
        )
        await stack.report(pod, {"running": {}}, ready=True)

        await cluster.run(cluster.core.patch_node, stack.node, {"spec": {"unschedulable": True}})
        with pytest.raises(ApiException) as err:  # right after the cordon: held
            await evict(cluster, "llama-0")
        assert err.value.status == 429, err.value.body
        assert "capture before drain" in yaml.safe_load(err.value.body)["message"]

        name = snapshot_name("llama-0", pod.metadata.uid)

        async def ended() -> dict[str, Any] | None:
            try:
                found = await cluster.get("podsnapshots", NAMESPACE, name)
            except ApiException:
                return None
            status: dict[str, Any] = found.get("status") or {}
            return status if status.get("phase") in ("Ready", "Failed") else None

        final = await eventually(ended, "the drain PodSnapshot to be Ready", timeout=120)
        assert final["phase"] == "Ready", final
        # Captured, and the pod served on (leave-running).
        assert answer_in(kubelet.pid(cid)) == token
        version_dir = stack.store.version_dir(final["checkpointID"], final["version"])
        manifest = json.loads((version_dir / "manifest.json").read_text())
        assert manifest["source"]["pod"] == "llama-0"
        # Now the eviction goes.
        await evict(cluster, "llama-0")
        gone = await cluster.run(cluster.core.read_namespaced_pod, "llama-0", NAMESPACE)
        assert gone.metadata.deletion_timestamp is not None
