"""The node's watch of its restore targets: which pods start a restore, that each pod gets
one RestoreWorkflow on its node's queue (also across a restarted node worker), that what it
restores comes from the pod's own Checkpoint, read when the pod is scheduled (not once its
standby runs), and that a pod saying otherwise gets a refusal."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from activities.kube.watch import Backoff
from api.naming import node_task_queue
from api.reasons import Reason
from api.restore_pods import ANNOUNCE_ENV, STANDBY_ENV
from tests.kube import Cluster, start_cluster
from tests.proxy import proxied
from workers.checkpoints import checkpoint_reader
from workers.restore_targets import RestoreTargetWatch, restore_target, scheduled_source
from workflows.contracts import RestoreRequest

CKPT = "96429b2725761a09"
OTHER_CKPT = "0123456789abcdef"
TEMPLATE = {"spec": {"containers": [{"name": "main", "image": "vllm"}]}}


def target_pod(
    name: str = "llama-0",
    *,
    node: str = "gpu-1",
    running: bool = True,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    containers: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    main = {
        "name": "main",
        "image": "vllm",
        "env": [{"name": STANDBY_ENV, "value": "1"}],
    }
    state = {"running": {"startedAt": "2026-11-27T00:00:00Z"}} if running else {"waiting": {}}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "inference",
            "uid": f"uid-{name}",
            "labels": {
                "warmstart.dev/restore-target": "true",
                "warmstart.dev/checkpoint-id": CKPT,
                **(labels or {}),
            },
            "annotations": {
                "warmstart.dev/restore-from": "llama",
                "warmstart.dev/checkpoint-version": "v1",
                **(annotations or {}),
            },
        },
        "spec": {"nodeName": node, "containers": [main, *(containers or [])]},
        "status": {
            "containerStatuses": [
                {
                    "name": "main",
                    "ready": False,
                    "state": state,
                    "image": "vllm",
                    "imageID": "",
                    "restartCount": 0,
                    "containerID": "containerd://abc123",
                }
            ]
        },
    }


def test_a_running_standby_on_this_node_asks_for_a_restore() -> None:
    found = restore_target(target_pod(), node="gpu-1")
    assert found is not None
    assert (found.container.pod_uid, found.container.container) == ("uid-llama-0", "main")
    assert found.container.container_id == "abc123"
    assert found.gms_sentinel == ""
    assert found.container.standby == "warmstart"


def test_a_target_scheduled_here_is_read_ahead_by_its_own_namespace_and_name() -> None:
    assert scheduled_source(target_pod(running=False), node="gpu-1") == ("inference", "llama")
    assert scheduled_source(target_pod(running=False), node="gpu-2") is None
    nameless = target_pod(running=False)
    del nameless["metadata"]["annotations"]["warmstart.dev/restore-from"]
    assert scheduled_source(nameless, node="gpu-1") is None
    elsewhere = target_pod(annotations={"warmstart.dev/restore-from": "team-a/llama"})
    assert scheduled_source(elsewhere, node="gpu-1") is None


def announcing(pod: dict[str, Any]) -> dict[str, Any]:
    """`pod` with a standby that announces itself (as the webhook shapes them now)."""
    pod["spec"]["containers"][0]["env"].append({"name": ANNOUNCE_ENV, "value": "1"})
    return pod


def test_a_standby_that_announces_itself_asks_for_its_restore_once_scheduled() -> None:
    """Before it runs: the restore prepares meanwhile, and finds the standby itself."""
    found = restore_target(announcing(target_pod(running=False)), node="gpu-1")
    assert found is not None
    assert found.container.announces and found.container.container_id == ""
    running = restore_target(announcing(target_pod()), node="gpu-1")
    assert running is not None and running.container.container_id == "abc123"
    assert restore_target(announcing(target_pod(running=False)), node="gpu-2") is None
    # An image's own standby announces nothing, whatever its pod says.
    image = announcing(target_pod(running=False))
    image["spec"]["containers"][0]["env"][0]["value"] = "image"
    assert restore_target(image, node="gpu-1") is None


def test_an_image_that_is_its_own_standby_is_told_apart() -> None:
    pod = target_pod()
    pod["spec"]["containers"][0]["env"] = [{"name": STANDBY_ENV, "value": "image"}]
    found = restore_target(pod, node="gpu-1")
    assert found is not None and found.container.standby == "image"


@pytest.mark.parametrize(
    "pod",
    [
        target_pod(node="gpu-2"),
        target_pod(running=False),
        target_pod(labels={"warmstart.dev/restore-target": "false"}),
        target_pod(annotations={"warmstart.dev/restore-status": "restored"}),
        target_pod(annotations={"warmstart.dev/restore-status": "cold: checkpoint x not found"}),
    ],
    ids=["other-node", "not-running", "not-target", "published", "admitted-cold"],
)
def test_other_pods_ask_for_nothing(pod: dict[str, Any]) -> None:
    assert restore_target(pod, node="gpu-1") is None


def test_gms_pods_wait_for_their_loader() -> None:
    intra = target_pod(containers=[{"name": "gms-loader", "image": "vllm"}])
    found = restore_target(intra, node="gpu-1")
    assert found is not None and found.gms_sentinel == "gms-load-complete-uid-llama-0"
    inter = target_pod()
    inter["spec"]["containers"][0]["env"].append(
        {"name": "GMS_LOAD_COMPLETE_FILE", "value": "/snapshot-control/gms-load-complete"}
    )
    found = restore_target(inter, node="gpu-1")
    assert found is not None and found.gms_sentinel == "gms-load-complete"


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async for running in start_cluster():
        yield running


async def eventually(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + 20
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def watching(
    cluster: Cluster, client: Client, node: str
) -> AsyncIterator[RestoreTargetWatch]:
    watch = RestoreTargetWatch(
        configuration=cluster.api.configuration,
        client=client,
        node=node,
        control_task_queue=f"control-{node}",
        deadline_seconds=60,
        read_checkpoint=checkpoint_reader(cluster.custom, timeout_seconds=5),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(watch.run(stop))
    try:
        yield watch
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def ready_checkpoint(
    cluster: Cluster, *, namespace: str = "inference", checkpoint_id: str = CKPT
) -> None:
    """A Ready Checkpoint `llama` of version v1, as the controller publishes it."""
    await cluster.create(
        "checkpoints",
        {
            "apiVersion": "warmstart.dev/v1alpha1",
            "kind": "Checkpoint",
            "metadata": {"name": "llama", "namespace": namespace},
            "spec": {
                "identity": {"model": "meta-llama/Llama-2-7b-hf", "backendFramework": "vllm"},
                "job": {"podTemplateSpec": TEMPLATE},
            },
            "status": {"phase": "Ready", "checkpointID": checkpoint_id, "version": "v1"},
        },
    )


async def start_request(client: Client, workflow_id: str) -> RestoreRequest:
    """What the node asked of the restore it started (its start input)."""
    handle = client.get_workflow_handle(workflow_id)
    async for event in handle.fetch_history_events():
        [payload] = event.workflow_execution_started_event_attributes.input.payloads
        [request] = client.data_converter.payload_converter.from_payloads(
            [payload], [RestoreRequest]
        )
        assert isinstance(request, RestoreRequest)
        return request
    raise AssertionError(f"{workflow_id} has no history")


async def create_pod(cluster: Cluster, body: dict[str, Any], namespace: str = "inference") -> str:
    """Create `body` (its UID the server's); the restore workflow ID it would get."""
    body["metadata"].pop("uid", None)
    body["metadata"]["namespace"] = namespace
    await cluster.run(cluster.core.create_namespaced_pod, namespace, body)
    name = body["metadata"]["name"]
    created = await cluster.run(cluster.core.read_namespaced_pod, name, namespace)
    return f"restore/{namespace}/{name}/{created.metadata.uid}"


async def test_each_target_pod_gets_one_restore_on_its_node_queue(
    cluster: Cluster, client: Client
) -> None:
    await ready_checkpoint(cluster)
    node = f"gpu-{uuid.uuid4().hex[:6]}"
    pod = target_pod(f"llama-{uuid.uuid4().hex[:6]}", node=node)
    elsewhere = target_pod(f"other-{uuid.uuid4().hex[:6]}", node="another-node")
    for body in (elsewhere, pod):
        body["metadata"].pop("uid")
        await cluster.run(cluster.core.create_namespaced_pod, "inference", body)
    created = await cluster.run(
        cluster.core.read_namespaced_pod, pod["metadata"]["name"], "inference"
    )
    workflow_id = f"restore/inference/{pod['metadata']['name']}/{created.metadata.uid}"
    handle = client.get_workflow_handle(workflow_id)

    async def started() -> bool:
        with contextlib.suppress(RPCError):
            return (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
        return False

    async with watching(cluster, client, node) as watch:
        await eventually(started, f"workflow {workflow_id}")
        assert watch.considered >= 2  # the other node's pod came by and was left alone
    first = await handle.describe()
    assert first.task_queue == node_task_queue(node)
    request = await start_request(client, workflow_id)
    assert (request.checkpoint_id, request.version, request.refusal) == (CKPT, "v1", None)

    # A restarted node worker sees the pod again: the same run, then none after it ended.
    for _ in range(2):
        async with watching(cluster, client, node) as watch:

            async def seen(watch: RestoreTargetWatch = watch) -> bool:
                return watch.considered >= 2

            await eventually(seen, "the listing")
        assert (await handle.describe()).run_id == first.run_id
        if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
            await handle.terminate("test over")
    # The other node's pod has no restore here: read by its ID (not through visibility,
    # which lags), there is no such workflow.
    other = await cluster.run(
        cluster.core.read_namespaced_pod, elsewhere["metadata"]["name"], "inference"
    )
    other_id = f"restore/inference/{elsewhere['metadata']['name']}/{other.metadata.uid}"
    with pytest.raises(RPCError) as missing:
        await client.get_workflow_handle(other_id).describe()
    assert missing.value.status == RPCStatusCode.NOT_FOUND


async def test_the_node_watch_rides_out_a_broken_stream_without_listing_again(
    cluster: Cluster, client: Client
) -> None:
    """Cut off from the API server, the node's watch backs off (its health says so); once
    back, it goes on from its resourceVersion and a pod that became a target meanwhile gets
    its restore, with no list again."""
    assert cluster.emulator is not None
    await ready_checkpoint(cluster)
    node = f"gpu-{uuid.uuid4().hex[:6]}"
    async with proxied(cluster.url) as proxy:
        configuration = copy.deepcopy(cluster.api.configuration)
        configuration.host = proxy.url
        watch = RestoreTargetWatch(
            configuration=configuration,
            client=client,
            node=node,
            control_task_queue=f"control-{node}",
            deadline_seconds=60,
            read_checkpoint=checkpoint_reader(cluster.custom, timeout_seconds=5),
            backoff=Backoff(initial=0.05, cap=0.2),
        )
        stop = asyncio.Event()
        task = asyncio.create_task(watch.run(stop))
        try:
            await eventually(_async(lambda: watch.health.state == "watching"), "the watch")
            proxy.cut()
            await eventually(_async(lambda: watch.health.failures >= 2), "failures")
            assert not watch.health.healthy
            body = target_pod(f"llama-{uuid.uuid4().hex[:6]}", node=node)
            body["metadata"].pop("uid")
            await cluster.run(cluster.core.create_namespaced_pod, "inference", body)
            created = await cluster.run(
                cluster.core.read_namespaced_pod, body["metadata"]["name"], "inference"
            )
            handle = client.get_workflow_handle(
                f"restore/inference/{body['metadata']['name']}/{created.metadata.uid}"
            )

            async def started() -> bool:
                with contextlib.suppress(RPCError):
                    return (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
                return False

            proxy.mend()
            await eventually(started, "the restore")
            assert watch.health.healthy
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    await handle.terminate("test over")
    mine = [r for r in cluster.emulator if r.params.get("fieldSelector") == f"spec.nodeName={node}"]
    lists = [r for r in mine if r.params.get("watch") != "true"]
    watches = [r for r in mine if r.params.get("watch") == "true"]
    assert len(lists) == 1 and len(watches) >= 2
    assert {r.params.get("labelSelector") for r in mine} == {"warmstart.dev/restore-target=true"}
    assert all(r.params.get("allowWatchBookmarks") == "true" for r in watches)
    listed_at = watches[0].params["resourceVersion"]
    assert {r.params["resourceVersion"] for r in watches} == {listed_at}  # nothing came between


def _async(probe: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return probe()

    return check


def checkpoint_reads(cluster: Cluster, namespace: str = "inference") -> list[Any]:
    assert cluster.emulator is not None
    path = f"/apis/warmstart.dev/v1alpha1/namespaces/{namespace}/checkpoints/llama"
    return [r for r in cluster.emulator if r.method == "GET" and r.url.path == path]


async def running(cluster: Cluster, name: str, namespace: str = "inference") -> None:
    """The kubelet reports the standby container running."""
    status = copy.deepcopy(target_pod()["status"])
    await cluster.run(cluster.core.patch_namespaced_pod_status, name, namespace, {"status": status})


async def test_the_checkpoint_is_read_when_the_pod_is_scheduled_not_when_its_standby_runs(
    cluster: Cluster, client: Client
) -> None:
    """No round trip between the standby starting and the restore: the Checkpoint was read
    (once, for every pod of it) when the pods were bound to this node."""
    await ready_checkpoint(cluster)
    ours = len(checkpoint_reads(cluster))  # the test's own, after creating it
    node = f"gpu-{uuid.uuid4().hex[:6]}"
    names = [f"llama-{uuid.uuid4().hex[:6]}" for _ in range(3)]
    async with watching(cluster, client, node) as watch:
        ids = [await create_pod(cluster, target_pod(n, node=node, running=False)) for n in names]
        await eventually(_async(lambda: watch.considered >= 3), "the scheduled pods")
        await eventually(_async(lambda: len(checkpoint_reads(cluster)) > ours), "the read ahead")
        for name in names:
            await running(cluster, name)
        for workflow_id in ids:
            await eventually(lambda w=workflow_id: _started(client, w), workflow_id)
    assert len(checkpoint_reads(cluster)) == ours + 1 and watch.checkpoints.reads == 1
    for workflow_id in ids:
        request = await start_request(client, workflow_id)
        assert (request.checkpoint_id, request.refusal) == (CKPT, None)
        await client.get_workflow_handle(workflow_id).terminate("test over")


async def test_a_pod_that_does_not_agree_with_its_own_checkpoint_is_refused(
    cluster: Cluster, client: Client
) -> None:
    """Another namespace's checkpoint ID on the label, a storage location of the pod's own
    choosing, a target copied from another namespace's pod (its Checkpoint's name has
    another ID here), or no Checkpoint named: each gets a refusal, and no checkpoint."""
    await ready_checkpoint(cluster, namespace="team-b", checkpoint_id=OTHER_CKPT)
    node = f"gpu-{uuid.uuid4().hex[:6]}"
    attacker = json.dumps({"bucket": "loot", "endpoint": "http://127.0.0.1:9", "prefix": ""})
    nameless = target_pod("nameless", node=node)
    del nameless["metadata"]["annotations"]["warmstart.dev/restore-from"]
    forged = {
        "forged-id": target_pod("forged-id", node=node),  # CKPT: team-b's llama is OTHER_CKPT
        "forged-storage": target_pod(
            "forged-storage",
            node=node,
            labels={"warmstart.dev/checkpoint-id": OTHER_CKPT},
            annotations={"warmstart.dev/storage": attacker},
        ),
        "nameless": nameless,
    }
    async with watching(cluster, client, node):
        ids = {name: await create_pod(cluster, body, "team-b") for name, body in forged.items()}
        for workflow_id in ids.values():
            await eventually(lambda w=workflow_id: _started(client, w), workflow_id)
    said = {}
    for name, workflow_id in ids.items():
        request = await start_request(client, workflow_id)
        assert request.refusal is not None, name
        assert (request.checkpoint_id, request.version, request.storage) == ("", "", None)
        said[name] = (request.refusal.reason, request.refusal.message)
        await client.get_workflow_handle(workflow_id).terminate("test over")
    assert said["forged-id"] == (
        Reason.FORBIDDEN,
        f"label warmstart.dev/checkpoint-id '{CKPT}' is not the ID of checkpoint llama "
        f"({OTHER_CKPT})",
    )
    assert said["forged-storage"] == (
        Reason.FORBIDDEN,
        "annotation warmstart.dev/storage does not name where checkpoint llama is stored",
    )
    assert said["nameless"][0] == Reason.FORBIDDEN
    assert said["nameless"][1].startswith("the pod names no Checkpoint")
    assert all("inference" not in message for _, message in said.values())
    assert checkpoint_reads(cluster, "inference") == []  # never the other namespace's


async def test_a_checkpoint_replaced_since_it_was_read_is_read_again(
    cluster: Cluster, client: Client
) -> None:
    """The read kept from another pod is older than this pod's admission: a pod that does
    not agree with it is checked against a fresh read before it is refused."""
    await ready_checkpoint(cluster)
    node = f"gpu-{uuid.uuid4().hex[:6]}"
    async with watching(cluster, client, node) as watch:
        await create_pod(cluster, target_pod("first", node=node, running=False))
        await eventually(_async(lambda: watch.checkpoints.reads == 1), "the read ahead")
        await watch.checkpoints.get("inference", "llama")  # landed (and kept): no second read
        await cluster.run(
            cluster.custom.patch_namespaced_custom_object,
            "warmstart.dev",
            "v1alpha1",
            "inference",
            "checkpoints",
            "llama",
            {"status": {"version": "v2"}},
        )
        later = target_pod(
            "later", node=node, annotations={"warmstart.dev/checkpoint-version": "v2"}
        )
        workflow_id = await create_pod(cluster, later)
        await eventually(lambda: _started(client, workflow_id), workflow_id)
    request = await start_request(client, workflow_id)
    assert (request.version, request.refusal) == ("v2", None)
    assert watch.checkpoints.reads == 2
    await client.get_workflow_handle(workflow_id).terminate("test over")


async def _started(client: Client, workflow_id: str) -> bool:
    with contextlib.suppress(RPCError):
        described = await client.get_workflow_handle(workflow_id).describe()
        return described.status == WorkflowExecutionStatus.RUNNING
    return False


async def test_a_pod_deleted_before_its_standby_ran_has_its_restore_cancelled(
    cluster: Cluster, client: Client
) -> None:
    """Started when scheduled, its restore waits for a standby that will never run: the
    pod's deletion cancels it (nothing else would end it before the node's deadline)."""
    await ready_checkpoint(cluster)
    node = f"gpu-{uuid.uuid4().hex[:6]}"
    name = f"llama-{uuid.uuid4().hex[:6]}"
    workflow_id = await create_pod(cluster, announcing(target_pod(name, node=node, running=False)))
    handle = client.get_workflow_handle(workflow_id)

    async def status_is(wanted: WorkflowExecutionStatus) -> bool:
        with contextlib.suppress(RPCError):
            return (await handle.describe()).status == wanted
        return False

    async with watching(cluster, client, node):
        await eventually(lambda: status_is(WorkflowExecutionStatus.RUNNING), "the early start")
        await cluster.run(cluster.core.delete_namespaced_pod, name, "inference")
        # No worker runs the workflow here: the cancel is requested, and it is recorded.
        await eventually(lambda: _cancel_requested(client, workflow_id), "the cancel")
    await handle.terminate("test over")


async def _cancel_requested(client: Client, workflow_id: str) -> bool:
    async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
        if event.HasField("workflow_execution_cancel_requested_event_attributes"):
            return True
    return False


async def test_a_verification_pod_is_restored_once_its_checkpoint_names_its_uid(
    cluster: Cluster, client: Client
) -> None:
    """A verified capture publishes its verification pod's UID just after creating it
    (decision 0045): a node that reads the Checkpoint first reads it again, and then
    restores the version held back on its own store; until then the pod is no target of
    anything the Checkpoint offers (it is not Ready)."""
    await cluster.create(
        "checkpoints",
        {
            "apiVersion": "warmstart.dev/v1alpha1",
            "kind": "Checkpoint",
            "metadata": {"name": "llama", "namespace": "inference"},
            "spec": {
                "identity": {"model": "meta-llama/Llama-2-7b-hf", "backendFramework": "vllm"},
                "job": {"podTemplateSpec": TEMPLATE},
                "verify": True,
            },
            "status": {"phase": "Uploading", "checkpointID": CKPT},
        },
    )
    node = f"gpu-{uuid.uuid4().hex[:6]}"
    async with watching(cluster, client, node) as watch:
        pod = target_pod(
            "llama-verify",
            node=node,
            labels={"warmstart.dev/verification": "true"},
            annotations={"warmstart.dev/checkpoint-version": "v2"},
        )
        workflow_id = await create_pod(cluster, pod)
        await eventually(_async(lambda: watch.checkpoints.reads >= 2), "reads before it is named")
        assert not await _started(client, workflow_id)
        uid = workflow_id.rsplit("/", 1)[1]
        verifying = {"version": "v2", "manifestSHA256": "ab" * 32, "podUID": uid}
        await cluster.run(
            cluster.custom.patch_namespaced_custom_object,
            "warmstart.dev",
            "v1alpha1",
            "inference",
            "checkpoints",
            "llama",
            {"status": {"verifying": verifying}},
        )
        await eventually(lambda: _started(client, workflow_id), workflow_id)
    request = await start_request(client, workflow_id)
    assert (request.version, request.refusal, request.storage) == ("v2", None, None)
    assert (request.unverified, request.manifest_sha256) == (True, "ab" * 32)
    await client.get_workflow_handle(workflow_id).terminate("test over")
