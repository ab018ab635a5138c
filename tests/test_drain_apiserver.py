"""Capture before a drain on a real kube-apiserver (tests/apiserver.py, decision 0044): the
watcher (kopf, the registry `workers.watcher.build_registry` makes) sees a Node cordoned and
creates the PodSnapshot of each pod that opted in; the webhook, registered through the
install's configurations and called by the API server over HTTPS, holds the pod's evictions
(policy Eviction, HTTP 429) until the capture is Ready or its deadline passed. The tests play
the kubelet (pods bound to a Node object, their status patched Running and Ready) and the
control worker (the PodSnapshot's status patched Ready); the capture workflow is a stand-in
that runs until cancelled, as in tests/test_rbac.py."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_asyncio
import yaml
from kubernetes.client.exceptions import ApiException
from temporalio import workflow
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from api.drain import (
    CAPTURE_ON_DRAIN_ANNOTATION,
    DRAIN_DEADLINE_ANNOTATION,
    DRAIN_POD_UID_LABEL,
    snapshot_name,
)
from api.jobs import JobSettings
from api.naming import CAPTURE_WORKFLOW
from api.restore_pods import RestoreSettings
from tests.apiserver import ApiServer, installed, needs_apiserver, running_apiserver
from tests.kube import Cluster
from tests.test_webhook_apiserver import in_effect, register
from workers.checkpoints import checkpoint_reader
from workers.eviction import DrainReads, Evictions
from workers.settings import KubeSettings, WebhookSettings
from workers.watcher import KopfThread, WatcherSettings, build_registry
from workers.webhook import admission_app, self_signed_certificate, server_ssl_context, serving

pytestmark = [needs_apiserver, pytest.mark.timeout(180)]
NAMESPACE = "inference"


@workflow.defn(name=CAPTURE_WORKFLOW, sandboxed=False)
class WaitingCapture:
    """Runs until cancelled: the capture the watcher starts for a PodSnapshot."""

    @workflow.run
    async def run(self, request: Any) -> None:
        await workflow.wait_condition(lambda: False)


@dataclass
class Drain:
    cluster: Cluster
    watcher: Callable[[], KopfThread]  # a fresh watcher (kopf thread), not started
    stop_webhook: Callable[[], Awaitable[None]]


@pytest.fixture(scope="module")
def apiserver() -> Iterator[ApiServer]:
    yield from running_apiserver()


@pytest_asyncio.fixture(scope="module")
async def drain(
    apiserver: ApiServer,
    temporal_env: WorkflowEnvironment,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Drain]:
    """The webhook serving and in effect; a worker of the stand-in capture; watchers made on
    demand (the tests start and stop them)."""
    cluster = await installed(apiserver, (NAMESPACE,))
    base = tmp_path_factory.mktemp("drain-tls")
    cert, key = self_signed_certificate(hosts=["127.0.0.1"])
    (base / "tls.crt").write_bytes(cert)
    (base / "tls.key").write_bytes(key)
    hook = WebhookSettings(
        host="127.0.0.1", port=0, cert_file=str(base / "tls.crt"), key_file=str(base / "tls.key")
    )
    app = admission_app(
        read=checkpoint_reader(cluster.custom, timeout_seconds=2),
        settings=RestoreSettings(jobs=JobSettings(checkpoint_claim="ckpts")),
        drain=Evictions(DrainReads(core=cluster.core, custom=cluster.custom, timeout_seconds=2)),
    )
    queue = f"control-{uuid.uuid4().hex[:8]}"
    target = temporal_env.client.service_client.config.target_host

    async def connect() -> Client:
        return await Client.connect(target, data_converter=pydantic_data_converter)

    login = KubeSettings(
        server=apiserver.url, token_file=str(apiserver.token_file), insecure_skip_tls_verify=True
    )

    def watcher() -> KopfThread:
        return KopfThread(build_registry(WatcherSettings(queue, kube=login), connect))

    async with contextlib.AsyncExitStack() as stack:
        port = await stack.enter_async_context(
            serving(app, settings=hook, context=server_ssl_context(hook))
        )
        await register(cluster, url=f"https://127.0.0.1:{port}", ca=cert)
        await in_effect(cluster)
        async with Worker(temporal_env.client, task_queue=queue, workflows=[WaitingCapture]):
            yield Drain(cluster=cluster, watcher=watcher, stop_webhook=stack.aclose)
    cluster.close()


@contextlib.asynccontextmanager
async def watching(drain: Drain) -> AsyncIterator[None]:
    operator = drain.watcher()
    await asyncio.to_thread(operator.start)
    try:
        yield
    finally:
        await asyncio.to_thread(operator.stop)


async def eventually(probe: Callable[[], Awaitable[Any]], what: str, timeout: float = 30) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = await probe()
        if found:
            return found
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def node(cluster: Cluster) -> str:
    name = f"gpu-{uuid.uuid4().hex[:6]}"
    await cluster.run(cluster.core.create_node, {"metadata": {"name": name}})
    return name


async def cordon(cluster: Cluster, name: str, *, unschedulable: bool = True) -> None:
    await cluster.run(cluster.core.patch_node, name, {"spec": {"unschedulable": unschedulable}})


async def running_pod(cluster: Cluster, node_name: str, annotations: dict[str, str]) -> Any:
    """A pod bound to `node_name`, reported Running with its container Ready (the kubelet's
    part)."""
    body = {
        "metadata": {"name": f"worker-{uuid.uuid4().hex[:6]}", "annotations": annotations},
        "spec": {
            "nodeName": node_name,
            "containers": [{"name": "main", "image": "vllm/vllm-openai:v0.8.0"}],
        },
    }
    pod = await cluster.run(cluster.core.create_namespaced_pod, NAMESPACE, body)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    status = {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True"}],
        "containerStatuses": [
            {
                "name": "main",
                "ready": True,
                "state": {"running": {"startedAt": now}},
                "image": "vllm/vllm-openai:v0.8.0",
                "imageID": "",
                "restartCount": 0,
            }
        ],
    }
    await cluster.run(
        cluster.core.patch_namespaced_pod_status,
        pod.metadata.name,
        NAMESPACE,
        {"status": status},
    )
    return pod


OPTED_IN = {CAPTURE_ON_DRAIN_ANNOTATION: "true"}


async def drain_snapshots(cluster: Cluster, *pods: Any) -> list[dict[str, Any]]:
    """The PodSnapshots labelled with any of `pods`."""
    uids = ",".join(p.metadata.uid for p in pods)
    listed = await cluster.run(
        cluster.custom.list_namespaced_custom_object,
        "warmstart.dev",
        "v1alpha1",
        NAMESPACE,
        "podsnapshots",
        label_selector=f"{DRAIN_POD_UID_LABEL} in ({uids})",
    )
    items: list[dict[str, Any]] = listed["items"]
    return items


async def taken_on(cluster: Cluster, pod: Any) -> dict[str, Any]:
    """The pod's drain PodSnapshot once the watcher's PodSnapshot handler took it on (its
    finalizer: the capture workflow started)."""

    async def probe() -> dict[str, Any] | None:
        for found in await drain_snapshots(cluster, pod):
            if "warmstart.dev/cleanup" in (found["metadata"].get("finalizers") or []):
                return found
        return None

    found: dict[str, Any] = await eventually(probe, f"the drain PodSnapshot of {pod.metadata.name}")
    return found


async def evict(cluster: Cluster, pod: Any) -> None:
    """A policy Eviction of the pod (policy/v1beta1: what a 1.20 API server serves)."""
    body = {
        "apiVersion": "policy/v1beta1",
        "kind": "Eviction",
        "metadata": {"name": pod.metadata.name, "namespace": NAMESPACE},
    }
    await cluster.run(
        cluster.core.create_namespaced_pod_eviction, pod.metadata.name, NAMESPACE, body
    )


async def refused(cluster: Cluster, pod: Any) -> str:
    """Evict the pod, expecting a 429; the message."""
    with pytest.raises(ApiException) as err:
        await evict(cluster, pod)
    assert err.value.status == 429, err.value.body
    message: str = yaml.safe_load(err.value.body)["message"]
    return message


async def evicted(cluster: Cluster, pod: Any) -> None:
    """Evict the pod, expecting it to go (deletion begun: no kubelet finishes it here)."""
    await evict(cluster, pod)
    now = await cluster.run(cluster.core.read_namespaced_pod, pod.metadata.name, NAMESPACE)
    assert now.metadata.deletion_timestamp is not None


async def ready(cluster: Cluster, name: str) -> None:
    """The control worker's part: the capture published Ready."""
    await cluster.run(
        cluster.custom.patch_namespaced_custom_object_status,
        "warmstart.dev",
        "v1alpha1",
        NAMESPACE,
        "podsnapshots",
        name,
        {"status": {"phase": "Ready", "checkpointID": "96429b2725761a09"}},
    )


async def test_a_cordon_captures_the_opted_in_pod_once_and_no_other(drain: Drain) -> None:
    cluster = drain.cluster
    name = await node(cluster)
    wanted = await running_pod(cluster, name, OPTED_IN)
    other = await running_pod(cluster, name, {})
    async with watching(drain):
        await cordon(cluster, name)
        first = await taken_on(cluster, wanted)
        assert first["metadata"]["name"] == snapshot_name(wanted.metadata.name, wanted.metadata.uid)
        assert first["spec"]["source"]["podRef"] == {
            "name": wanted.metadata.name,
            "uid": wanted.metadata.uid,
            "containers": ["main"],
        }
        # A second cordon makes nothing more.
        await cordon(cluster, name, unschedulable=False)
        await cordon(cluster, name)
    # Nor does a restarted watcher, which finds the cordoned node and the pod again.
    async with watching(drain):
        await taken_on(cluster, wanted)
        found = await drain_snapshots(cluster, wanted, other)
        assert [s["metadata"]["uid"] for s in found] == [first["metadata"]["uid"]]
        # Deleted (its capture cancelled), it is made afresh at the next cordon.
        await cordon(cluster, name, unschedulable=False)
        await cluster.run(
            cluster.custom.delete_namespaced_custom_object,
            "warmstart.dev",
            "v1alpha1",
            NAMESPACE,
            "podsnapshots",
            first["metadata"]["name"],
        )

        async def deleted() -> bool:
            return not await drain_snapshots(cluster, wanted)

        await eventually(deleted, "the drain PodSnapshot deleted")
        await cordon(cluster, name)
        again = await taken_on(cluster, wanted)
        assert again["metadata"]["uid"] != first["metadata"]["uid"]
        assert len(await drain_snapshots(cluster, wanted, other)) == 1


async def test_an_eviction_waits_for_the_capture_and_goes_once_it_is_ready(drain: Drain) -> None:
    cluster = drain.cluster
    name = await node(cluster)
    wanted = await running_pod(cluster, name, OPTED_IN)
    other = await running_pod(cluster, name, {})
    async with watching(drain):
        await cordon(cluster, name)
        snapshot = await taken_on(cluster, wanted)
        message = await refused(cluster, wanted)
        assert message.startswith(
            f'admission webhook "evictions.warmstart.dev" denied the request: pod '
            f"{NAMESPACE}/{wanted.metadata.name}: its capture before drain is Pending "
            f"(PodSnapshot {snapshot['metadata']['name']}); eviction waits until it is Ready "
            "or Failed, at most until "
        )
        await evicted(cluster, other)  # not opted in: not held
        await ready(cluster, snapshot["metadata"]["name"])
        await evicted(cluster, wanted)


async def test_an_eviction_before_the_capture_is_made_waits_and_one_past_its_deadline_goes(
    drain: Drain,
) -> None:
    cluster = drain.cluster
    name = await node(cluster)
    wanted = await running_pod(cluster, name, {**OPTED_IN, DRAIN_DEADLINE_ANNOTATION: "10"})
    # No watcher yet (kubectl drain evicts right after its cordon): held all the same.
    await cordon(cluster, name)
    message = await refused(cluster, wanted)
    assert (
        f"pod {NAMESPACE}/{wanted.metadata.name}: waiting for its capture before drain to "
        f"start (PodSnapshot {snapshot_name(wanted.metadata.name, wanted.metadata.uid)}, "
        "made by warmstart-controller); eviction waits at most until "
    ) in message
    async with watching(drain):
        snapshot = await taken_on(cluster, wanted)
        assert snapshot["metadata"]["annotations"][DRAIN_DEADLINE_ANNOTATION] == "10"
        assert "at most until" in await refused(cluster, wanted)
        created = datetime.fromisoformat(
            snapshot["metadata"]["creationTimestamp"].replace("Z", "+00:00")
        )

        async def goes() -> bool:
            try:
                await evict(cluster, wanted)
            except ApiException as err:
                assert err.status == 429, err.body
                return False
            return True

        await eventually(goes, "the eviction past the deadline", timeout=30)
        assert (datetime.now(UTC) - created).total_seconds() >= 10


async def test_without_a_controller_an_eviction_is_held_no_longer_than_the_deadline(
    drain: Drain,
) -> None:
    """No watcher ever makes the PodSnapshot (the controller away, or refused in a namespace
    that did not opt in): the hold ends at the pod's deadline all the same (this API server
    writes no managedFields, so it counts from the first eviction the webhook held)."""
    cluster = drain.cluster
    name = await node(cluster)
    wanted = await running_pod(cluster, name, {**OPTED_IN, DRAIN_DEADLINE_ANNOTATION: "10"})
    await cordon(cluster, name)
    began = datetime.now(UTC)
    assert "waiting for its capture before drain to start" in await refused(cluster, wanted)

    async def goes() -> bool:
        try:
            await evict(cluster, wanted)
        except ApiException as err:
            assert err.status == 429, err.body
            return False
        return True

    await eventually(goes, "the eviction past the deadline", timeout=30)
    assert (datetime.now(UTC) - began).total_seconds() >= 10
    assert not await drain_snapshots(cluster, wanted)


async def test_with_the_webhook_stopped_an_eviction_goes(drain: Drain) -> None:
    """Last in this module: it stops the webhook (failurePolicy Ignore)."""
    cluster = drain.cluster
    name = await node(cluster)
    wanted = await running_pod(cluster, name, OPTED_IN)
    await cordon(cluster, name)
    assert await refused(cluster, wanted)  # held while the webhook serves
    await drain.stop_webhook()
    await evicted(cluster, wanted)
