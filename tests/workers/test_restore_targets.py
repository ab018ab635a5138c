"""The node's watch of its restore targets: which pods start a restore, and that each pod
gets one RestoreWorkflow on its node's queue, also across a restarted node worker."""

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
from temporalio.service import RPCError

from activities.kube.watch import Backoff
from api.naming import node_task_queue
from api.restore_pods import STANDBY_ENV, STORAGE_ANNOTATION
from tests.kube import Cluster, start_cluster
from tests.proxy import proxied
from workers.restore_targets import RestoreTargetWatch, restore_target

CKPT = "96429b2725761a09"


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
            "annotations": {"warmstart.dev/checkpoint-version": "v1", **(annotations or {})},
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
    assert (found.checkpoint_id, found.version, found.gms_sentinel) == (CKPT, "v1", "")
    assert found.container.standby == "warmstart"


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
        target_pod(labels={"warmstart.dev/checkpoint-id": ""}),
        target_pod(annotations={"warmstart.dev/restore-status": "restored"}),
        target_pod(annotations={"warmstart.dev/restore-status": "cold: checkpoint x not found"}),
    ],
    ids=["other-node", "not-running", "not-target", "no-id", "published", "admitted-cold"],
)
def test_other_pods_ask_for_nothing(pod: dict[str, Any]) -> None:
    assert restore_target(pod, node="gpu-1") is None


def test_the_storage_annotation_says_where_to_fetch_from() -> None:
    where = json.dumps(
        {"bucket": "ckpts", "prefix": "fleet", "credentials_secret": "s3", "secret_namespace": "ns"}
    )
    found = restore_target(target_pod(annotations={STORAGE_ANNOTATION: where}), node="gpu-1")
    assert found is not None and found.storage is not None
    assert (found.storage.uri, found.storage.credentials_secret) == ("s3://ckpts/fleet/", "s3")


def test_a_storage_annotation_that_does_not_parse_is_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pod = target_pod(annotations={STORAGE_ANNOTATION: '{"bucket": "X"}'})
    found = restore_target(pod, node="gpu-1")
    assert found is not None and found.storage is None
    assert "warmstart.dev/storage is not a storage location" in caplog.text


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
    )
    stop = asyncio.Event()
    task = asyncio.create_task(watch.run(stop))
    try:
        yield watch
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_each_target_pod_gets_one_restore_on_its_node_queue(
    cluster: Cluster, client: Client
) -> None:
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

    # A restarted node worker sees the pod again: the same run, then none after it ended.
    for _ in range(2):
        async with watching(cluster, client, node) as watch:

            async def seen(watch: RestoreTargetWatch = watch) -> bool:
                return watch.considered >= 2

            await eventually(seen, "the listing")
        assert (await handle.describe()).run_id == first.run_id
        if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
            await handle.terminate("test over")
    other = f"restore/inference/{elsewhere['metadata']['name']}/"
    listed = [w.id async for w in client.list_workflows(f"WorkflowId STARTS_WITH '{other}'")]
    assert listed == []


async def test_the_node_watch_rides_out_a_broken_stream_without_listing_again(
    cluster: Cluster, client: Client
) -> None:
    """Cut off from the API server, the node's watch backs off (its health says so); once
    back, it goes on from its resourceVersion and a pod that became a target meanwhile gets
    its restore, with no list again."""
    assert cluster.emulator is not None
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
