"""The watcher: kopf handlers against an emulated API server (tests/kube.py) and the real
Temporal dev server, with a stand-in capture workflow that records what it is sent."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import pytest_asyncio
from temporalio import workflow
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Worker

from activities.contracts import PodObservation, VerificationObservation
from activities.kube.control import verification_observation
from api.errors import ForbiddenError
from api.naming import CAPTURE_WORKFLOW
from api.resources import (
    IDENTITY_IMMUTABLE,
    SAVER_WITHOUT_GMS,
    Checkpoint,
    PodSnapshot,
)
from api.storage import RemoteStorage
from tests.kube import Cluster, start_cluster
from workers.leader import LeaseElector
from workers.settings import KubeSettings
from workers.watcher import (
    KopfThread,
    WatcherSettings,
    build_registry,
    capture_request,
    connection_info,
    observe,
    signals_for,
    verification_run,
)
from workflows.contracts import CaptureRequest

pytestmark = pytest.mark.timeout(120)
TEMPLATE = {"spec": {"containers": [{"name": "main", "image": "vllm/vllm-openai:v0.8.0"}]}}


@workflow.defn(name=CAPTURE_WORKFLOW, sandboxed=False)
class StandInCapture:
    """Records its request and signals; ends when cancelled."""

    def __init__(self) -> None:
        self.signals: list[tuple[str, str]] = []
        self.request: CaptureRequest | None = None

    @workflow.run
    async def run(self, request: CaptureRequest) -> None:
        self.request = request
        await workflow.wait_condition(lambda: False)

    @workflow.signal
    def pod_scheduled(self, seen: PodObservation) -> None:
        self.signals.append(("pod_scheduled", seen.node_name))

    @workflow.signal
    def container_ready(self, seen: PodObservation) -> None:
        self.signals.append(("container_ready", seen.pod_name))

    @workflow.signal
    def pod_failed(self, seen: PodObservation) -> None:
        self.signals.append(("pod_failed", seen.failure))

    @workflow.query
    def seen(self) -> list[tuple[str, str]]:
        return self.signals

    @workflow.query
    def request_of(self) -> CaptureRequest:
        assert self.request is not None
        return self.request


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async for running in start_cluster():
        yield running


@pytest.fixture
def queue() -> str:
    return f"control-{uuid.uuid4().hex[:8]}"


@pytest_asyncio.fixture
async def stand_in(client: Client, queue: str) -> AsyncIterator[None]:
    async with Worker(client, task_queue=queue, workflows=[StandInCapture]):
        yield


def watcher(client: Client, cluster: Cluster, queue: str) -> KopfThread:
    target = client.service_client.config.target_host

    async def connect() -> Client:
        return await Client.connect(target, data_converter=pydantic_data_converter)

    login = KubeSettings(server=cluster.url)
    settings = WatcherSettings(control_task_queue=queue, kube=login)
    return KopfThread(build_registry(settings, connect))


@pytest.fixture
def running(client: Client, cluster: Cluster, queue: str) -> Iterator[list[KopfThread]]:
    threads: list[KopfThread] = []
    yield threads
    for thread in threads:
        thread.stop()


def checkpoint(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "warmstart.dev/v1alpha1",
        "kind": "Checkpoint",
        "metadata": {"name": "llama", "namespace": "inference"},
        "spec": {
            "identity": {"model": "meta-llama/Llama-2-7b-hf", "backendFramework": "vllm"},
            "job": {"podTemplateSpec": TEMPLATE},
            **spec,
        },
    }


def container_status(
    name: str, *, ready: bool, state: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "name": name,
        "ready": ready,
        "state": state or {"running": {}},
        "image": "i",
        "imageID": "",
        "restartCount": 0,
    }


def capture_pod(uid: str, *, node: str = "", ready: bool = False) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "llama-96429b2725761a09-x1",
            "namespace": "inference",
            "labels": {"warmstart.dev/checkpoint": "llama", "warmstart.dev/checkpoint-uid": uid},
            "annotations": {"warmstart.dev/target-container": "main"},
        },
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "i"}]},
        "status": {"containerStatuses": [container_status("main", ready=ready)]},
    }


async def _runs(client: Client, workflow_id: str) -> list[Any]:
    return [run async for run in client.list_workflows(f"WorkflowId = '{workflow_id}'")]


async def test_a_checkpoint_gets_one_capture_fed_by_pod_signals_and_cancelled_on_delete(
    client: Client, cluster: Cluster, queue: str, stand_in: None, running: list[KopfThread]
) -> None:
    first = watcher(client, cluster, queue)
    running.append(first)
    await asyncio.to_thread(first.start)
    uid = (await cluster.create("checkpoints", checkpoint()))["metadata"]["uid"]
    workflow_id = f"capture/inference/llama/{uid}"
    handle = client.get_workflow_handle(workflow_id)

    async def started() -> bool:
        return len(await _runs(client, workflow_id)) == 1

    for _ in range(800):
        if await started():
            break
        await asyncio.sleep(0.05)
    assert await started(), "the watcher started no capture"
    request = await handle.query(StandInCapture.request_of)
    assert request.resource.uid == uid and request.source.target.container == "main"

    await cluster.run(
        cluster.core.create_namespaced_pod, "inference", capture_pod(uid, node="gpu-1")
    )
    await wait_for_signals(handle, [("pod_scheduled", "gpu-1")])
    await cluster.run(
        cluster.core.patch_namespaced_pod_status,
        "llama-96429b2725761a09-x1",
        "inference",
        {"status": {"containerStatuses": [container_status("main", ready=True)]}},
    )
    await wait_for_signals(
        handle, [("pod_scheduled", "gpu-1"), ("container_ready", "llama-96429b2725761a09-x1")]
    )

    # A restarted watcher (fresh memory) joins the running capture, feeds it what it sees
    # of the pod again, starts no second run and sets no status.
    run_id = (await handle.describe()).run_id
    first.stop()
    second = watcher(client, cluster, queue)
    running.append(second)
    await asyncio.to_thread(second.start)
    for _ in range(400):  # the second watcher has processed the resource and its pod
        if len(await handle.query(StandInCapture.seen)) > 2:
            break
        await asyncio.sleep(0.05)
    assert len(await handle.query(StandInCapture.seen)) > 2, "the restarted watcher saw nothing"
    assert (await handle.describe()).run_id == run_id
    assert "status" not in await cluster.get("checkpoints", "inference", "llama")
    meta = (await cluster.get("checkpoints", "inference", "llama"))["metadata"]
    assert "warmstart.dev/cleanup" in meta["finalizers"]
    assert meta["labels"]["warmstart.dev/checkpoint-id"] == "96429b2725761a09"

    # Deleting the resource cancels the capture; the finalizer goes once it has ended.
    await cluster.run(
        cluster.custom.delete_namespaced_custom_object,
        "warmstart.dev",
        "v1alpha1",
        "inference",
        "checkpoints",
        "llama",
    )
    for _ in range(800):
        if (await handle.describe()).status != WorkflowExecutionStatus.RUNNING:
            break
        await asyncio.sleep(0.05)
    assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    await wait_gone(cluster, "llama")


async def wait_for_signals(handle: Any, expected: list[tuple[str, str]]) -> None:
    for _ in range(800):
        seen = [tuple(s) for s in await handle.query(StandInCapture.seen)]
        if seen == expected:
            return
        await asyncio.sleep(0.05)
    assert seen == expected


async def wait_gone(cluster: Cluster, name: str, plural: str = "checkpoints") -> None:
    from kubernetes.client.exceptions import ApiException

    for _ in range(800):
        try:
            await cluster.get(plural, "inference", name)
        except ApiException as err:
            assert err.status == 404
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} was never released by its finalizer")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"gpuMemoryService": {"checkpoint": {"saver": {"image": "gms:1"}}}}, SAVER_WITHOUT_GMS),
    ],
)
async def test_a_refused_spec_fails_with_the_message_and_starts_nothing(
    client: Client,
    cluster: Cluster,
    queue: str,
    running: list[KopfThread],
    spec: dict[str, Any],
    message: str,
) -> None:
    thread = watcher(client, cluster, queue)
    running.append(thread)
    await asyncio.to_thread(thread.start)
    bad = checkpoint(**spec)
    uid = (await cluster.create("checkpoints", bad))["metadata"]["uid"]

    async def status() -> dict[str, Any]:
        return (await cluster.get("checkpoints", "inference", "llama")).get("status") or {}

    for _ in range(800):
        if (await status()).get("phase") == "Failed":
            break
        await asyncio.sleep(0.05)
    assert (await status())["phase"] == "Failed"
    assert message in (await status())["message"]
    assert await _runs(client, f"capture/inference/llama/{uid}") == []


async def test_a_resource_captured_before_the_label_gets_it_on_resume_and_no_new_run(
    client: Client, cluster: Cluster, queue: str, running: list[KopfThread]
) -> None:
    # Captured by a release that did not label: Ready, no checkpoint-ID label.
    uid = (await cluster.create("checkpoints", checkpoint()))["metadata"]["uid"]
    await cluster.run(
        cluster.custom.patch_namespaced_custom_object_status,
        "warmstart.dev",
        "v1alpha1",
        "inference",
        "checkpoints",
        "llama",
        {"status": {"phase": "Ready", "checkpointID": "96429b2725761a09"}},
    )
    thread = watcher(client, cluster, queue)
    running.append(thread)
    await asyncio.to_thread(thread.start)

    async def label() -> str:
        meta = (await cluster.get("checkpoints", "inference", "llama"))["metadata"]
        return str((meta.get("labels") or {}).get("warmstart.dev/checkpoint-id", ""))

    for _ in range(800):
        if await label():
            break
        await asyncio.sleep(0.05)
    assert await label() == "96429b2725761a09"
    assert await _runs(client, f"capture/inference/llama/{uid}") == []


def test_pod_observations_and_their_signals() -> None:
    pod = capture_pod("u", node="gpu-3", ready=True)
    oom = {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
    pod["status"]["containerStatuses"].append(container_status("sidecar", ready=False, state=oom))
    seen = observe(pod)
    assert (seen.node_name, seen.container_ready) == ("gpu-3", True)
    assert seen.failure == "container sidecar exited with code 137 (OOMKilled)"
    assert signals_for(seen) == ["pod_scheduled", "container_ready", "pod_failed"]
    assert signals_for(observe(capture_pod("u"))) == []


async def test_one_replica_holds_the_lease_until_it_stops_renewing(cluster: Cluster) -> None:
    a = LeaseElector(cluster.api, namespace="warmstart-system", identity="a", duration_seconds=1)
    b = LeaseElector(cluster.api, namespace="warmstart-system", identity="b", duration_seconds=1)
    assert await a.try_acquire()
    assert not await b.try_acquire()
    assert await a.renew()
    stop = asyncio.Event()
    acquired = asyncio.ensure_future(b.acquire(stop))
    await asyncio.sleep(0.5)
    assert not acquired.done()  # a renewed moments ago: b waits
    assert await asyncio.wait_for(acquired, 5)  # a stops renewing (it died): b takes over
    assert not await a.renew()
    lease = await cluster.run(
        cluster.leases.read_namespaced_lease, "warmstart-watcher", "warmstart-system"
    )
    assert (lease.spec.holder_identity, lease.spec.lease_transitions) == ("b", 1)
    await b.release()
    assert await a.try_acquire()  # released: no need to wait for expiry


async def test_kopf_logs_in_with_the_one_login(
    client: Client, cluster: Cluster, queue: str, running: list[KopfThread], tmp_path: Path
) -> None:
    """kopf's requests carry the token the settings' token file holds, as every other
    Kubernetes call's do; kopf reads it again when it logs in again."""
    token = tmp_path / "token"
    token.write_text(f"token-{uuid.uuid4().hex}\n")
    login = KubeSettings(server=cluster.url, token_file=str(token))
    assert connection_info(login).token == token.read_text().strip()
    target = client.service_client.config.target_host

    async def connect() -> Client:
        return await Client.connect(target, data_converter=pydantic_data_converter)

    settings = WatcherSettings(control_task_queue=queue, kube=login)
    operator = KopfThread(build_registry(settings, connect))
    running.append(operator)
    await asyncio.to_thread(operator.start)
    assert cluster.emulator is not None

    def watches() -> list[Any]:
        return [r for r in cluster.emulator if r.params.get("watch") == "true"]  # type: ignore[union-attr]

    for _ in range(200):
        if any("/checkpoints" in str(r.url) for r in watches()):
            break
        await asyncio.sleep(0.05)
    kopf_requests = watches()
    assert any("/checkpoints" in str(r.url) for r in kopf_requests)
    assert {r.headers.get("Authorization") for r in kopf_requests} == {
        f"Bearer {token.read_text().strip()}"
    }


LEASES = "/apis/coordination.k8s.io/v1/namespaces/warmstart-system/leases"


def refuse(cluster: Cluster, request: str, status: int, *, times: int | None = None) -> None:
    """The API server answers `request` ("verb /path") with `status` (the next `times`)."""
    assert cluster.emulator is not None
    body = {"kind": "Status", "apiVersion": "v1", "code": status, "reason": f"Status{status}"}
    view = cluster.emulator[request]
    (view if times is None else view[:times]) << status << body


async def test_the_elector_waits_out_an_api_server_that_is_away(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    refuse(cluster, f"post {LEASES}", 503, times=1)
    elector = LeaseElector(
        cluster.api, namespace="warmstart-system", identity="a", duration_seconds=1
    )
    assert await asyncio.wait_for(elector.acquire(asyncio.Event()), 10)
    waits = [r.getMessage() for r in caplog.records if "waits for the lease" in r.getMessage()]
    assert waits == [
        "a waits for the lease: create Lease warmstart-system/warmstart-watcher: "
        "API server answered 503 Status503"
    ]


async def test_a_forbidden_elector_says_which_lease(cluster: Cluster) -> None:
    refuse(cluster, f"post {LEASES}", 403)
    elector = LeaseElector(cluster.api, namespace="warmstart-system", identity="a")
    with pytest.raises(ForbiddenError, match="may not create Lease warmstart-system/warmstart-"):
        await asyncio.wait_for(elector.acquire(asyncio.Event()), 10)


async def test_a_renewal_the_api_server_keeps_refusing_ends_the_hold_at_its_deadline(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    elector = LeaseElector(
        cluster.api, namespace="warmstart-system", identity="a", duration_seconds=1
    )
    assert await elector.try_acquire()
    refuse(cluster, f"get {LEASES}/warmstart-watcher", 500)
    await asyncio.wait_for(elector.hold(asyncio.Event()), 5)
    failures = [r.getMessage() for r in caplog.records if "could not renew" in r.getMessage()]
    assert len(failures) > 1  # retried until the deadline
    assert failures[0] == (
        "a could not renew the lease (attempt 1): read Lease "
        "warmstart-system/warmstart-watcher: API server answered 500 Status500"
    )
    assert "a steps down: no renewal of the lease warmstart-watcher held within 0.7 s" in (
        caplog.text
    )


def test_requests_for_both_resources() -> None:
    settings = WatcherSettings(control_task_queue="q", read_every_seconds=5)
    ckpt = Checkpoint.model_validate(
        checkpoint(job={"podTemplateSpec": TEMPLATE, "activeDeadlineSeconds": 900})
        | {"metadata": {"name": "llama", "namespace": "inference", "uid": "u1"}}
    )
    request = capture_request(ckpt, settings)
    assert (request.checkpoint_id, request.node, request.resource.kind) == (
        "96429b2725761a09",
        "",
        "Checkpoint",
    )
    target = request.source.target
    assert (target.deadline_seconds, target.read_every_seconds) == (900, 5)
    snap = PodSnapshot.model_validate(
        {
            "metadata": {"name": "snap", "namespace": "inference", "uid": "u2"},
            "spec": {
                "source": {"podRef": {"name": "llama-0", "uid": "p1", "containers": ["engine"]}}
            },
        }
    )
    request = capture_request(snap, settings)
    target = request.source.target
    assert (target.pod_name, target.pod_uid, target.container) == (
        "llama-0",
        "p1",
        "engine",
    )
    assert request.checkpoint_id == snap.checkpoint_id
    assert request.storage is None  # no default: the nodes' checkpoint root


def test_requests_carry_the_resources_storage_or_the_default() -> None:
    default = RemoteStorage(bucket="fleet-ckpts")
    settings = WatcherSettings(control_task_queue="q", storage=default)
    meta = {"metadata": {"name": "llama", "namespace": "inference", "uid": "u1"}}
    plain = Checkpoint.model_validate(checkpoint(job={"podTemplateSpec": TEMPLATE}) | meta)
    assert capture_request(plain, settings).storage == default
    s3 = {"type": "s3", "s3": {"bucket": "team-ckpts", "credentialsSecret": "keys"}}
    own = Checkpoint.model_validate(
        checkpoint(job={"podTemplateSpec": TEMPLATE}, storage=s3) | meta
    )
    assert capture_request(own, settings).storage == RemoteStorage(
        bucket="team-ckpts", credentials_secret="keys", secret_namespace="inference"
    )
    assert capture_request(own, settings).prefetch_node_selectors == []
    warmed = Checkpoint.model_validate(
        checkpoint(job={"podTemplateSpec": TEMPLATE}, prefetch={"nodeSelectors": [{"z": "a"}]})
        | meta
    )
    assert capture_request(warmed, settings).prefetch_node_selectors == [{"z": "a"}]
    pvc = {"type": "pvc", "pvc": {"claimName": "ckpts"}}
    on_pvc = Checkpoint.model_validate(
        checkpoint(job={"podTemplateSpec": TEMPLATE}, storage=pvc) | meta
    )
    assert capture_request(on_pvc, settings).storage is None


async def test_a_changed_identity_is_refused_on_the_status(
    client: Client, cluster: Cluster, queue: str, stand_in: None, running: list[KopfThread]
) -> None:
    thread = watcher(client, cluster, queue)
    running.append(thread)
    await asyncio.to_thread(thread.start)
    await cluster.create("checkpoints", checkpoint())

    async def handled() -> bool:
        meta = (await cluster.get("checkpoints", "inference", "llama"))["metadata"]
        return "warmstart.dev/last-handled-configuration" in (meta.get("annotations") or {})

    for _ in range(800):
        if await handled():
            break
        await asyncio.sleep(0.05)
    assert await handled()
    # An API server without CEL (or before the rule existed) lets this through.
    await cluster.run(
        cluster.custom.patch_namespaced_custom_object,
        "warmstart.dev",
        "v1alpha1",
        "inference",
        "checkpoints",
        "llama",
        {"spec": {"identity": {"model": "another/model"}}},
    )

    async def status() -> dict[str, Any]:
        return (await cluster.get("checkpoints", "inference", "llama")).get("status") or {}

    for _ in range(800):
        if (await status()).get("phase") == "Failed":
            break
        await asyncio.sleep(0.05)
    assert (await status())["message"] == IDENTITY_IMMUTABLE


async def _eventually(probe: Any, what: str, tries: int = 400) -> Any:
    for _ in range(tries):
        found = await probe()
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def _running_ids(client: Client, prefix: str) -> list[str]:
    query = f"WorkflowType = '{CAPTURE_WORKFLOW}' AND ExecutionStatus = 'Running'"
    return sorted(
        [run.id async for run in client.list_workflows(query) if run.id.startswith(prefix)]
    )


async def test_a_scheduled_checkpoint_gets_its_schedule_whose_runs_take_their_pods_signals(
    client: Client, cluster: Cluster, queue: str, stand_in: None, running: list[KopfThread]
) -> None:
    from temporalio.client import ScheduleOverlapPolicy

    thread = watcher(client, cluster, queue)
    running.append(thread)
    await asyncio.to_thread(thread.start)
    body = checkpoint(schedule={"cron": "0 3 * * *", "timeZone": "Europe/Berlin"})
    uid = (await cluster.create("checkpoints", body))["metadata"]["uid"]
    first = f"capture/inference/llama/{uid}"
    schedule = client.get_schedule_handle(f"capture-schedule/inference/llama/{uid}")

    async def described() -> Any:
        try:
            return await schedule.describe()
        except Exception:
            return None

    seen = await _eventually(described, "the Checkpoint's schedule")
    # The server keeps the cron as a calendar: its next times say it was read right.
    assert seen.schedule.spec.time_zone_name == "Europe/Berlin"
    berlin = ZoneInfo("Europe/Berlin")
    times = [t.astimezone(berlin) for t in seen.info.next_action_times]
    assert times and all((t.hour, t.minute) == (3, 0) for t in times), times
    assert seen.schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
    assert seen.schedule.action.id == f"{first}/scheduled"
    assert seen.schedule.action.task_queue == queue

    # A run now (as at 03:00): its own workflow under the first's ID, told it is scheduled.
    await _eventually(lambda: _running_ids(client, first), "the first capture")
    await schedule.trigger()
    runs = await _eventually(
        lambda: _dropping(_running_ids(client, f"{first}/scheduled-")), "a scheduled run"
    )
    scheduled = client.get_workflow_handle(runs[0])
    request = await scheduled.query(StandInCapture.request_of)
    assert (request.trigger, request.resource.uid) == ("schedule", uid)
    assert (await client.get_workflow_handle(first).query(StandInCapture.request_of)).trigger == ""

    # Its Job's pod names it: the pod's signals go to that run, not to the first.
    pod = capture_pod(uid, node="gpu-2")
    pod["metadata"]["annotations"]["warmstart.dev/capture-workflow"] = runs[0]
    await cluster.run(cluster.core.create_namespaced_pod, "inference", pod)
    await wait_for_signals(scheduled, [("pod_scheduled", "gpu-2")])
    assert await client.get_workflow_handle(first).query(StandInCapture.seen) == []

    # The spec's schedule changes: the Schedule follows; removed, it goes.
    await cluster.run(
        cluster.custom.patch_namespaced_custom_object,
        "warmstart.dev",
        "v1alpha1",
        "inference",
        "checkpoints",
        "llama",
        {"spec": {"schedule": {"cron": "@hourly", "paused": True}}},
    )

    async def rescheduled() -> bool:
        now = await schedule.describe()
        calendars = now.schedule.spec.calendars
        return now.schedule.state.paused and calendars != seen.schedule.spec.calendars

    await _eventually(rescheduled, "the schedule's update")
    await cluster.run(
        cluster.custom.patch_namespaced_custom_object,
        "warmstart.dev",
        "v1alpha1",
        "inference",
        "checkpoints",
        "llama",
        {"spec": {"schedule": None}},
    )
    await _eventually(lambda: _negate(described()), "the schedule's deletion")

    # Deleting the resource cancels every run.
    await cluster.run(
        cluster.custom.delete_namespaced_custom_object,
        "warmstart.dev",
        "v1alpha1",
        "inference",
        "checkpoints",
        "llama",
    )
    await wait_gone(cluster, "llama")
    for workflow_id in (first, runs[0]):
        status = (await client.get_workflow_handle(workflow_id).describe()).status
        assert status == WorkflowExecutionStatus.CANCELED, workflow_id


async def _dropping(ids: Any) -> list[str]:
    return list(await ids)


async def _negate(value: Any) -> bool:
    return not await value


@pytest.mark.parametrize("plural", ["checkpoints", "podsnapshots"])
async def test_the_capture_now_annotation_starts_one_run_per_value_and_deletion_cancels_it(
    client: Client,
    cluster: Cluster,
    queue: str,
    stand_in: None,
    running: list[KopfThread],
    plural: str,
) -> None:
    thread = watcher(client, cluster, queue)
    running.append(thread)
    await asyncio.to_thread(thread.start)
    snapshot = {
        "apiVersion": "warmstart.dev/v1alpha1",
        "kind": "PodSnapshot",
        "metadata": {"name": "llama", "namespace": "inference"},
        "spec": {"source": {"podRef": {"name": "llama-0", "uid": "p1", "containers": ["main"]}}},
    }
    body = checkpoint() if plural == "checkpoints" else snapshot
    uid = (await cluster.create(plural, body))["metadata"]["uid"]
    first = f"capture/inference/llama/{uid}"
    await _eventually(lambda: _running_ids(client, first), "the first capture")

    async def annotate(value: str | None, **more: str) -> None:
        annotations = {"capture.warmstart.dev/now": value, **more}
        await cluster.run(
            cluster.custom.patch_namespaced_custom_object,
            "warmstart.dev",
            "v1alpha1",
            "inference",
            plural,
            "llama",
            {"metadata": {"annotations": annotations}},
        )

    async def later_runs() -> list[str]:
        query = f"WorkflowType = '{CAPTURE_WORKFLOW}'"
        return sorted(
            [r.id async for r in client.list_workflows(query) if r.id.startswith(f"{first}/")]
        )

    await annotate("2026-12-06T12:00")
    (one,) = await _eventually(later_runs, "a run on demand")
    assert one.startswith(f"{first}/on-demand-")
    request = await client.get_workflow_handle(one).query(StandInCapture.request_of)
    assert (request.trigger, request.resource.kind) == ("annotation", body["kind"])
    # Another annotation changing, the value kept: no second run.
    await annotate("2026-12-06T12:00", other="x")
    await asyncio.sleep(1.5)
    assert await later_runs() == [one]
    await annotate("2026-12-06T13:00")
    two = await _eventually(lambda: _dropping(_longer(later_runs(), 1)), "a second run on demand")
    assert len(two) == 2 and one in two

    await cluster.run(
        cluster.custom.delete_namespaced_custom_object,
        "warmstart.dev",
        "v1alpha1",
        "inference",
        plural,
        "llama",
    )
    await wait_gone(cluster, "llama", plural)
    for workflow_id in (first, *two):
        status = (await client.get_workflow_handle(workflow_id).describe()).status
        assert status == WorkflowExecutionStatus.CANCELED, workflow_id


async def _longer(ids: Any, than: int) -> list[str]:
    found = list(await ids)
    return found if len(found) > than else []


def verification_pod_body(**status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "llama-verify-1",
            "namespace": "inference",
            "uid": "vpod-1",
            "annotations": {
                "warmstart.dev/target-container": "main",
                "warmstart.dev/capture-workflow": "capture/inference/llama/ckpt-1/on-demand-x",
                "warmstart.dev/restore-status": "restored",
            },
            "ownerReferences": [
                {
                    "apiVersion": "warmstart.dev/v1alpha1",
                    "kind": "Checkpoint",
                    "name": "llama",
                    "uid": "ckpt-1",
                }
            ],
        },
        "status": status,
    }


def test_what_a_verification_pod_says_and_the_run_it_reports_to() -> None:
    running = {"name": "main", "ready": True, "state": {"running": {}}}
    seen = verification_observation(verification_pod_body(containerStatuses=[running]))
    assert seen == VerificationObservation(pod_uid="vpod-1", restore_status="restored", ready=True)
    ended = {"name": "main", "ready": False, "state": {"terminated": {"exitCode": 0}}}
    seen = verification_observation(verification_pod_body(containerStatuses=[ended]))
    assert seen.failure == (
        "container main of verification pod inference/llama-verify-1 ended with code 0 (Completed)"
    )
    other = verification_observation(verification_pod_body(), uid="vpod-2")
    assert other.failure == "verification pod inference/llama-verify-1 was created again"
    pod = verification_pod_body()
    assert verification_run(pod) == "capture/inference/llama/ckpt-1/on-demand-x"
    # A run of another resource named on the pod: its owner's first run instead.
    pod["metadata"]["annotations"]["warmstart.dev/capture-workflow"] = "capture/inference/x/y"
    assert verification_run(pod) == "capture/inference/llama/ckpt-1"
    pod["metadata"]["ownerReferences"] = []
    assert verification_run(pod) == ""
