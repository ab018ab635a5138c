"""CaptureWorkflow: make a checkpoint of a warmed-up workload (local process now, pods later)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
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
        StopInput,
    )
    from activities.control import ControlActivities
    from activities.criu import CriuActivities
    from activities.errors import application_error
    from activities.local import LocalProcessActivities
    from activities.sentinels import SentinelActivities
    from activities.storage import StorageActivities
    from api.errors import PipelineFailedError
    from api.naming import CAPTURE_WORKFLOW, checkpoint_version, node_task_queue
    from api.reasons import Phase, Reason, Sentinel
    from workflows import policies, visibility
    from workflows.contracts import CaptureRequest, CaptureResult, Progress
    from workflows.control import publish_status
    from workflows.visibility import PipelineState

STOP_UNCONFIRMED_LAUNCH = "stop-unconfirmed-launch"
S = TypeVar("S")
I = TypeVar("I")  # noqa: E741
R = TypeVar("R")


@workflow.defn(name=CAPTURE_WORKFLOW)
class CaptureWorkflow:
    def __init__(self) -> None:
        self._state = PipelineState()
        self._clock = self._state.clock
        self._request: CaptureRequest | None = None

    @workflow.query
    def progress(self) -> Progress:
        return self._state.progress()

    @workflow.run
    async def run(self, request: CaptureRequest) -> CaptureResult:
        self._request = request
        self._state.checkpoint_id, self._state.node = request.checkpoint_id, request.node
        visibility.index(
            namespace=request.namespace, checkpoint_id=request.checkpoint_id, node=request.node
        )
        version = checkpoint_version(workflow.now(), workflow.uuid4().hex)
        self._state.version = version
        workload, ckpt = request.workload, request.checkpoint_id
        launch: LaunchResult | None = None
        launched = staged = False
        try:
            self._clock.begin("claim", Phase.CREATING)
            claim = ClaimInput(checkpoint_id=ckpt, namespace=request.namespace, name=request.name)
            await self._control(ControlActivities.claim_checkpoint_id, claim, "claim checkpoint ID")

            self._clock.begin("launch")
            launched = True  # from here on a workload may run: cleanup stops it
            launch = await self._node(
                LocalProcessActivities.launch_workload,
                LaunchInput(workload=workload, checkpoint_id=ckpt),
                policies.LAUNCH,
                f"launch {workload.name}",
                # A cancel waits for the launch to end, so cleanup finds what it started.
                cancellation=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            )

            self._clock.begin("await-ready", Phase.CAPTURING)
            await self._node(
                LocalProcessActivities.await_workload_ready,
                AwaitReadyInput(workload=workload, checkpoint_id=ckpt, pid=launch.pid),
                policies.await_ready_options(workload.ready_timeout_seconds),
                f"await {workload.readiness.kind} readiness",
            )

            self._clock.begin("dump")
            staged = True  # from here on a failure leaves staging to discard
            await self._node(
                CriuActivities.dump_checkpoint,
                DumpInput(checkpoint_id=ckpt, version=version, name=request.name, pid=launch.pid),
                policies.DUMP,
                f"criu dump pid {launch.pid}",
            )

            self._clock.begin("commit", Phase.UPLOADING)
            commit_step = self._start_node(
                StorageActivities.commit_checkpoint,
                CommitInput(
                    checkpoint_id=ckpt,
                    version=version,
                    identity=request.identity,
                    namespace=request.namespace,
                    name=request.name,
                ),
                policies.COMMIT,
                f"commit version {version}",
            )
            try:
                commit = await asyncio.shield(commit_step)
            except asyncio.CancelledError:
                # The commit cannot be taken back halfway: it decides. A version it committed
                # is published Ready, so no committed checkpoint ever says Cancelled.
                commit = await commit_step
                workflow.logger.warning("cancel arrived during commit: %s is committed", version)
            staged = False

            self._clock.begin("snapshot-complete")
            await self._node(
                SentinelActivities.write_sentinel,
                SentinelInput(
                    checkpoint_id=ckpt, name=request.name, sentinel=Sentinel.SNAPSHOT_COMPLETE
                ),
                policies.SENTINEL,
                "write snapshot-complete",
            )

            self._clock.begin("publish")
            await self._publish(Phase.READY, Reason.CAPTURED, commit=commit)
            self._clock.settle(Phase.READY, "done")
        except ActivityError as err:
            failure = policies.step_failure(err, node=request.node)
            await self._fail(failure)
            if failure.reason == Reason.CANCELLED:
                raise asyncio.CancelledError(failure.message) from err
            raise application_error(failure) from None
        except asyncio.CancelledError:
            await self._fail(PipelineFailedError("cancelled", reason=Reason.CANCELLED))
            raise
        finally:
            await self._cleanup(launch, launched=launched, staged=staged)
        return CaptureResult(
            checkpoint_id=ckpt,
            version=version,
            node=request.node,
            storage_uri=commit.storage_uri,
            size_bytes=commit.size_bytes,
            step_seconds=dict(self._clock.seconds),
        )

    def _require(self) -> CaptureRequest:
        assert self._request is not None
        return self._request

    async def _node(
        self,
        step: Callable[[S, I], Awaitable[R]],
        arg: I,
        opts: policies.StepOptions,
        summary: str,
        *,
        cancellation: ActivityCancellationType = ActivityCancellationType.TRY_CANCEL,
    ) -> R:
        """Run `step` on the node's own queue; a node worker that never picks it up is lost."""
        return await self._start_node(step, arg, opts, summary, cancellation=cancellation)

    def _start_node(
        self,
        step: Callable[[S, I], Awaitable[R]],
        arg: I,
        opts: policies.StepOptions,
        summary: str,
        *,
        cancellation: ActivityCancellationType = ActivityCancellationType.TRY_CANCEL,
    ) -> workflow.ActivityHandle[R]:
        req = self._require()
        return workflow.start_activity_method(
            step,
            arg,
            task_queue=node_task_queue(req.node),
            start_to_close_timeout=opts.start_to_close,
            heartbeat_timeout=opts.heartbeat,
            schedule_to_start_timeout=timedelta(seconds=req.node_timeout_seconds),
            retry_policy=opts.retry,
            summary=summary,
            cancellation_type=cancellation,
        )

    async def _control(self, step: Callable[[S, I], Awaitable[None]], arg: I, summary: str) -> None:
        await workflow.execute_activity_method(
            step,
            arg,
            task_queue=self._require().control_task_queue,
            start_to_close_timeout=policies.CONTROL.start_to_close,
            retry_policy=policies.CONTROL.retry,
            summary=summary,
        )

    async def _publish(
        self, phase: Phase, reason: Reason, *, message: str = "", commit: CommitResult | None = None
    ) -> None:
        await publish_status(
            "capture",
            self._require(),
            self._state,
            phase,
            reason,
            message=message,
            committed=commit is not None,
            storage_uri=commit.storage_uri if commit else "",
            size_bytes=commit.size_bytes if commit else 0,
        )

    async def _fail(self, failure: PipelineFailedError) -> None:
        self._state.failed(failure, Phase.FAILED, "failed")
        await self._publish(Phase.FAILED, failure.reason, message=failure.message)

    async def _cleanup(self, launch: LaunchResult | None, *, launched: bool, staged: bool) -> None:
        """Always: nothing half-written stays, no workload keeps running. A cleanup step that
        fails is logged, never raised: it must not replace the reason the capture ended."""
        req = self._require()
        if staged:
            discard = DiscardInput(checkpoint_id=req.checkpoint_id, version=self._state.version)
            await self._try_cleanup(StorageActivities.discard_staging, discard, "discard staging")
        # Runs recorded before this step existed stopped only launches whose result they saw.
        if launch is not None or (launched and workflow.patched(STOP_UNCONFIRMED_LAUNCH)):
            # Without the launch's result (failed or cancelled), the node's launch record says.
            pid, ticks = (launch.pid, launch.start_ticks) if launch else (0, 0)
            stop = StopInput(
                pid=pid, start_ticks=ticks, name=req.name, checkpoint_id=req.checkpoint_id
            )
            summary = f"stop pid {pid}" if pid else f"stop {req.name} if launched"
            await self._try_cleanup(LocalProcessActivities.stop_workload, stop, summary)

    async def _try_cleanup(
        self, step: Callable[[S, I], Awaitable[None]], arg: I, summary: str
    ) -> None:
        try:
            await self._node(step, arg, policies.CLEANUP, summary)
        except ActivityError as err:
            failure = policies.step_failure(err, node=self._require().node)
            workflow.logger.warning("cleanup %s failed: [%s] %s", summary, failure.reason, failure)
