"""CaptureWorkflow on a cluster, with stand-in activities registered under the real names:
signals and the fallback read of the pod, the Job's lifecycle, failures, cancel, node loss."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from temporalio import activity
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.worker import Worker

from activities.contracts import (
    ClaimInput,
    CommitResult,
    ContainerCommitInput,
    ContainerDumpInput,
    ContainerSentinelInput,
    DiscardInput,
    GmsSavedInput,
    JobInput,
    JobRef,
    NodeSelectorInput,
    PodObservation,
    PodQuery,
    PrefetchInput,
    PrefetchResult,
    ReleaseInput,
    ResourceRef,
    StatusInput,
    UploadInput,
    UploadResult,
    VerificationObservation,
    VerificationPod,
    VerificationPodInput,
    VerificationQuery,
)
from activities.errors import ErrorMapping
from api.identity import CheckpointIdentity, checkpoint_id
from api.naming import node_task_queue
from api.reasons import Phase
from api.storage import RemoteStorage
from tests.waiting import wait_until
from workflows.capture import CaptureWorkflow
from workflows.contracts import (
    CaptureRequest,
    CaptureResult,
    ClusterCapture,
    ClusterTarget,
    PrefetchReport,
)
from workflows.prefetch import PrefetchWorkflow
from workflows.visibility import NODE

DIGEST = "0f" * 32  # the committed manifest's SHA-256
IDENTITY = CheckpointIdentity(model="meta-llama/Llama-2-7b-hf", backend_framework="vllm")


@dataclass
class Cluster:
    """Stand-ins of the control and node activities; `pod` is what a read of the pod says."""

    calls: list[tuple[str, str]] = field(default_factory=list)
    statuses: list[StatusInput] = field(default_factory=list)
    dumps: list[ContainerDumpInput] = field(default_factory=list)
    queries: list[PodQuery] = field(default_factory=list)
    pod: PodObservation = field(default_factory=PodObservation)
    hold_dump: asyncio.Event | None = None
    warm_nodes: list[str] = field(default_factory=list)
    commits: list[ContainerCommitInput] = field(default_factory=list)
    discards: list[DiscardInput] = field(default_factory=list)
    # What successive reads of a verification pod say (the last one repeats).
    verification: list[VerificationObservation] = field(default_factory=list)
    verification_pods: list[VerificationPodInput] = field(default_factory=list)
    deleted_pods: list[VerificationQuery] = field(default_factory=list)

    def _record(self, name: str) -> None:
        self.calls.append((name, activity.info().task_queue))

    @activity.defn(name="claim_checkpoint_id")
    async def claim(self, request: ClaimInput) -> None:
        assert request.resource is not None
        self._record("claim_checkpoint_id")

    @activity.defn(name="publish_status")
    async def publish(self, request: StatusInput) -> None:
        self.statuses.append(request)
        self._record("publish_status")

    @activity.defn(name="create_capture_job")
    async def create_job(self, request: JobInput) -> str:
        self._record("create_capture_job")
        return f"{request.resource.name}-job"

    @activity.defn(name="read_capture_pod")
    async def read_pod(self, request: PodQuery) -> PodObservation:
        self.queries.append(request)
        self._record("read_capture_pod")
        return self.pod

    @activity.defn(name="delete_capture_job")
    async def delete_job(self, request: JobRef) -> None:
        self._record("delete_capture_job")

    @activity.defn(name="await_gms_saved")
    async def gms(self, request: GmsSavedInput) -> None:
        self._record("await_gms_saved")

    @activity.defn(name="dump_container")
    async def dump(self, request: ContainerDumpInput) -> None:
        self.dumps.append(request)
        self._record("dump_container")
        while self.hold_dump is not None and not self.hold_dump.is_set():
            activity.heartbeat()  # a cancel reaches a running dump through its heartbeats
            await asyncio.sleep(0.05)

    @activity.defn(name="commit_container")
    async def commit(self, request: ContainerCommitInput) -> CommitResult:
        self.commits.append(request)
        self._record("commit_container")
        return CommitResult(
            storage_uri="file:///checkpoints/x", size_bytes=7, manifest_sha256=DIGEST
        )

    @activity.defn(name="write_container_sentinel")
    async def sentinel(self, request: ContainerSentinelInput) -> None:
        self._record("write_container_sentinel")

    @activity.defn(name="discard_staging")
    async def discard(self, request: DiscardInput) -> None:
        self.discards.append(request)
        self._record("discard_staging")

    @activity.defn(name="release_version")
    async def release(self, request: ReleaseInput) -> None:
        self._record("release_version")

    @activity.defn(name="create_verification_pod")
    async def create_verification_pod(self, request: VerificationPodInput) -> VerificationPod:
        self.verification_pods.append(request)
        self._record("create_verification_pod")
        return VerificationPod(namespace="inference", name="llama-verify-1", uid="vpod-uid")

    @activity.defn(name="read_verification_pod")
    async def read_verification_pod(self, request: VerificationQuery) -> VerificationObservation:
        self._record("read_verification_pod")
        seen = self.verification[0]
        if len(self.verification) > 1:
            self.verification.pop(0)
        return seen

    @activity.defn(name="delete_verification_pod")
    async def delete_verification_pod(self, request: VerificationQuery) -> None:
        self.deleted_pods.append(request)
        self._record("delete_verification_pod")

    @activity.defn(name="upload_version")
    async def upload(self, request: UploadInput) -> UploadResult:
        self._record("upload_version")
        uri = f"{request.storage.uri}{request.checkpoint_id}/versions/{request.version}/"
        return UploadResult(storage_uri=uri, size_bytes=7, bytes_transferred=7, seconds=0.1)

    @activity.defn(name="nodes_matching")
    async def nodes_matching(self, request: NodeSelectorInput) -> list[str]:
        self._record("nodes_matching")
        return self.warm_nodes

    @activity.defn(name="prefetch_version")
    async def prefetch(self, request: PrefetchInput) -> PrefetchResult:
        self._record("prefetch_version")
        return PrefetchResult(version=request.version, size_bytes=7, downloaded=True, seconds=0)

    def names(self) -> list[str]:
        return [name for name, _queue in self.calls]


@dataclass
class Harness:
    client: Client
    cluster: Cluster
    control_queue: str
    node: str

    def request(self, kind: str = "Checkpoint", **target: Any) -> CaptureRequest:
        ref = ResourceRef.model_validate(
            {"kind": kind, "namespace": "inference", "name": "llama", "uid": "uid-1"}
        )
        return CaptureRequest(
            namespace="inference",
            name="llama",
            identity=IDENTITY,
            checkpoint_id=checkpoint_id(IDENTITY),
            node="",
            source=ClusterCapture(
                resource=ref, target=ClusterTarget(**({"read_every_seconds": 600} | target))
            ),
            control_task_queue=self.control_queue,
            node_timeout_seconds=2,
        )

    async def start(
        self, request: CaptureRequest
    ) -> WorkflowHandle[CaptureWorkflow, CaptureResult]:
        return await self.client.start_workflow(
            CaptureWorkflow.run,
            request,
            id=f"capture/test/{uuid.uuid4()}",
            task_queue=self.control_queue,
        )

    def seen(self, **facts: Any) -> PodObservation:
        return PodObservation(pod_name="llama-job-x1", pod_uid="pod-uid", **facts)

    async def called(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while name not in self.cluster.names():
            assert loop.time() < deadline, f"{name} never called"
            await asyncio.sleep(0.02)


@pytest_asyncio.fixture
async def harness(client: Client) -> AsyncIterator[Harness]:
    cluster = Cluster()
    suffix = uuid.uuid4().hex[:8]
    control_queue, node = f"control-{suffix}", f"gpu-{suffix}"
    async with (
        Worker(
            client,
            task_queue=control_queue,
            workflows=[CaptureWorkflow, PrefetchWorkflow],
            activities=[
                cluster.claim,
                cluster.publish,
                cluster.create_job,
                cluster.read_pod,
                cluster.delete_job,
                cluster.nodes_matching,
                cluster.create_verification_pod,
                cluster.read_verification_pod,
                cluster.delete_verification_pod,
            ],
            interceptors=[ErrorMapping()],
        ),
        Worker(
            client,
            task_queue=node_task_queue(node),
            activities=[
                cluster.gms,
                cluster.dump,
                cluster.commit,
                cluster.sentinel,
                cluster.discard,
                cluster.upload,
                cluster.release,
            ],
            interceptors=[ErrorMapping()],
        ),
    ):
        yield Harness(client, cluster, control_queue, node)


async def test_a_checkpoint_is_captured_on_the_node_its_pod_runs_on(harness: Harness) -> None:
    handle = await harness.start(harness.request())
    await harness.called("create_capture_job")
    await handle.signal(CaptureWorkflow.pod_scheduled, harness.seen(node_name=harness.node))
    await handle.signal(CaptureWorkflow.container_ready, harness.seen(container_ready=True))
    result = await handle.result()

    control, node = harness.control_queue, node_task_queue(harness.node)
    assert harness.cluster.calls == [
        ("claim_checkpoint_id", control),
        ("publish_status", control),
        ("create_capture_job", control),
        ("publish_status", control),
        ("publish_status", control),
        ("dump_container", node),
        ("commit_container", node),
        ("write_container_sentinel", node),
        ("publish_status", control),
    ]
    phases = [(s.phase, s.job_name) for s in harness.cluster.statuses]
    assert phases == [
        (Phase.CREATING, ""),
        (Phase.CREATING, "llama-job"),
        (Phase.CAPTURING, "llama-job"),
        (Phase.READY, "llama-job"),
    ]
    assert harness.cluster.statuses[-1].node == harness.node
    assert (result.node, result.size_bytes) == (harness.node, 7)
    [dump] = harness.cluster.dumps
    assert (dump.target.pod_uid, dump.target.container, dump.leave_running) == (
        "pod-uid",
        "main",
        False,
    )
    assert (await handle.describe()).typed_search_attributes.get(NODE) == harness.node
    assert "delete_capture_job" not in harness.cluster.names()  # it exits by itself


async def test_with_remote_storage_it_uploads_then_warms_the_selected_nodes(
    harness: Harness,
) -> None:
    warm = [f"warm-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    harness.cluster.warm_nodes = warm
    storage = RemoteStorage(bucket="fleet-ckpts", prefix="llama")
    request = harness.request().model_copy(
        update={"storage": storage, "prefetch_node_selectors": [{"zone": "a"}]}
    )
    async with (
        Worker(
            harness.client,
            task_queue=node_task_queue(warm[0]),
            activities=[harness.cluster.prefetch],
        ),
        Worker(
            harness.client,
            task_queue=node_task_queue(warm[1]),
            activities=[harness.cluster.prefetch],
        ),
    ):
        handle = await harness.start(request)
        await harness.called("create_capture_job")
        await handle.signal(CaptureWorkflow.pod_scheduled, harness.seen(node_name=harness.node))
        await handle.signal(CaptureWorkflow.container_ready, harness.seen(container_ready=True))
        result = await handle.result()
        prefetch = harness.client.get_workflow_handle(
            f"prefetch/inference/llama/{result.version}", result_type=PrefetchReport
        )
        report = await prefetch.result()
    uri = f"s3://fleet-ckpts/llama/{result.checkpoint_id}/versions/{result.version}/"
    assert result.storage_uri == uri and "upload" in result.step_seconds
    names = harness.cluster.names()
    assert names.index("write_container_sentinel") < names.index("upload_version")
    assert harness.cluster.statuses[-1].phase == Phase.READY
    assert harness.cluster.statuses[-1].storage_uri == uri
    assert harness.cluster.statuses[-1].manifest_sha256 == DIGEST  # the commit's, past the upload
    assert sorted(n.node for n in report.nodes if n.result is not None) == sorted(warm)
    queues = {queue for name, queue in harness.cluster.calls if name == "prefetch_version"}
    assert queues == {node_task_queue(n) for n in warm}


async def verified(
    harness: Harness, read_every: float = 0.2
) -> WorkflowHandle[CaptureWorkflow, CaptureResult]:
    """A verified Checkpoint's capture (decision 0045), its pod scheduled and Ready."""
    request = harness.request(read_every_seconds=read_every).model_copy(
        update={"verify": True, "verify_answer_seconds": 1.0}
    )
    handle = await harness.start(request)
    await handle.signal(CaptureWorkflow.pod_scheduled, harness.seen(node_name=harness.node))
    await handle.signal(CaptureWorkflow.container_ready, harness.seen(container_ready=True))
    return handle


async def test_a_verified_capture_is_ready_once_its_verification_pod_is_restored_and_ready(
    harness: Harness,
) -> None:
    harness.cluster.verification = [
        VerificationObservation(),
        VerificationObservation(restore_status="restored"),
        VerificationObservation(restore_status="restored", ready=True),
    ]
    result = await (await verified(harness)).result()

    control, node = harness.control_queue, node_task_queue(harness.node)
    calls = harness.cluster.calls
    after = calls[calls.index(("write_container_sentinel", node)) + 1 :]
    assert after == [
        ("create_verification_pod", control),
        ("publish_status", control),
        ("read_verification_pod", control),
        ("read_verification_pod", control),
        ("read_verification_pod", control),
        ("delete_verification_pod", control),
        ("release_version", node),
        ("publish_status", control),
    ]
    [commit] = harness.cluster.commits
    assert commit.unverified  # held back from the commit on
    [made] = harness.cluster.verification_pods
    assert (made.node, made.version, made.resource.uid) == (harness.node, result.version, "uid-1")
    verifying = harness.cluster.statuses[-2].verifying
    assert verifying is not None
    assert (verifying.version, verifying.manifest_sha256, verifying.pod_uid) == (
        result.version,
        DIGEST,
        "vpod-uid",
    )
    ready = harness.cluster.statuses[-1]
    assert (ready.phase, ready.verifying) == (Phase.READY, None)
    assert [q.uid for q in harness.cluster.deleted_pods] == ["vpod-uid"]
    assert "verify" in result.step_seconds and harness.cluster.discards == []


async def test_the_watchers_signal_of_its_own_verification_pod_decides_without_a_read(
    harness: Harness,
) -> None:
    harness.cluster.verification = [VerificationObservation()]  # the first read: nothing yet
    handle = await verified(harness, read_every=600)
    await harness.called("read_verification_pod")
    done = VerificationObservation(restore_status="restored", ready=True)
    # Another pod's signal (a pod copying the labels) is not this capture's.
    await handle.signal(
        CaptureWorkflow.verification_seen, done.model_copy(update={"pod_uid": "other"})
    )
    await asyncio.sleep(0.5)
    assert harness.cluster.statuses[-1].phase != Phase.READY
    await handle.signal(
        CaptureWorkflow.verification_seen, done.model_copy(update={"pod_uid": "vpod-uid"})
    )
    result = await handle.result()
    assert harness.cluster.names().count("read_verification_pod") == 1
    assert harness.cluster.statuses[-1].phase == Phase.READY and result.version


@pytest.mark.parametrize(
    ("seen", "says"),
    [
        (
            [VerificationObservation(restore_status="fell-back: RestoreFailed: criu said no")],
            "verification pod inference/llama-verify-1 was not restored: "
            "fell-back: RestoreFailed: criu said no",
        ),
        (
            [VerificationObservation(restore_status="restored")],
            "verification pod inference/llama-verify-1 was restored, but its container was "
            "not Ready within 1 s (its readiness probe did not pass)",
        ),
    ],
    ids=["fell-back", "not-ready"],
)
async def test_a_verification_pod_that_fails_fails_the_capture_and_deletes_pod_and_version(
    harness: Harness, seen: list[VerificationObservation], says: str
) -> None:
    harness.cluster.verification = seen
    handle = await verified(harness)
    with pytest.raises(WorkflowFailureError) as err:
        await handle.result()
    assert isinstance(err.value.cause, ApplicationError)
    version = harness.cluster.verification_pods[0].version
    assert (err.value.cause.type, err.value.cause.message) == (
        "VerifyFailed",
        f"version {version}: {says}",
    )
    failed = harness.cluster.statuses[-1]
    assert (failed.phase, failed.reason, failed.verifying) == (Phase.FAILED, "VerifyFailed", None)
    names = harness.cluster.names()
    assert "release_version" not in names
    # Cleanup: the pod first (nothing restores the version as it goes), then the version.
    assert names.index("delete_verification_pod") < names.index("discard_staging")
    [discard] = harness.cluster.discards
    assert (discard.version, discard.unverified) == (version, True)


async def test_a_missed_signal_is_covered_by_reading_the_pod(harness: Harness) -> None:
    harness.cluster.pod = harness.seen(node_name=harness.node, container_ready=True)
    result = await (await harness.start(harness.request(read_every_seconds=0.2))).result()
    assert result.node == harness.node
    assert harness.cluster.queries[0].job_name == "llama-job"


async def test_a_failed_container_fails_the_capture_and_removes_the_job(harness: Harness) -> None:
    handle = await harness.start(harness.request())
    await handle.signal(CaptureWorkflow.pod_scheduled, harness.seen(node_name=harness.node))
    failure = "container main exited with code 3 (Error)"
    await handle.signal(CaptureWorkflow.pod_failed, harness.seen(failure=failure))
    with pytest.raises(WorkflowFailureError) as err:
        await handle.result()
    assert isinstance(err.value.cause, ApplicationError)
    assert (err.value.cause.type, err.value.cause.message) == ("WorkloadExited", failure)
    assert harness.cluster.statuses[-1].phase == Phase.FAILED
    names = harness.cluster.names()
    assert "dump_container" not in names and names[-1] == "delete_capture_job"


async def test_deleting_the_resource_cancels_and_removes_the_job(harness: Harness) -> None:
    handle = await harness.start(harness.request())
    await handle.signal(CaptureWorkflow.pod_scheduled, harness.seen(node_name=harness.node))
    # Capturing: the workflow waits for readiness.
    await wait_until(lambda: len(harness.cluster.statuses) == 3, "the Capturing status")
    await handle.cancel()
    with pytest.raises(WorkflowFailureError) as err:
        await handle.result()
    assert isinstance(err.value.cause, CancelledError)
    assert harness.cluster.statuses[-1].reason == "Cancelled"
    assert harness.cluster.names()[-1] == "delete_capture_job"


async def test_a_pod_snapshot_dumps_a_running_pod_and_leaves_it_running(harness: Harness) -> None:
    harness.cluster.pod = harness.seen(node_name=harness.node, container_ready=True)
    request = harness.request(
        "PodSnapshot", pod_name="llama-0", pod_uid="pod-uid", read_every_seconds=0.2
    )
    await (await harness.start(request)).result()
    assert "create_capture_job" not in harness.cluster.names()
    assert (harness.cluster.queries[0].pod_name, harness.cluster.queries[0].pod_uid) == (
        "llama-0",
        "pod-uid",
    )
    assert harness.cluster.dumps[0].leave_running is True
    assert "write_container_sentinel" not in harness.cluster.names()  # it keeps serving


async def test_gms_waits_for_the_saver_before_the_dump(harness: Harness) -> None:
    harness.cluster.pod = harness.seen(node_name=harness.node, container_ready=True)
    await (await harness.start(harness.request(gms=True, read_every_seconds=0.2))).result()
    names = harness.cluster.names()
    assert names.index("await_gms_saved") < names.index("dump_container")


async def test_a_pod_never_scheduled_fails_at_the_deadline(harness: Harness) -> None:
    handle = await harness.start(harness.request(deadline_seconds=1, read_every_seconds=0.3))
    with pytest.raises(WorkflowFailureError) as err:
        await handle.result()
    assert isinstance(err.value.cause, ApplicationError)
    assert err.value.cause.type == "WorkloadNotReady"
    assert err.value.cause.message == "capture pod not scheduled within 1 s"
    assert harness.cluster.names()[-1] == "delete_capture_job"


async def test_a_pod_on_a_node_without_worker_is_node_lost(harness: Harness) -> None:
    harness.cluster.pod = harness.seen(node_name="gpu-without-worker", container_ready=True)
    handle = await harness.start(harness.request(read_every_seconds=0.2))
    with pytest.raises(WorkflowFailureError) as err:
        await handle.result()
    assert isinstance(err.value.cause, ApplicationError)
    assert err.value.cause.type == "NodeLost"
    assert "node gpu-without-worker" in err.value.cause.message
    assert "dump_container" in err.value.cause.message


async def test_deleting_the_resource_mid_dump_discards_staging_and_the_job(
    harness: Harness,
) -> None:
    harness.cluster.hold_dump = asyncio.Event()
    harness.cluster.pod = harness.seen(node_name=harness.node, container_ready=True)
    handle = await harness.start(harness.request(read_every_seconds=0.2))
    await harness.called("dump_container")
    await handle.cancel()
    with pytest.raises(WorkflowFailureError) as err:
        await handle.result()
    harness.cluster.hold_dump.set()
    assert isinstance(err.value.cause, CancelledError)
    names = harness.cluster.names()
    assert "commit_container" not in names
    assert names[-2:] == ["discard_staging", "delete_capture_job"]
    assert harness.cluster.statuses[-1].reason == "Cancelled"
