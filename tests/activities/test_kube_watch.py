"""The one watch (activities.kube.watch) against kmock and a real kube-apiserver, through a
TCP proxy the tests cut: list then watch, a broken stream resumed from its resourceVersion
(nothing lost, nothing twice), 410 Gone listed again, bookmarks, backoff, health."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import kmock
import pytest
import pytest_asyncio

from activities.kube.watch import Backoff, Watch, WatchEvent
from tests.apiserver import (
    APISERVER_SKIP,
    ApiServer,
    installed,
    needs_apiserver,
    running_apiserver,
)
from tests.kube import Cluster, start_cluster
from tests.proxy import Proxy, proxied

FAST = Backoff(initial=0.05, factor=2.0, cap=0.2)


@pytest.fixture(scope="module")
def apiserver() -> Iterator[ApiServer]:
    yield from running_apiserver()


@pytest_asyncio.fixture(scope="module")
async def real_cluster(apiserver: ApiServer) -> AsyncIterator[Cluster]:
    kube = await installed(apiserver, ())
    yield kube
    kube.close()


@pytest_asyncio.fixture
async def kmock_cluster() -> AsyncIterator[Cluster]:
    async for running in start_cluster():
        yield running


@pytest.fixture(params=["kmock", "kube-apiserver"])
def cluster(request: pytest.FixtureRequest) -> Cluster:
    """kmock, and the real API server where it was built (one for the module)."""
    if request.param == "kmock":
        kmock: Cluster = request.getfixturevalue("kmock_cluster")
        return kmock
    if APISERVER_SKIP is not None:
        pytest.skip(APISERVER_SKIP)
    real: Cluster = request.getfixturevalue("real_cluster")
    return real


async def fresh_namespace(cluster: Cluster) -> str:
    """A namespace of the test's own (created, with its service account, on a real server)."""
    namespace = f"ns-{uuid.uuid4().hex[:8]}"
    if cluster.emulator is None:
        await cluster.run(cluster.core.create_namespace, {"metadata": {"name": namespace}})
        account = {"metadata": {"name": "default"}, "automountServiceAccountToken": False}
        await cluster.run(cluster.core.create_namespaced_service_account, namespace, account)
    return namespace


def pod(name: str, node: str = "") -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "main", "image": "busybox"}]}
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


async def create(cluster: Cluster, namespace: str, name: str, node: str = "") -> str:
    created = await cluster.run(cluster.core.create_namespaced_pod, namespace, pod(name, node))
    if created is None:  # kmock answers a create with nothing: read it
        created = await cluster.run(cluster.core.read_namespaced_pod, name, namespace)
    return str(created.metadata.resource_version)


async def label(cluster: Cluster, namespace: str, name: str) -> None:
    body = {"metadata": {"labels": {"touched": uuid.uuid4().hex[:6]}}}
    await cluster.run(cluster.core.patch_namespaced_pod, name, namespace, body)


async def delete(cluster: Cluster, namespace: str, name: str) -> None:
    await cluster.run(cluster.core.delete_namespaced_pod, name, namespace, grace_period_seconds=0)


def without_deleting(cluster: Cluster, events: list[tuple[str, str]], name: str) -> list[Any]:
    """`events` without the one MODIFIED a real API server sends as a pod's deletion
    begins (its deletionTimestamp), before DELETED."""
    if cluster.emulator is None:
        events = list(events)
        events.remove(("MODIFIED", name))
    return events


class Seen:
    """The handler: every event handed over, as (type, name)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    async def __call__(self, event: WatchEvent) -> None:
        self.events.append((event.type, event.object["metadata"]["name"]))


async def eventually(probe: Callable[[], bool], what: str, timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not probe():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def watching(
    cluster: Cluster,
    namespace: str,
    handler: Callable[[WatchEvent], Awaitable[None]],
    **options: Any,
) -> AsyncIterator[tuple[Watch, Proxy]]:
    """A watch of the namespace's pods, through a proxy the test can cut."""
    async with proxied(cluster.url) as proxy:
        configuration = copy.deepcopy(cluster.api.configuration)
        configuration.host = proxy.url
        watch = Watch(
            configuration,
            path=f"/api/v1/namespaces/{namespace}/pods",
            kind="pods",
            namespace=namespace,
            handler=handler,
            backoff=options.pop("backoff", FAST),
            **options,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(watch.run(stop))
        try:
            yield watch, proxy
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    assert watch.health.state == "stopped"


async def test_the_watch_lists_then_follows_each_change_once(cluster: Cluster) -> None:
    namespace = await fresh_namespace(cluster)
    for name in ("a", "b"):
        await create(cluster, namespace, name)
    seen = Seen()
    async with watching(cluster, namespace, seen) as (watch, _):
        await eventually(lambda: watch.health.state == "watching", "the watch")
        listed_at = watch.health.resource_version
        assert listed_at and seen.events == [("ADDED", "a"), ("ADDED", "b")]
        await create(cluster, namespace, "c")
        await label(cluster, namespace, "a")
        await delete(cluster, namespace, "b")
        await eventually(lambda: ("DELETED", "b") in seen.events, "the changes")
        await asyncio.sleep(0.3)  # anything twice would arrive now
        assert without_deleting(cluster, seen.events[2:], "b") == [
            ("ADDED", "c"),
            ("MODIFIED", "a"),
            ("DELETED", "b"),
        ]
        assert int(watch.health.resource_version) > int(listed_at)
        assert watch.health.healthy and watch.health.relists == 0


async def test_a_broken_stream_resumes_where_it_stood(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Cut mid-stream: the watch backs off while the network is away, then watches on from
    its resourceVersion: what changed meanwhile arrives once, nothing before it again."""
    namespace = await fresh_namespace(cluster)
    for name in ("a", "b", "c"):
        await create(cluster, namespace, name)
    seen = Seen()
    caplog.set_level(logging.INFO, logger="activities.kube.watch")
    async with watching(cluster, namespace, seen) as (watch, proxy):
        await eventually(lambda: len(seen.events) == 3, "the list")
        await eventually(lambda: watch.health.state == "watching", "the watch")
        proxy.cut()
        await eventually(lambda: watch.health.failures >= 2, "failures while cut off")
        assert not watch.health.healthy
        assert "watch pods in" in watch.health.last_error
        await create(cluster, namespace, "d")
        await label(cluster, namespace, "a")
        await delete(cluster, namespace, "b")
        proxy.mend()
        await eventually(lambda: ("DELETED", "b") in seen.events, "the changes made meanwhile")
        await asyncio.sleep(0.3)  # anything twice would arrive now
    assert without_deleting(cluster, seen.events, "b") == [
        ("ADDED", "a"),
        ("ADDED", "b"),
        ("ADDED", "c"),
        ("ADDED", "d"),
        ("MODIFIED", "a"),
        ("DELETED", "b"),
    ]
    assert watch.health.relists == 0  # resumed from its resourceVersion, not listed again
    assert "answered again after" in caplog.text


async def test_410_gone_lists_again_and_hands_over_only_what_changed(
    kmock_cluster: Cluster,
) -> None:
    cluster = kmock_cluster
    assert cluster.emulator is not None
    namespace = await fresh_namespace(cluster)
    for name in ("a", "b", "c"):
        await create(cluster, namespace, name)
    seen = Seen()
    async with watching(cluster, namespace, seen) as (watch, proxy):
        await eventually(lambda: len(seen.events) == 3, "the list")
        await eventually(lambda: watch.health.state == "watching", "the watch")
        proxy.cut()
        await create(cluster, namespace, "d")
        await label(cluster, namespace, "a")
        await delete(cluster, namespace, "b")
        cluster.emulator.compact()  # the watch's resourceVersion is too old now
        proxy.mend()
        await eventually(lambda: watch.health.relists == 1, "a list again")
        await eventually(lambda: len(seen.events) >= 6, "the changes")
        await asyncio.sleep(0.3)
        assert watch.health.healthy
    assert seen.events[:3] == [("ADDED", "a"), ("ADDED", "b"), ("ADDED", "c")]
    # Nothing for c (unchanged); the deletion is told from what the watch knew.
    assert sorted(seen.events[3:]) == [("ADDED", "d"), ("DELETED", "b"), ("MODIFIED", "a")]


async def test_a_bookmark_moves_the_resource_version_on(kmock_cluster: Cluster) -> None:
    """A bookmark hands nothing over, and the next watch starts from it."""
    cluster = kmock_cluster
    assert cluster.emulator is not None
    namespace = await fresh_namespace(cluster)
    await create(cluster, namespace, "a")
    seen = Seen()
    async with watching(cluster, namespace, seen) as (watch, proxy):
        await eventually(lambda: watch.health.state == "watching", "the watch")
        await asyncio.sleep(0.1)  # the watch request is in
        version = await cluster.emulator.bookmark("pods")
        await eventually(lambda: watch.health.resource_version == version, "the bookmark")
        assert watch.health.bookmarks == 1 and seen.events == [("ADDED", "a")]
        proxy.cut()
        await eventually(lambda: watch.health.failures >= 1, "the cut")
        proxy.mend()
        await eventually(lambda: watch.health.healthy, "the watch again")
    watches = [r for r in cluster.emulator if r.params.get("watch") == "true"]
    assert watches[-1].params["resourceVersion"] == version


@needs_apiserver
async def test_a_real_api_server_bookmarks_changes_the_selector_leaves_out(
    real_cluster: Cluster,
) -> None:
    """A pod on another node changes the resourceVersion but is none of this watch's: the
    API server's bookmark carries its resourceVersion (sent before the watch's timeout)."""
    cluster = real_cluster
    namespace = await fresh_namespace(cluster)
    seen = Seen()
    async with watching(
        cluster, namespace, seen, field_selector="spec.nodeName=node-a", timeout_seconds=3
    ) as (watch, _):
        await eventually(lambda: watch.health.state == "watching", "the watch")
        elsewhere = await create(cluster, namespace, "b", node="node-b")
        await eventually(lambda: watch.health.bookmarks >= 1, "a bookmark", timeout=15)
        await eventually(
            lambda: int(watch.health.resource_version) >= int(elsewhere), "its resourceVersion"
        )
    assert seen.events == []


async def test_failures_back_off_are_logged_and_end_when_the_server_answers(
    kmock_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = kmock_cluster
    assert cluster.emulator is not None
    namespace = await fresh_namespace(cluster)
    await create(cluster, namespace, "a")
    refusal = {"kind": "Status", "code": 503, "reason": "ServiceUnavailable"}
    cluster.emulator[f"get /api/v1/namespaces/{namespace}/pods"][:3] << 503 << refusal
    seen = Seen()
    with caplog.at_level(logging.INFO, logger="activities.kube.watch"):
        async with watching(cluster, namespace, seen) as (watch, _):
            await eventually(lambda: seen.events == [("ADDED", "a")], "the list at last")
            assert watch.health.healthy and watch.health.failures == 0
    failures = [r.getMessage() for r in caplog.records if "in a row" in r.getMessage()]
    assert [m.split(" (")[1].split(";")[0] for m in failures] == [
        "failure 1 in a row",
        "failure 2 in a row",
        "failure 3 in a row",
    ]
    assert failures[0].startswith(f"list pods in {namespace}: API server answered 503")
    assert "answered again after 3 failures" in caplog.text


def test_the_backoff_doubles_up_to_its_cap() -> None:
    backoff = Backoff(initial=1.0, factor=2.0, cap=10.0)
    delays = [backoff.delay(n) for n in range(1, 7)]
    for delay, base in zip(delays, [1, 2, 4, 8, 10, 10], strict=True):
        assert 0.8 * base <= delay <= base


async def test_a_forbidden_watch_keeps_trying_and_says_why(kmock_cluster: Cluster) -> None:
    cluster = kmock_cluster
    assert cluster.emulator is not None
    namespace = await fresh_namespace(cluster)
    refusal = {"kind": "Status", "code": 403, "reason": "Forbidden"}
    forbidden = cluster.emulator[f"get /api/v1/namespaces/{namespace}/pods"] << 403 << refusal
    seen = Seen()
    async with watching(cluster, namespace, seen) as (watch, _):
        await eventually(lambda: watch.health.failures >= 3, "failures")
        assert watch.health.state == "backing off"
        assert watch.health.last_error == (
            f"forbidden (403): this worker may not list pods in {namespace} "
            "(the RBAC rules of its service account)"
        )
        cluster.emulator._payloads.remove(forbidden)  # the RBAC rule is fixed
        await eventually(lambda: watch.health.healthy, "the watch")


async def test_a_failing_handler_does_not_end_the_watch(
    kmock_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = kmock_cluster
    namespace = await fresh_namespace(cluster)
    seen = Seen()

    async def handler(event: WatchEvent) -> None:
        if event.object["metadata"]["name"] == "bad":
            raise RuntimeError("cannot handle this one")
        await seen(event)

    async with watching(cluster, namespace, handler) as (watch, _):
        await eventually(lambda: watch.health.state == "watching", "the watch")
        await create(cluster, namespace, "bad")
        await create(cluster, namespace, "good")
        await eventually(lambda: seen.events == [("ADDED", "good")], "the next event")
        assert watch.health.healthy
    assert f"watch pods in {namespace}: ADDED {namespace}/bad not handled" in caplog.text


async def test_a_server_that_ends_each_watch_at_once_is_a_failure_that_grows(
    kmock_cluster: Cluster,
) -> None:
    """An empty watch, ended at once, again and again, is not health: the failures count up
    (and so does the backoff) until the watch stays open."""
    cluster = kmock_cluster
    assert cluster.emulator is not None
    namespace = await fresh_namespace(cluster)
    path = f"/api/v1/namespaces/{namespace}/pods"
    ending = cluster.emulator[kmock.action.WATCH, path] << b""
    seen = Seen()
    async with watching(cluster, namespace, seen) as (watch, _):
        await eventually(lambda: watch.health.failures >= 3, "failures")
        assert watch.health.last_error == (
            f"watch pods in {namespace}: the API server ended the watch at once"
        )
        cluster.emulator._payloads.remove(ending)
        await eventually(lambda: watch.health.healthy, "a watch that stays open")
