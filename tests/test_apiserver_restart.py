"""The real kube-apiserver (tests/apiserver.py) restarted under two running controllers:
killed by its PID and started again on the same etcd (its data kept) and port. Both
replicas stay up through it; the leader retries its renewals through the outage and keeps
the Lease (the outage is shorter than its renew deadline), and acts afterwards."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from kubernetes.client.exceptions import ApiException
from temporalio.client import Client

from tests.apiserver import ApiServer, installed, needs_apiserver, running_apiserver
from tests.kube import Cluster, checkpoint_body
from workers.controller import run_controller
from workers.settings import Settings

pytestmark = [needs_apiserver, pytest.mark.timeout(240)]
TEMPLATE = {"spec": {"containers": [{"name": "main", "image": "vllm/vllm-openai:v0.8.0"}]}}
LEASE_SECONDS = 30  # renew deadline 20 s, retry period 4 s: longer than a restart takes


@pytest.fixture(scope="module")
def apiserver() -> Iterator[ApiServer]:
    yield from running_apiserver()


@pytest_asyncio.fixture(scope="module")
async def cluster(apiserver: ApiServer) -> AsyncIterator[Cluster]:
    kube = await installed(apiserver, ("warmstart-system", "inference"))
    yield kube
    kube.close()


async def holder(cluster: Cluster) -> str | None:
    try:
        lease = await cluster.run(
            cluster.leases.read_namespaced_lease, "warmstart-watcher", "warmstart-system"
        )
    except ApiException:
        return None
    return str(lease.spec.holder_identity or "") or None


async def until(probe: Any, what: str, timeout: float = 60) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (found := await probe()):
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)
    return found


async def test_both_controllers_stay_up_through_an_api_server_restart_and_one_acts(
    client: Client,
    cluster: Cluster,
    apiserver: ApiServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="workers.leader")
    queue = f"control-{uuid.uuid4().hex[:8]}"

    def settings(name: str) -> Settings:
        return apiserver.controller_settings(
            home=tmp_path / name,
            temporal=client.service_client.config.target_host,
            queue=queue,
            identity=name,
            lease_seconds=LEASE_SECONDS,
        )

    async def job_of(name: str) -> str:
        obj = await cluster.get("checkpoints", "inference", name)
        return str((obj.get("status") or {}).get("jobName") or "")

    stops = {"first": asyncio.Event(), "second": asyncio.Event()}
    first = asyncio.ensure_future(run_controller(settings("first"), stops["first"]))
    controllers = {"first": first}
    try:
        await until(lambda: _is(holder(cluster), "first"), "the first controller to lead")
        controllers["second"] = asyncio.ensure_future(
            run_controller(settings("second"), stops["second"])
        )
        await until(
            lambda: _logged(caplog, "second is a candidate for the lease"), "a second candidate"
        )
        await cluster.create("checkpoints", checkpoint_body("before", TEMPLATE))
        assert await until(lambda: job_of("before"), "the leader to act before the restart")

        await asyncio.to_thread(apiserver.stop)  # killed by its PID
        await until(lambda: _logged(caplog, "first could not renew"), "a renewal to fail")
        await asyncio.to_thread(apiserver.start)  # same etcd, same port

        await until(lambda: _logged(caplog, "first renewed the lease after"), "a renewal")
        for name, task in controllers.items():
            assert not task.done(), f"controller {name} ended: {task.exception()}"
        assert await holder(cluster) == "first"
        await cluster.create("checkpoints", checkpoint_body("after", TEMPLATE))
        assert await until(lambda: job_of("after"), "the leader to act after the restart")
        for name, task in controllers.items():
            assert not task.done(), f"controller {name} ended: {task.exception()}"
    finally:
        for event in stops.values():
            event.set()
        results = await asyncio.gather(
            *(asyncio.wait_for(task, 60) for task in controllers.values()),
            return_exceptions=True,
        )
    assert [r for r in results if r is not None] == []  # both stopped cleanly
    assert "steps down" not in caplog.text and "lost the lease" not in caplog.text


async def _is(found: Any, expected: str) -> bool:
    return bool(await found == expected)


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return text in caplog.text
