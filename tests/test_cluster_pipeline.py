"""A Checkpoint captured on a cluster, end to end: the watcher (kopf) and the control
activities against an emulated API server, the real CaptureWorkflow on the real dev
server, and a node worker that dumps a real containerd container with real CRIU. The test
plays the Job controller, the scheduler and the kubelet."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from activities.storage import CheckpointStore
from api.resources import Checkpoint
from tests.apiserver import APISERVER_SKIP, installed, running_apiserver
from tests.containers import Kubelet, needs_containerd, running_containerd
from tests.kube import Cluster, checkpoint_body, start_cluster
from workers.compose import cluster_control_worker, node_worker
from workers.settings import NodeSettings, Settings
from workers.watcher import KopfThread, WatcherSettings, build_registry

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
        kube = await installed(server, ("warmstart-system", "inference"))
        yield kube
        kube.close()


async def eventually(probe: Any, what: str, timeout: float = 60) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = await probe()
        if found:
            return found
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


@dataclass
class Stack:
    """The watcher, the control worker and a node worker of node `node`, running; the test
    plays the Job controller, the scheduler and the kubelet through its methods."""

    cluster: Cluster
    kubelet: Kubelet
    node: str
    store: CheckpointStore
    new_watcher: Callable[[], KopfThread]
    watcher: KopfThread | None = None

    async def start_watcher(self) -> None:
        self.watcher = self.new_watcher()  # a fresh registry: no memory of the last one
        await asyncio.to_thread(self.watcher.start)

    async def stop_watcher(self) -> None:
        if self.watcher is not None:
            await asyncio.to_thread(self.watcher.stop)
            self.watcher = None

    async def checkpoint(self, name: str, command: list[str]) -> dict[str, Any]:
        template = {
            "metadata": {"labels": {"app": name}},
            "spec": {
                "containers": [{"name": "main", "image": "local/workload", "command": command}]
            },
        }
        return await self.cluster.create("checkpoints", checkpoint_body(name, template))

    async def run_job_pod(self, name: str, *, node: str = "") -> tuple[Any, Any, str, Path]:
        """The Job controller and the scheduler (the Job's pod, bound to our node), and the
        kubelet (its container in containerd): returns Job, pod, container ID, control dir."""
        cluster = self.cluster

        async def job() -> Any:
            jobs = await cluster.run(cluster.batch.list_namespaced_job, "inference")
            return next(
                (
                    j
                    for j in jobs.items
                    if j.metadata.labels.get("warmstart.dev/checkpoint") == name
                ),
                None,
            )

        created = await eventually(job, "the capture Job")
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
            "spec": {**shaped["spec"], "nodeName": node or self.node},
        }
        await cluster.run(cluster.core.create_namespaced_pod, "inference", pod_body)
        pod = await cluster.run(
            cluster.core.read_namespaced_pod, pod_body["metadata"]["name"], "inference"
        )
        main = shaped["spec"]["containers"][0]
        cid, control_dir = self.kubelet.run(pod.metadata.uid, "main", main["command"])
        return created, pod, cid, control_dir

    async def report(self, pod: Any, state: dict[str, Any], *, ready: bool) -> None:
        """The kubelet reports the target container's state on the pod."""
        status = {
            "name": "main",
            "ready": ready,
            "state": state,
            "image": "local/workload",
            "imageID": "",
            "restartCount": 0,
        }
        await self.cluster.run(
            self.cluster.core.patch_namespaced_pod_status,
            pod.metadata.name,
            "inference",
            {"status": {"containerStatuses": [status]}},
        )

    async def outcome(self, name: str) -> dict[str, Any]:
        async def status() -> Any:
            obj = await self.cluster.get("checkpoints", "inference", name)
            st = obj.get("status") or {}
            return st if st.get("phase") in ("Ready", "Failed") else None

        found: dict[str, Any] = await eventually(status, f"{name} to be Ready or Failed", 90)
        return found


@contextlib.asynccontextmanager
async def running_stack(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path
) -> AsyncIterator[Stack]:
    suffix = uuid.uuid4().hex[:8]
    queue, node = f"control-{suffix}", f"gpu-{suffix}"
    # The workers as `warmstart controller` and a cluster node's `warmstart worker` build them.
    settings = Settings(
        home=tmp_path / "home",
        node=NodeSettings(name=node, control_task_queue=queue, containerd_address=kubelet.address),
    )
    store = CheckpointStore(settings.checkpoint_root)
    target = client.service_client.config.target_host

    async def connect() -> Client:
        return await Client.connect(target, data_converter=pydantic_data_converter)

    def new_watcher() -> KopfThread:
        watching = WatcherSettings(
            control_task_queue=queue,
            kube_server=cluster.url,
            kube_token=cluster.token,
            kube_insecure=cluster.token is not None,
            read_every_seconds=2,
            node_timeout_seconds=3,
        )
        return KopfThread(build_registry(watching, connect))

    base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    async with (
        cluster_control_worker(client, settings, cluster.api),
        node_worker(client, settings, base_env=base_env),
    ):
        stack = Stack(
            cluster=cluster, kubelet=kubelet, node=node, store=store, new_watcher=new_watcher
        )
        await stack.start_watcher()
        try:
            yield stack
        finally:
            await stack.stop_watcher()


async def test_a_checkpoint_is_captured_from_a_real_container(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path
) -> None:
    async with running_stack(client, cluster, kubelet, tmp_path) as stack:
        resource = await stack.checkpoint("llama", ["python3", "-c", WORKLOAD])
        created, pod, cid, control_dir = await stack.run_job_pod("llama")
        await eventually(
            lambda: asyncio.sleep(0, (control_dir / "ready-for-snapshot").exists()),
            "ready-for-snapshot",
        )
        await stack.report(pod, {"running": {}}, ready=True)
        final = await stack.outcome("llama")

    assert final["phase"] == "Ready", final
    ckpt = Checkpoint.model_validate(resource).checkpoint_id
    assert (final["checkpointID"], final["nodeName"]) == (ckpt, stack.node)
    assert final["jobName"] == created.metadata.name
    uid = resource["metadata"]["uid"]
    assert final["workflow"]["id"] == f"capture/inference/llama/{uid}"
    assert {c["type"]: c["status"] for c in final["conditions"]} == {
        "JobCreated": "True",
        "Captured": "True",
        "Uploaded": "True",
        "Ready": "True",
    }
    version_dir = stack.store.version_dir(final["checkpointID"], final["version"])
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert manifest["source"]["pod"] == pod.metadata.name
    assert final["sizeBytes"] > 4 << 20
    # snapshot-complete was written: the workload ended by itself.
    await eventually(
        lambda: asyncio.sleep(0, stack.kubelet.status(cid) == "STOPPED"), "the workload to exit"
    )
    print("capture step seconds:", json.dumps(final["stepSeconds"]))


async def test_a_workload_that_exits_non_zero_fails_the_capture_and_its_job_goes(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path
) -> None:
    crash = "import sys; print('out of memory loading weights', flush=True); sys.exit(3)"
    async with running_stack(client, cluster, kubelet, tmp_path) as stack:
        await stack.checkpoint("crashing", ["python3", "-c", crash])
        created, pod, cid, _control = await stack.run_job_pod("crashing")
        await eventually(
            lambda: asyncio.sleep(0, stack.kubelet.status(cid) == "STOPPED"), "the crash"
        )
        await stack.report(pod, {"terminated": {"exitCode": 3, "reason": "Error"}}, ready=False)
        final = await stack.outcome("crashing")

        async def job_gone() -> bool:
            jobs = await cluster.run(cluster.batch.list_namespaced_job, "inference")
            return created.metadata.name not in [j.metadata.name for j in jobs.items]

        await eventually(job_gone, "the failed capture's Job to be deleted")
    assert final["phase"] == "Failed"
    assert final["message"] == "container main exited with code 3 (Error)"
    ready = next(c for c in final["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "WorkloadExited")
    assert stack.store.staged() == []


async def test_a_pod_on_a_node_without_a_node_worker_is_node_lost(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path
) -> None:
    async with running_stack(client, cluster, kubelet, tmp_path) as stack:
        await stack.checkpoint("orphan", ["python3", "-c", WORKLOAD])
        _created, pod, _cid, control_dir = await stack.run_job_pod("orphan", node="gpu-gone")
        await eventually(
            lambda: asyncio.sleep(0, (control_dir / "ready-for-snapshot").exists()),
            "ready-for-snapshot",
        )
        await stack.report(pod, {"running": {}}, ready=True)
        final = await stack.outcome("orphan")
    assert final["phase"] == "Failed"
    assert final["nodeName"] == "gpu-gone"
    assert "node gpu-gone" in final["message"] and "dump_container" in final["message"]
    ready = next(c for c in final["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "NodeLost"


async def test_a_watcher_restarted_mid_capture_finishes_it_once(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path
) -> None:
    async with running_stack(client, cluster, kubelet, tmp_path) as stack:
        resource = await stack.checkpoint("restarted", ["python3", "-c", WORKLOAD])
        _created, pod, _cid, control_dir = await stack.run_job_pod("restarted")
        await eventually(
            lambda: asyncio.sleep(0, (control_dir / "ready-for-snapshot").exists()),
            "ready-for-snapshot",
        )
        await stack.stop_watcher()  # down while the pod becomes Ready: a missed event
        await stack.report(pod, {"running": {}}, ready=True)
        await stack.start_watcher()
        final = await stack.outcome("restarted")
    assert final["phase"] == "Ready", final
    workflow_id = f"capture/inference/restarted/{resource['metadata']['uid']}"
    runs = [run async for run in client.list_workflows(f"WorkflowId = '{workflow_id}'")]
    assert len(runs) == 1
