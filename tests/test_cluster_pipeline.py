"""A Checkpoint captured on a cluster, end to end: the watcher (kopf) and the control
activities against an emulated API server, the real CaptureWorkflow on the real dev
server, and a node worker that dumps a real containerd container with real CRIU. The test
plays the Job controller, the scheduler and the kubelet."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Worker

from activities.containerd import Containerd, ContainerdActivities
from activities.criu import DUMP_OPTIONS, Criu
from activities.errors import ErrorMapping
from activities.kube import KubeControlActivities
from activities.layout import NodeLayout
from activities.storage import CheckpointStore, StorageActivities
from api.manifest import CriuInfo
from api.naming import node_task_queue
from tests.apiserver import APISERVER_SKIP, installed, running_apiserver
from tests.containers import Kubelet, needs_containerd, running_containerd
from tests.kube import Cluster, start_cluster
from workers.settings import CriuSettings
from workers.watcher import KopfThread, WatcherSettings, build_registry
from workflows.capture import CaptureWorkflow

pytestmark = [needs_containerd, pytest.mark.timeout(180)]

WORKLOAD = (
    "import os, time\n"
    "control = os.environ['SNAPSHOT_CONTROL_DIR']\n"
    "weights = bytearray(os.urandom(4 << 20))\n"
    "time.sleep(0.5)\n"
    "open(control + '/ready-for-snapshot', 'w').close()\n"
    "while not os.path.exists(control + '/snapshot-complete'):\n"
    "    time.sleep(0.05)\n"
)


@pytest.fixture
def kubelet() -> Iterator[Kubelet]:
    yield from running_containerd()


@pytest_asyncio.fixture(params=["kmock", "kube-apiserver"])
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    """The emulated API server, and a real one where it was built (the integration tier)."""
    if request.param == "kmock":
        async for running in start_cluster():
            yield running
        return
    if APISERVER_SKIP is not None:
        pytest.skip(APISERVER_SKIP)
    for server in running_apiserver():
        yield await installed(server, ("warmstart-system", "inference"))


async def eventually(probe: Any, what: str, timeout: float = 60) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = await probe()
        if found:
            return found
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_a_checkpoint_is_captured_from_a_real_container(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:8]
    queue, node = f"control-{suffix}", f"gpu-{suffix}"
    criu_path = CriuSettings().resolve()
    assert criu_path is not None
    criu = Criu(criu_path)
    store = CheckpointStore(tmp_path / "checkpoints")
    control = KubeControlActivities(
        cluster.api, claims_namespace="warmstart-system", ui_url="http://localhost:8233"
    )
    pods = ContainerdActivities(
        runtime=Containerd(address=kubelet.address), criu=criu, store=store, node=node
    )
    storage = StorageActivities(
        store=store,
        layout=NodeLayout(tmp_path),
        node=node,
        criu=CriuInfo(version=criu.version(), options=DUMP_OPTIONS),
    )
    target = client.service_client.config.target_host

    async def connect() -> Client:
        return await Client.connect(target, data_converter=pydantic_data_converter)

    watcher = KopfThread(
        build_registry(
            WatcherSettings(
                control_task_queue=queue,
                kube_server=cluster.url,
                kube_token=cluster.token,
                kube_insecure=cluster.token is not None,
                read_every_seconds=2,
            ),
            connect,
        )
    )
    template = {
        "metadata": {"labels": {"app": "llama"}},
        "spec": {
            "containers": [
                {"name": "main", "image": "local/workload", "command": ["python3", "-c", WORKLOAD]}
            ]
        },
    }
    async with (
        Worker(
            client,
            task_queue=queue,
            workflows=[CaptureWorkflow],
            activities=[
                control.claim_checkpoint_id,
                control.publish_status,
                control.create_capture_job,
                control.read_capture_pod,
                control.delete_capture_job,
            ],
            interceptors=[ErrorMapping()],
        ),
        Worker(
            client,
            task_queue=node_task_queue(node),
            activities=[
                pods.await_gms_saved,
                pods.dump_container,
                pods.commit_container,
                pods.write_container_sentinel,
                storage.discard_staging,
            ],
            interceptors=[ErrorMapping()],
        ),
    ):
        await asyncio.to_thread(watcher.start)
        try:
            resource = await cluster.create(
                "checkpoints",
                {
                    "apiVersion": "warmstart.dev/v1alpha1",
                    "kind": "Checkpoint",
                    "metadata": {"name": "llama", "namespace": "inference"},
                    "spec": {
                        "identity": {
                            "model": "meta-llama/Llama-2-7b-hf",
                            "backendFramework": "vllm",
                        },
                        "job": {"podTemplateSpec": template},
                    },
                },
            )

            async def job() -> Any:
                jobs = await cluster.run(cluster.batch.list_namespaced_job, "inference")
                return jobs.items[0] if jobs.items else None

            created = await eventually(job, "the capture Job")
            # The Job controller and the scheduler: the Job's pod, bound to our node.
            shaped = cluster.api.sanitize_for_serialization(created.spec.template)
            pod_body = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    **shaped["metadata"],
                    "name": f"{created.metadata.name}-x1",
                    "namespace": "inference",
                    "labels": {**shaped["metadata"]["labels"], "job-name": created.metadata.name},
                },
                "spec": {**shaped["spec"], "nodeName": node},
            }
            await cluster.run(cluster.core.create_namespaced_pod, "inference", pod_body)
            pod = await cluster.run(
                cluster.core.read_namespaced_pod, pod_body["metadata"]["name"], "inference"
            )
            # The kubelet: run the target container, report Ready from the real sentinel.
            main = shaped["spec"]["containers"][0]
            cid, control_dir = kubelet.run(pod.metadata.uid, "main", main["command"])
            await eventually(
                lambda: asyncio.sleep(0, (control_dir / "ready-for-snapshot").exists()),
                "ready-for-snapshot",
            )
            ready = {
                "name": "main",
                "ready": True,
                "state": {"running": {}},
                "image": "local/workload",
                "imageID": "",
                "restartCount": 0,
            }
            await cluster.run(
                cluster.core.patch_namespaced_pod_status,
                pod.metadata.name,
                "inference",
                {"status": {"containerStatuses": [ready]}},
            )

            async def status() -> Any:
                obj = await cluster.get("checkpoints", "inference", "llama")
                st = obj.get("status") or {}
                return st if st.get("phase") in ("Ready", "Failed") else None

            final = await eventually(status, "the Checkpoint to be Ready", timeout=90)
        finally:
            await asyncio.to_thread(watcher.stop)

    assert final["phase"] == "Ready", final
    assert (final["checkpointID"], final["nodeName"]) == ("96429b2725761a09", node)
    assert final["jobName"] == created.metadata.name
    uid = resource["metadata"]["uid"]
    assert final["workflow"]["id"] == f"capture/inference/llama/{uid}"
    assert {c["type"]: c["status"] for c in final["conditions"]} == {
        "JobCreated": "True",
        "Captured": "True",
        "Uploaded": "True",
        "Ready": "True",
    }
    version_dir = store.version_dir("96429b2725761a09", final["version"])
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert manifest["source"]["pod"] == pod.metadata.name
    assert final["sizeBytes"] > 4 << 20
    # snapshot-complete was written: the workload ended by itself.
    await eventually(
        lambda: asyncio.sleep(0, kubelet.status(cid) == "STOPPED"), "the workload to exit"
    )
    print("capture step seconds:", json.dumps(final["stepSeconds"]))
