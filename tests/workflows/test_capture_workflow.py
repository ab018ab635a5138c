"""CaptureWorkflow with stand-in activities registered under the real names."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from activities.contracts import (
    AwaitReadyInput,
    ClaimInput,
    CommitInput,
    CommitResult,
    DiscardInput,
    DumpInput,
    LaunchInput,
    LaunchResult,
    SentinelInput,
    StatusInput,
    StopInput,
    VerifyInput,
    VerifyResult,
)
from activities.errors import ErrorMapping
from api.errors import DumpFailedError, VerifyFailedError
from api.identity import CheckpointIdentity
from api.naming import node_task_queue
from api.reasons import Phase, Sentinel
from api.workload import LocalWorkload
from workflows.capture import CaptureWorkflow
from workflows.contracts import CaptureRequest, CaptureResult, Progress
from workflows.visibility import CHECKPOINT_ID, NODE, PHASE


@dataclass
class StandIns:
    """Records each call as (activity name, task queue); failures are injected by name."""

    calls: list[tuple[str, str]] = field(default_factory=list)
    statuses: list[StatusInput] = field(default_factory=list)
    fail: dict[str, Exception] = field(default_factory=dict)
    hold_ready: asyncio.Event | None = None
    hold_commit: asyncio.Event | None = None
    discarded: list[str] = field(default_factory=list)
    dumped: list[str] = field(default_factory=list)
    commits: list[CommitInput] = field(default_factory=list)
    discards: list[DiscardInput] = field(default_factory=list)

    def _record(self, name: str) -> None:
        self.calls.append((name, activity.info().task_queue))
        if name in self.fail:
            raise self.fail[name]

    @activity.defn(name="claim_checkpoint_id")
    async def claim(self, request: ClaimInput) -> None:
        self._record("claim_checkpoint_id")

    @activity.defn(name="publish_status")
    async def publish(self, request: StatusInput) -> None:
        self.statuses.append(request)
        self._record("publish_status")

    @activity.defn(name="launch_workload")
    async def launch(self, request: LaunchInput) -> LaunchResult:
        self._record("launch_workload")
        return LaunchResult(pid=4242, start_ticks=7)

    @activity.defn(name="await_workload_ready")
    async def await_ready(self, request: AwaitReadyInput) -> None:
        self._record("await_workload_ready")
        while self.hold_ready is not None and not self.hold_ready.is_set():
            activity.heartbeat()  # cancellation reaches an activity through heartbeats
            await asyncio.sleep(0.05)

    @activity.defn(name="dump_checkpoint")
    async def dump(self, request: DumpInput) -> None:
        self.dumped.append(request.version)
        self._record("dump_checkpoint")

    @activity.defn(name="commit_checkpoint")
    async def commit(self, request: CommitInput) -> CommitResult:
        self.commits.append(request)
        self._record("commit_checkpoint")
        if self.hold_commit is not None:
            await self.hold_commit.wait()  # like the real commit: no heartbeats, so no cancel
        return CommitResult(storage_uri="file:///v", size_bytes=10)

    @activity.defn(name="write_sentinel")
    async def sentinel(self, request: SentinelInput) -> None:
        assert request.sentinel == Sentinel.SNAPSHOT_COMPLETE
        self._record("write_sentinel")

    @activity.defn(name="discard_staging")
    async def discard(self, request: DiscardInput) -> None:
        self.discarded.append(request.version)
        self.discards.append(request)
        self._record("discard_staging")

    @activity.defn(name="stop_workload")
    async def stop(self, request: StopInput) -> None:
        self._record("stop_workload")

    @activity.defn(name="verify_version")
    async def verify(self, request: VerifyInput) -> VerifyResult:
        assert request.version == self.dumped[-1]
        self._record("verify_version")
        return VerifyResult(stage_seconds={"criu-restore": 0.05})

    def control(self) -> list[object]:
        return [self.claim, self.publish]

    def node(self) -> list[object]:
        return [
            self.launch,
            self.await_ready,
            self.dump,
            self.commit,
            self.sentinel,
            self.discard,
            self.stop,
            self.verify,
        ]

    def names(self) -> list[str]:
        return [name for name, _queue in self.calls]


@dataclass
class Harness:
    client: Client
    stand_ins: StandIns
    control_queue: str
    node: str

    def request(self, name: str = "llama") -> CaptureRequest:
        identity = CheckpointIdentity(model=f"m/{name}", backend_framework="vllm")
        workload = LocalWorkload(name=name, command=("serve",), cwd="/")
        return CaptureRequest.local(
            workload, identity, node=self.node, control_task_queue=self.control_queue
        )

    async def started(self, name: str) -> None:
        """Wait (with a deadline) until the stand-in `name` has been called."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while name not in self.stand_ins.names():
            assert loop.time() < deadline, f"{name} never started"
            await asyncio.sleep(0.02)

    async def start(
        self, request: CaptureRequest
    ) -> WorkflowHandle[CaptureWorkflow, CaptureResult]:
        return await self.client.start_workflow(
            CaptureWorkflow.run,
            request,
            id=f"capture/test/{uuid.uuid4()}",
            task_queue=self.control_queue,
        )


@pytest_asyncio.fixture
async def harness(client: Client) -> AsyncIterator[Harness]:
    stand_ins = StandIns()
    suffix = uuid.uuid4().hex[:8]
    control_queue, node = f"control-{suffix}", f"node-{suffix}"
    async with (
        Worker(
            client,
            task_queue=control_queue,
            workflows=[CaptureWorkflow],
            activities=stand_ins.control(),
            interceptors=[ErrorMapping()],
        ),
        Worker(
            client,
            task_queue=node_task_queue(node),
            activities=stand_ins.node(),
            interceptors=[ErrorMapping()],
        ),
    ):
        yield Harness(client, stand_ins, control_queue, node)


async def test_steps_run_in_order_on_their_queues(harness: Harness) -> None:
    request = harness.request()
    handle = await harness.start(request)
    result = await handle.result()

    node_q, control_q = node_task_queue(harness.node), harness.control_queue
    assert harness.stand_ins.calls == [
        ("claim_checkpoint_id", control_q),
        ("launch_workload", node_q),
        ("await_workload_ready", node_q),
        ("dump_checkpoint", node_q),
        ("commit_checkpoint", node_q),
        ("write_sentinel", node_q),
        ("publish_status", control_q),
        ("stop_workload", node_q),
    ]
    assert result.checkpoint_id == request.checkpoint_id
    assert result.storage_uri == "file:///v"
    assert list(result.step_seconds) == [
        "claim",
        "launch",
        "await-ready",
        "dump",
        "commit",
        "snapshot-complete",
        "publish",
    ]
    [ready] = harness.stand_ins.statuses
    assert ready.phase == Phase.READY and ready.version == result.version
    attrs = (await handle.describe()).typed_search_attributes
    assert attrs.get(PHASE) == "Ready"
    assert attrs.get(NODE) == harness.node
    assert attrs.get(CHECKPOINT_ID) == request.checkpoint_id


async def test_progress_query_shows_the_current_step(harness: Harness) -> None:
    harness.stand_ins.hold_ready = asyncio.Event()
    handle = await harness.start(harness.request())
    await harness.started("await_workload_ready")
    progress = await handle.query(CaptureWorkflow.progress)
    assert isinstance(progress, Progress)
    assert (progress.step, progress.phase) == ("await-ready", Phase.CAPTURING)
    assert "launch" in progress.step_seconds
    harness.stand_ins.hold_ready.set()
    await handle.result()
    assert (await handle.query(CaptureWorkflow.progress)).step == "done"


async def test_failed_commit_discards_staging_and_publishes_failed(harness: Harness) -> None:
    # What the real commit raises on a full disk (tests/activities/test_storage_activities.py),
    # mapped by the same interceptor the real workers use.
    harness.stand_ins.fail["commit_checkpoint"] = DumpFailedError(
        "checkpoint llama version v: cannot commit: No space left on device"
    )
    handle = await harness.start(harness.request())
    with pytest.raises(WorkflowFailureError) as err:
        await handle.result()
    assert isinstance(err.value.cause, ApplicationError)
    assert err.value.cause.type == "DumpFailed"
    assert "No space left on device" in err.value.cause.message
    assert harness.stand_ins.discarded == harness.stand_ins.dumped  # the staged version
    assert "write_sentinel" not in harness.stand_ins.names()
    assert harness.stand_ins.names()[-1] == "stop_workload"
    [failed] = harness.stand_ins.statuses
    assert (failed.phase, failed.reason) == (Phase.FAILED, "DumpFailed")
    assert (await handle.describe()).typed_search_attributes.get(PHASE) == "Failed"


async def test_a_verified_capture_holds_its_version_back_until_the_test_restore(
    harness: Harness,
) -> None:
    request = harness.request().model_copy(update={"verify": True})
    result = await (await harness.start(request)).result()
    names = harness.stand_ins.names()
    assert names[names.index("commit_checkpoint") :] == [
        "commit_checkpoint",
        "write_sentinel",
        "verify_version",
        "publish_status",
        "stop_workload",
    ]
    assert [c.unverified for c in harness.stand_ins.commits] == [True]
    assert list(result.step_seconds)[-3:] == ["snapshot-complete", "verify", "publish"]
    assert harness.stand_ins.discards == []  # verified: nothing to delete


async def test_a_failed_test_restore_fails_the_capture_and_deletes_the_version(
    harness: Harness,
) -> None:
    harness.stand_ins.fail["verify_version"] = VerifyFailedError(
        "checkpoint llama version v: its test restore did not answer: [RestoreFailed] …"
    )
    handle = await harness.start(harness.request().model_copy(update={"verify": True}))
    with pytest.raises(WorkflowFailureError) as err:
        await handle.result()
    assert isinstance(err.value.cause, ApplicationError)
    assert err.value.cause.type == "VerifyFailed"
    [failed] = harness.stand_ins.statuses
    assert (failed.phase, failed.reason) == (Phase.FAILED, "VerifyFailed")
    assert "[RestoreFailed]" in failed.message
    [discard] = harness.stand_ins.discards
    assert (discard.version, discard.unverified) == (harness.stand_ins.dumped[-1], True)
    assert harness.stand_ins.names()[-2:] == ["discard_staging", "stop_workload"]


async def test_without_verify_nothing_is_held_back(harness: Harness) -> None:
    await (await harness.start(harness.request())).result()
    assert [c.unverified for c in harness.stand_ins.commits] == [False]
    assert "verify_version" not in harness.stand_ins.names()


async def test_identity_conflict_creates_nothing(harness: Harness) -> None:
    harness.stand_ins.fail["claim_checkpoint_id"] = ApplicationError(
        "checkpoint ID 1 is already owned by local/other",
        type="IdentityConflict",
        non_retryable=True,
    )
    handle = await harness.start(harness.request())
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    assert harness.stand_ins.names() == ["claim_checkpoint_id", "publish_status"]
    assert harness.stand_ins.statuses[0].message.endswith("local/other")


async def test_workload_exit_stops_before_dump(harness: Harness) -> None:
    harness.stand_ins.fail["await_workload_ready"] = ApplicationError(
        "workload llama exited with status 3", type="WorkloadExited", non_retryable=True
    )
    handle = await harness.start(harness.request())
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    names = harness.stand_ins.names()
    assert "dump_checkpoint" not in names and names[-1] == "stop_workload"
    assert harness.stand_ins.statuses[0].reason == "WorkloadExited"


async def test_cancel_publishes_and_cleans_up(harness: Harness) -> None:
    harness.stand_ins.hold_ready = asyncio.Event()
    handle = await harness.start(harness.request())
    await harness.started("await_workload_ready")
    await handle.cancel()
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    harness.stand_ins.hold_ready.set()
    assert harness.stand_ins.statuses[-1].reason == "Cancelled"
    assert "stop_workload" in harness.stand_ins.names()


async def test_a_failing_cleanup_keeps_the_real_reason(harness: Harness) -> None:
    harness.stand_ins.fail["await_workload_ready"] = ApplicationError(
        "workload llama exited with status 3", type="WorkloadExited", non_retryable=True
    )
    harness.stand_ins.fail["stop_workload"] = ApplicationError(
        "cannot signal pid 4242", type="InternalError", non_retryable=True
    )
    handle = await harness.start(harness.request())
    with pytest.raises(WorkflowFailureError) as err:
        await handle.result()
    assert isinstance(err.value.cause, ApplicationError)
    assert err.value.cause.type == "WorkloadExited"
    assert harness.stand_ins.names()[-1] == "stop_workload"


async def test_a_cancel_during_commit_lets_the_commit_decide(harness: Harness) -> None:
    harness.stand_ins.hold_commit = asyncio.Event()
    handle = await harness.start(harness.request())
    await harness.started("commit_checkpoint")
    await handle.cancel()
    await cancel_processed(handle)  # the workflow has seen the cancel; the commit still runs
    harness.stand_ins.hold_commit.set()

    result = await handle.result()  # committed: the capture ends Ready, not Cancelled
    assert result.storage_uri == "file:///v"
    assert harness.stand_ins.discarded == []
    assert [(s.phase, s.reason) for s in harness.stand_ins.statuses] == [(Phase.READY, "Captured")]
    assert harness.stand_ins.names()[-3:] == ["write_sentinel", "publish_status", "stop_workload"]


async def cancel_processed(handle: WorkflowHandle[Any, Any]) -> None:
    """Until the history shows the cancel request and a workflow task completed after it:
    the workflow code has run with the cancel delivered."""
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        events = [event.event_type for event in (await handle.fetch_history()).events]
        requested = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED
        if requested in events:
            after = events[events.index(requested) :]
            if EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED in after:
                return
        assert asyncio.get_running_loop().time() < deadline, "the cancel was never processed"
        await asyncio.sleep(0.02)
