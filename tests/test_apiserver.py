"""The integration tier: a real kube-apiserver with etcd (tests/apiserver.py). The CRDs of
deploy/crds/ are installed for real; the controller (watcher under its Lease, control
activities, the real CaptureWorkflow) runs against it; the tests play the Job controller."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from kubernetes.client.exceptions import ApiException
from temporalio.client import Client

from tests.apiserver import ApiServer, installed, needs_apiserver, running_apiserver
from tests.kube import Cluster, checkpoint_body
from workers.controller import run_controller
from workers.leader import LeaseElector
from workers.settings import KubeSettings, NodeSettings, Settings, TemporalSettings

pytestmark = [needs_apiserver, pytest.mark.timeout(180)]
REPO = Path(__file__).resolve().parents[1]
TEMPLATE = {"spec": {"containers": [{"name": "main", "image": "vllm/vllm-openai:v0.8.0"}]}}


@pytest.fixture(scope="module")
def apiserver() -> Iterator[ApiServer]:
    yield from running_apiserver()


@pytest_asyncio.fixture(scope="module")
async def cluster(apiserver: ApiServer) -> AsyncIterator[Cluster]:
    kube = await installed(apiserver, ("warmstart-system", "inference"))
    yield kube
    kube.close()


def checkpoint(name: str, **spec: Any) -> dict[str, Any]:
    return checkpoint_body(name, TEMPLATE, **spec)


async def test_the_crds_serve_a_status_subresource_defaults_and_conflicts(cluster: Cluster) -> None:
    created = await cluster.create("checkpoints", checkpoint("schema"))
    # The schema's defaults are applied by the API server.
    assert created["spec"]["job"]["targetContainerName"] == "main"
    assert created["spec"]["job"]["activeDeadlineSeconds"] == 3600
    # Status goes through /status only; spec through the resource only.
    await cluster.run(
        cluster.custom.patch_namespaced_custom_object_status,
        "warmstart.dev",
        "v1alpha1",
        "inference",
        "checkpoints",
        "schema",
        {"status": {"phase": "Capturing"}, "spec": {"job": {"targetContainerName": "x"}}},
    )
    await cluster.run(
        cluster.custom.patch_namespaced_custom_object,
        "warmstart.dev",
        "v1alpha1",
        "inference",
        "checkpoints",
        "schema",
        {"status": {"phase": "Ready"}},
    )
    now = await cluster.get("checkpoints", "inference", "schema")
    assert now["status"]["phase"] == "Capturing"
    assert now["spec"]["job"]["targetContainerName"] == "main"
    # A write that carries a resourceVersion someone has moved past is a conflict.
    stale = {
        "metadata": {"resourceVersion": created["metadata"]["resourceVersion"]},
        "status": {"phase": "Failed"},
    }
    with pytest.raises(ApiException) as err:
        await cluster.run(
            cluster.custom.patch_namespaced_custom_object_status,
            "warmstart.dev",
            "v1alpha1",
            "inference",
            "checkpoints",
            "schema",
            stale,
        )
    assert err.value.status == 409
    # The schema refuses what the models refuse.
    with pytest.raises(ApiException) as err:
        await cluster.create(
            "checkpoints", checkpoint("bad", identity={"model": "m", "backendFramework": "tgi"})
        )
    assert err.value.status == 422 and "backendFramework" in str(err.value.body)


async def test_the_controller_captures_on_a_real_api_server(
    client: Client, cluster: Cluster, apiserver: ApiServer, tmp_path: Path
) -> None:
    settings = Settings(
        home=tmp_path,
        temporal=TemporalSettings(address=client.service_client.config.target_host),
        node=NodeSettings(control_task_queue=f"control-{uuid.uuid4().hex[:8]}"),
        kube=KubeSettings(
            server=apiserver.url,
            token_file=str(apiserver.token_file),
            insecure_skip_tls_verify=True,
            read_every_seconds=1,
        ),
    )
    stop = asyncio.Event()
    controller = asyncio.ensure_future(run_controller(settings, stop))
    try:
        uid = (await cluster.create("checkpoints", checkpoint("llama")))["metadata"]["uid"]

        async def status() -> dict[str, Any]:
            return (await cluster.get("checkpoints", "inference", "llama")).get("status") or {}

        for _ in range(300):
            if (await status()).get("jobName"):
                break
            assert not controller.done(), controller.exception()
            await asyncio.sleep(0.1)
        st = await status()
        assert (
            st["phase"] == "Creating" and st["workflow"]["id"] == f"capture/inference/llama/{uid}"
        )
        job = await cluster.run(cluster.batch.read_namespaced_job, st["jobName"], "inference")
        assert job.spec.backoff_limit == 0 and job.metadata.owner_references[0].uid == uid
        events = await cluster.run(cluster.events.list_namespaced_event, "inference")
        assert ("Normal", "CaptureStarted") in [(e.type, e.reason) for e in events.items]
        meta = (await cluster.get("checkpoints", "inference", "llama"))["metadata"]
        assert "warmstart.dev/cleanup" in meta["finalizers"]

        # Deleting it cancels the capture; its Job goes; then the finalizer is released.
        await cluster.run(
            cluster.custom.delete_namespaced_custom_object,
            "warmstart.dev",
            "v1alpha1",
            "inference",
            "checkpoints",
            "llama",
        )
        for _ in range(300):
            try:
                await cluster.get("checkpoints", "inference", "llama")
            except ApiException as err:
                assert err.status == 404
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the Checkpoint was never released")
        jobs = await cluster.run(cluster.batch.list_namespaced_job, "inference")
        assert st["jobName"] not in [j.metadata.name for j in jobs.items]
    finally:
        stop.set()
        await asyncio.wait_for(controller, 60)


async def test_one_lease_holder_on_a_real_api_server(cluster: Cluster) -> None:
    a = LeaseElector(
        cluster.api, namespace="warmstart-system", identity="a", name="t", duration_seconds=1
    )
    b = LeaseElector(
        cluster.api, namespace="warmstart-system", identity="b", name="t", duration_seconds=1
    )
    assert await a.try_acquire()
    assert not await b.try_acquire()
    stop = asyncio.Event()
    assert await asyncio.wait_for(b.acquire(stop), 10)  # a stopped renewing
    assert not await a.renew()
    await b.release()
    assert await a.try_acquire()


@pytest.mark.parametrize("skew", [-3600, 3600], ids=["holder-clock-behind", "holder-clock-ahead"])
async def test_a_holder_with_a_skewed_clock_keeps_the_lease_while_it_renews(
    cluster: Cluster, skew: int
) -> None:
    """The holder writes renewTime by a clock an hour off. The candidate judges the Lease
    by when it saw the record change on its own clock: it takes nothing while the holder
    renews, and takes over one lease duration after the holder stopped."""
    name = f"skew-{uuid.uuid4().hex[:8]}"

    def skewed() -> datetime:
        return datetime.now(UTC) + timedelta(seconds=skew)

    a = LeaseElector(
        cluster.api,
        namespace="warmstart-system",
        identity="a",
        name=name,
        duration_seconds=3,
        clock=skewed,
    )
    b = LeaseElector(
        cluster.api, namespace="warmstart-system", identity="b", name=name, duration_seconds=3
    )
    assert await a.try_acquire()
    a_stop, b_stop = asyncio.Event(), asyncio.Event()
    holding = asyncio.ensure_future(a.hold(a_stop))
    acquiring = asyncio.ensure_future(b.acquire(b_stop))
    try:
        # a renews through two lease durations while b tries every retry period.
        seen, began = set(), time.monotonic()
        while time.monotonic() - began < 2 * a.duration:
            lease = await cluster.run(
                cluster.leases.read_namespaced_lease, name, "warmstart-system"
            )
            assert lease.spec.holder_identity == "a"
            assert abs((lease.spec.renew_time - datetime.now(UTC)).total_seconds() - skew) < 60
            seen.add(lease.spec.renew_time)
            assert not holding.done() and not acquiring.done()
            await asyncio.sleep(0.1)
        assert len(seen) >= 3  # it did renew
        holding.cancel()  # a dies: no release, no more renewals
        # One lease duration after a's last write, plus b's next try; generous, as a loaded
        # machine slows the API server's answers and both electors' threads.
        assert await asyncio.wait_for(acquiring, 45)
        lease = await cluster.run(cluster.leases.read_namespaced_lease, name, "warmstart-system")
        assert (lease.spec.holder_identity, lease.spec.lease_transitions) == ("b", 1)
    finally:
        a_stop.set()
        b_stop.set()
        await asyncio.gather(holding, acquiring, return_exceptions=True)


async def test_a_second_controller_stays_passive_until_the_first_dies(
    client: Client, cluster: Cluster, apiserver: ApiServer, tmp_path: Path
) -> None:
    queue = f"control-{uuid.uuid4().hex[:8]}"

    def settings(name: str) -> Settings:
        return apiserver.controller_settings(
            home=tmp_path / name,
            temporal=client.service_client.config.target_host,
            queue=queue,
            identity=name,
            lease_seconds=2,
        )

    async def holder() -> str | None:
        try:
            lease = await cluster.run(
                cluster.leases.read_namespaced_lease, "warmstart-watcher", "warmstart-system"
            )
        except ApiException:
            return None
        return lease.spec.holder_identity

    first_stop, second_stop = asyncio.Event(), asyncio.Event()
    first = asyncio.ensure_future(run_controller(settings("first"), first_stop))
    for _ in range(300):
        if await holder() == "first":
            break
        await asyncio.sleep(0.1)
    assert await holder() == "first"
    second = asyncio.ensure_future(run_controller(settings("second"), second_stop))
    try:
        await asyncio.sleep(3)  # longer than the Lease: the first renews, the second waits
        assert await holder() == "first"
        first.cancel()  # it dies: no release, renewals stop
        with contextlib.suppress(asyncio.CancelledError):
            await first
        for _ in range(300):
            if await holder() == "second":
                break
            await asyncio.sleep(0.1)
        assert await holder() == "second"
        # The new leader acts: a new Checkpoint gets its capture Job.
        await cluster.create("checkpoints", checkpoint("after-failover"))
        for _ in range(300):
            st = (await cluster.get("checkpoints", "inference", "after-failover")).get(
                "status"
            ) or {}
            if st.get("jobName"):
                break
            await asyncio.sleep(0.1)
        assert st.get("jobName"), st
    finally:
        second_stop.set()
        await asyncio.wait_for(second, 60)
