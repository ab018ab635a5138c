"""The Lease elector against an emulated API server (tests/kube.py) and a proxy that fails
the way networks do (tests/proxy.py): renewals retried until their deadline, a holder cut
off steps down before another replica may take over."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from kubernetes import client

from api.errors import InvalidSpecError
from tests.kube import Cluster, start_cluster
from tests.proxy import proxied
from workers.leader import LeaseElector

pytestmark = pytest.mark.timeout(60)
NAMESPACE = "warmstart-system"
LEASES = f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases"


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async for running in start_cluster():
        yield running


def refuse(cluster: Cluster, request: str, status: int, *, times: int) -> None:
    """The API server answers the next `times` of `request` ("verb /path") with `status`
    (kmock counts a view's requests from the first, those answered already included)."""
    assert cluster.emulator is not None
    body = {"kind": "Status", "apiVersion": "v1", "code": status, "reason": f"Status{status}"}
    view = cluster.emulator[request]
    seen = len(list(view))
    view[seen : seen + times] << status << body


def api_at(url: str) -> client.ApiClient:
    configuration = client.Configuration()
    configuration.host = url
    return client.ApiClient(configuration)


async def renew_time(cluster: Cluster, name: str = "warmstart-watcher") -> Any:
    """The Lease's renewTime, read by a list (the refusals below answer the elector's reads)."""
    leases = await cluster.run(cluster.leases.list_namespaced_lease, NAMESPACE)
    [lease] = [item for item in leases.items if item.metadata.name == name]
    return lease.spec.renew_time


async def renewed_after(cluster: Cluster, before: Any, holding: asyncio.Future[None]) -> None:
    """Wait until the Lease shows a renewal newer than `before`, the hold running all along."""
    while await renew_time(cluster) == before:
        assert not holding.done(), "the holder stepped down"
        await asyncio.sleep(0.05)


def test_timings_must_let_the_holder_stop_before_anyone_takes_over() -> None:
    api = client.ApiClient()
    with pytest.raises(InvalidSpecError, match="renew deadline"):
        LeaseElector(api, namespace=NAMESPACE, identity="a", renew_deadline_seconds=20)
    with pytest.raises(InvalidSpecError, match="retry period"):
        LeaseElector(
            api,
            namespace=NAMESPACE,
            identity="a",
            renew_deadline_seconds=10,
            retry_period_seconds=9,
        )
    elector = LeaseElector(api, namespace=NAMESPACE, identity="a")
    assert (elector.duration, elector.renew_deadline, elector.retry_period) == (15, 10, 2)


async def test_renewals_the_api_server_refuses_for_a_while_are_retried_and_the_lease_kept(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="workers.leader")
    a = LeaseElector(cluster.api, namespace=NAMESPACE, identity="a", duration_seconds=3)
    assert await a.try_acquire()
    refuse(cluster, f"get {LEASES}/warmstart-watcher", 503, times=2)
    refuse(cluster, f"patch {LEASES}/warmstart-watcher", 500, times=1)
    stop = asyncio.Event()
    holding = asyncio.ensure_future(a.hold(stop))
    try:
        while "a renewed the lease after 3 failures" not in caplog.text:
            assert not holding.done(), caplog.text
            await asyncio.sleep(0.05)
        # and it goes on renewing (kmock stores a patch it answers 500: read what follows)
        await asyncio.wait_for(renewed_after(cluster, await renew_time(cluster), holding), 10)
    finally:
        stop.set()
        await holding
    failures = [r.getMessage() for r in caplog.records if "could not renew" in r.getMessage()]
    assert len(failures) == 3, failures
    assert "answered 503" in failures[0] and "answered 500" in failures[2]


async def test_a_renewal_through_a_network_that_drops_connections_is_retried(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    async with proxied(cluster.url) as proxy:
        api = api_at(proxy.url)
        a = LeaseElector(api, namespace=NAMESPACE, identity="a", duration_seconds=4)
        stop = asyncio.Event()
        assert await a.try_acquire()
        holding = asyncio.ensure_future(a.hold(stop))
        try:
            proxy.cut()
            while "could not renew" not in caplog.text:  # a renewal met the cut
                assert not holding.done()
                await asyncio.sleep(0.05)
            before = await renew_time(cluster)
            proxy.mend()
            await asyncio.wait_for(renewed_after(cluster, before, holding), 20)
            assert "API server unreachable" in caplog.text
        finally:
            stop.set()
            await holding
            api.close()  # type: ignore[no-untyped-call]


async def test_a_holder_cut_off_steps_down_before_another_replica_takes_over(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The network drops the holder's packets: its calls hang. The renew deadline bounds
    them, so the holder has stepped down by the time the candidate's own clock lets it take
    the Lease over."""
    async with proxied(cluster.url) as proxy:
        api = api_at(proxy.url)
        a = LeaseElector(api, namespace=NAMESPACE, identity="a", duration_seconds=2)
        b = LeaseElector(cluster.api, namespace=NAMESPACE, identity="b", duration_seconds=2)
        a_stop, b_stop = asyncio.Event(), asyncio.Event()
        assert await a.try_acquire()
        holding = asyncio.ensure_future(a.hold(a_stop))
        acquiring = asyncio.ensure_future(b.acquire(b_stop))
        try:
            before = await renew_time(cluster)
            await asyncio.wait_for(renewed_after(cluster, before, holding), 10)
            proxy.stall()
            assert await asyncio.wait_for(acquiring, 20)
            assert holding.done(), "b took the Lease over while a still counted itself holder"
            assert "a steps down: no renewal of the lease warmstart-watcher held" in caplog.text
        finally:
            a_stop.set()
            b_stop.set()
            proxy.mend()
            await asyncio.gather(holding, acquiring, return_exceptions=True)
            api.close()  # type: ignore[no-untyped-call]


async def test_a_holder_whose_work_ended_steps_down(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """kopf's thread ended by itself (the watcher passes `operator.alive`): the holder
    steps down rather than hold the Lease while nothing acts."""
    a = LeaseElector(cluster.api, namespace=NAMESPACE, identity="a", duration_seconds=2)
    assert await a.try_acquire()
    working = asyncio.Event()
    working.set()
    holding = asyncio.ensure_future(a.hold(asyncio.Event(), alive=working.is_set))
    before = await renew_time(cluster)
    await asyncio.wait_for(renewed_after(cluster, before, holding), 10)  # holding, renewing
    working.clear()
    await asyncio.wait_for(holding, 10)
    assert "a steps down: the work it leads has ended" in caplog.text
