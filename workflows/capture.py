"""CaptureWorkflow: make a checkpoint of a warmed-up workload (local process now, pods later)."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.contracts import (
        AwaitReadyInput,
        AwaitReadyResult,
        ClaimInput,
        CommitInput,
        CommitResult,
        DiscardInput,
        DumpInput,
        DumpResult,
        LaunchInput,
        LaunchResult,
        SentinelInput,
        StatusInput,
        StopInput,
    )
    from api.naming import checkpoint_version, node_task_queue
    from api.reasons import Phase, Reason, Sentinel
    from workflows import policies, visibility
    from workflows.contracts import CaptureRequest, CaptureResult, Progress
    from workflows.visibility import StepClock

R = TypeVar("R")


@workflow.defn(name="CaptureWorkflow")
class CaptureWorkflow:
    def __init__(self) -> None:
        self._clock = StepClock()
        self._request: CaptureRequest | None = None
        self._version = ""
        self._error = ""

    @workflow.query
    def progress(self) -> Progress:
        req = self._request
        return visibility.progress_of(
            self._clock, checkpoint_id=req.checkpoint_id if req else "",
            node=req.node if req else "", version=self._version, error=self._error,
        )  # fmt: skip

    @workflow.run
    async def run(self, request: CaptureRequest) -> CaptureResult:
        self._request = request
        visibility.index(
            namespace=request.namespace, checkpoint_id=request.checkpoint_id, node=request.node
        )
        self._version = checkpoint_version(workflow.now(), workflow.uuid4().hex)
        launch: LaunchResult | None = None
        staging: str | None = None
        try:
            self._clock.begin("claim", Phase.CREATING)
            await self._control("claim_checkpoint_id", self._claim_input(), "claim checkpoint ID")
            self._clock.begin("launch")
            launch = await self._node(
                "launch_workload", LaunchInput(workload=request.workload,
                checkpoint_id=request.checkpoint_id), LaunchResult, policies.LAUNCH,
                f"launch {request.workload.name}",
            )  # fmt: skip
            self._clock.begin("await-ready", Phase.CAPTURING)
            await self._node(
                "await_workload_ready", AwaitReadyInput(workload=request.workload, launch=launch),
                AwaitReadyResult,
                policies.await_ready_options(request.workload.ready_timeout_seconds),
                f"await {request.workload.readiness.kind} readiness",
            )  # fmt: skip
            self._clock.begin("dump")
            dump = await self._node(
                "dump_checkpoint", DumpInput(checkpoint_id=request.checkpoint_id,
                name=request.name, pid=launch.pid), DumpResult, policies.DUMP,
                f"criu dump pid {launch.pid}",
            )  # fmt: skip
            staging = dump.staging_dir
            self._clock.begin("commit", Phase.UPLOADING)
            commit = await self._node(
                "commit_checkpoint", self._commit_input(staging, launch), CommitResult,
                policies.COMMIT, f"commit version {self._version}",
            )  # fmt: skip
            staging = None
            self._clock.begin("snapshot-complete")
            await self._node(
                "write_sentinel", SentinelInput(control_dir=launch.control_dir,
                sentinel=Sentinel.SNAPSHOT_COMPLETE), type(None), policies.SENTINEL,
                "write snapshot-complete",
            )  # fmt: skip
            self._clock.begin("publish")
            await self._publish(Phase.READY, reason=Reason.CAPTURED, commit=commit)
            self._clock.settle(Phase.READY, "done")
        except ActivityError as err:
            reason, message = policies.failure_reason(err, node=request.node)
            await self._fail(reason, message)
            if reason == Reason.CANCELLED:
                raise asyncio.CancelledError(message) from err
            raise ApplicationError(message, type=reason, non_retryable=True) from err
        except asyncio.CancelledError:
            await asyncio.shield(asyncio.ensure_future(self._fail(Reason.CANCELLED, "cancelled")))
            raise
        finally:
            await asyncio.shield(asyncio.ensure_future(self._cleanup(launch, staging)))
        return CaptureResult(
            checkpoint_id=request.checkpoint_id,
            version=self._version,
            node=request.node,
            storage_uri=commit.storage_uri,
            size_bytes=commit.size_bytes,
            step_seconds=dict(self._clock.seconds),
        )

    def _claim_input(self) -> ClaimInput:
        req = self._require()
        return ClaimInput(checkpoint_id=req.checkpoint_id, namespace=req.namespace, name=req.name)

    def _commit_input(self, staging: str, launch: LaunchResult) -> CommitInput:
        req = self._require()
        return CommitInput(
            staging_dir=staging, checkpoint_id=req.checkpoint_id, version=self._version,
            identity=req.identity, node=req.node, namespace=req.namespace,
            workload=req.workload, launch=launch,
        )  # fmt: skip

    def _require(self) -> CaptureRequest:
        assert self._request is not None
        return self._request

    async def _node(
        self, name: str, arg: Any, result: type[R], opts: policies.StepOptions, summary: str
    ) -> R:
        opts = policies.on_node(opts, self._require().node_timeout_seconds)
        value: R = await workflow.execute_activity(
            name, arg, result_type=result, task_queue=node_task_queue(self._require().node),
            start_to_close_timeout=opts.start_to_close, heartbeat_timeout=opts.heartbeat,
            schedule_to_start_timeout=opts.schedule_to_start, retry_policy=opts.retry,
            summary=summary,
        )  # fmt: skip
        return value

    async def _control(self, name: str, arg: Any, summary: str) -> None:
        opts = policies.CONTROL
        await workflow.execute_activity(
            name, arg, task_queue=self._require().control_task_queue,
            start_to_close_timeout=opts.start_to_close, retry_policy=opts.retry, summary=summary,
        )  # fmt: skip

    async def _publish(
        self, phase: Phase, *, reason: str, message: str = "", commit: CommitResult | None = None
    ) -> None:
        req = self._require()
        info = workflow.info()
        status = StatusInput(
            kind="capture", namespace=req.namespace, name=req.name, phase=phase,
            checkpoint_id=req.checkpoint_id, version=self._version if commit else "",
            node=req.node, reason=str(reason), message=message,
            storage_uri=commit.storage_uri if commit else "",
            size_bytes=commit.size_bytes if commit else 0,
            step_seconds=dict(self._clock.seconds), workflow_id=info.workflow_id,
            run_id=info.run_id,
        )  # fmt: skip
        await self._control("publish_status", status, f"publish {phase.value}")

    async def _fail(self, reason: str, message: str) -> None:
        self._error = f"{reason}: {message}"
        self._clock.settle(Phase.FAILED, "failed")
        await self._publish(Phase.FAILED, reason=reason, message=message)

    async def _cleanup(self, launch: LaunchResult | None, staging: str | None) -> None:
        """Always: nothing half-written stays, no workload keeps running."""
        if staging is not None:
            await self._node(
                "discard_staging", DiscardInput(staging_dir=staging), type(None),
                policies.CLEANUP, "discard staging",
            )  # fmt: skip
        if launch is not None:
            await self._node(
                "stop_workload", StopInput(pid=launch.pid, start_ticks=launch.start_ticks),
                bool, policies.CLEANUP, f"stop pid {launch.pid}",
            )  # fmt: skip
