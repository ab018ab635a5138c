"""The webhook's eviction answers (workers/eviction.py) over the real `kubernetes` client
against kmock: the reads made, the first holds counted (not by a dry run), and a read that
fails letting the eviction go."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest_asyncio
from kubernetes import client

from api.drain import CAPTURE_ON_DRAIN_ANNOTATION, DRAIN_DEADLINE_ANNOTATION
from tests.kube import Cluster, start_cluster
from workers.eviction import DrainReads, Evictions, FirstHolds, eviction_wait
from workers.ports import free_port

NAMESPACE = "inference"
T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async for running in start_cluster():
        yield running


async def cordoned_pod(cluster: Cluster, name: str, annotations: dict[str, str]) -> None:
    await cluster.run(
        cluster.core.create_node, {"metadata": {"name": "gpu-1"}, "spec": {"unschedulable": True}}
    )
    body = {
        "metadata": {"name": name, "namespace": NAMESPACE, "annotations": annotations},
        "spec": {"nodeName": "gpu-1", "containers": [{"name": "main", "image": "i"}]},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {"name": "main", "ready": True, "image": "i", "imageID": "", "restartCount": 0}
            ],
        },
    }
    await cluster.run(cluster.core.create_namespaced_pod, NAMESPACE, body)


def evictions(cluster: Cluster) -> Evictions:
    return Evictions(DrainReads(core=cluster.core, custom=cluster.custom, timeout_seconds=2))


async def test_an_opted_in_pod_is_held_from_the_first_hold_until_its_deadline(
    cluster: Cluster,
) -> None:
    await cordoned_pod(
        cluster, "llama-0", {CAPTURE_ON_DRAIN_ANNOTATION: "true", DRAIN_DEADLINE_ANNOTATION: "60"}
    )
    answers = evictions(cluster)
    # A dry run is answered alike, and starts no count.
    dry = await eviction_wait(NAMESPACE, "llama-0", evictions=answers, now=T0, dry_run=True)
    assert dry is not None and dry.endswith("at most until 2026-12-06T12:01:00Z")
    later = T0 + timedelta(seconds=30)
    first = await eviction_wait(NAMESPACE, "llama-0", evictions=answers, now=later)
    assert first is not None and first.endswith("at most until 2026-12-06T12:01:30Z")
    # Counted from that first hold, not from each ask.
    on = later + timedelta(seconds=59)
    assert await eviction_wait(NAMESPACE, "llama-0", evictions=answers, now=on) == first
    past = later + timedelta(seconds=60)
    assert await eviction_wait(NAMESPACE, "llama-0", evictions=answers, now=past) is None


async def test_a_pod_not_opted_in_or_not_there_is_not_held(cluster: Cluster) -> None:
    await cordoned_pod(cluster, "other-0", {})
    answers = evictions(cluster)
    assert await eviction_wait(NAMESPACE, "other-0", evictions=answers, now=T0) is None
    assert await eviction_wait(NAMESPACE, "missing", evictions=answers, now=T0) is None


async def test_a_read_that_fails_lets_the_eviction_go() -> None:
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    api = client.ApiClient(configuration)
    try:
        reads = DrainReads(
            core=client.CoreV1Api(api), custom=client.CustomObjectsApi(api), timeout_seconds=2
        )
        wait = await eviction_wait(NAMESPACE, "llama-0", evictions=Evictions(reads), now=T0)
    finally:
        api.close()  # type: ignore[no-untyped-call]
    assert wait is None


def test_first_holds_are_kept_the_longest_deadline_and_at_most_so_many() -> None:
    holds = FirstHolds(max_entries=2)
    holds.held("a", T0)
    holds.held("a", T0 + timedelta(seconds=5))  # the first stays
    assert holds.get("a", T0) == T0
    holds.held("b", T0)
    holds.held("c", T0)  # over the cap: the oldest goes
    assert holds.get("a", T0) is None
    assert holds.get("b", T0) == T0 and holds.get("c", T0) == T0
    an_hour_on = T0 + timedelta(seconds=3601)
    assert holds.get("b", an_hour_on) is None and holds.get("c", an_hour_on) is None
