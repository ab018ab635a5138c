"""RestoreWorkflow: put a checkpoint back on a node, falling back to a cold start on failure.

It runs on the node's own queue so the single restore activity is dispatched eagerly;
publishing status is a control-queue step after the workload already runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.contracts import (
        ContainerRestoreInput,
        ContainerSentinelInput,
        RestoredWorkload,
        RestoreInput,
    )
    from activities.errors import application_error
    from activities.steps import ContainerSteps, RestoreSteps
    from api.errors import PipelineFailedError
    from api.naming import PROGRESS_QUERY, RESTORE_WORKFLOW, node_task_queue
    from api.reasons import Phase, Reason, Sentinel
    from workflows import policies, visibility
    from workflows.contracts import Progress, RestoreRequest, RestoreResult
    from workflows.control import publish_status
    from workflows.visibility import PipelineState


S = TypeVar("S")
I = TypeVar("I")  # noqa: E741
R = TypeVar("R")


# Not sandboxed: the sandbox re-imports this module for every run, ~4 ms of a ~25 ms
# budget on the restore critical path. Determinism is kept by this module doing nothing
# but orchestration and is checked by the replay tests (docs/decisions/0006).
@workflow.defn(
    name=RESTORE_WORKFLOW, sandboxed=False, failure_exception_types=policies.FAILING_EXCEPTIONS
)
class RestoreWorkflow:
    def __init__(self) -> None:
        self._state = PipelineState()
        self._request: RestoreRequest | None = None

    @workflow.query(name=PROGRESS_QUERY)
    def progress(self) -> Progress:
        return self._state.progress()

    @workflow.run
    async def run(self, request: RestoreRequest) -> RestoreResult:
        self._request = request
        state, clock = self._state, self._state.clock
        state.checkpoint_id, state.node, state.version = (
            request.checkpoint_id,
            request.node,
            request.version,
        )
        visibility.index(
            namespace=request.namespace, checkpoint_id=request.checkpoint_id, node=request.node
        )
        clock.begin("restore", Phase.RESTORING)
        if request.refusal is not None:
            # Refused by the node before anything was read: no restore step, the pod starts
            # cold. No `patched` needed: recorded histories predate refusals.
            refused = request.refusal
            await self._fell_back(PipelineFailedError(refused.message, reason=refused.reason))
        try:
            restored = await (self._into_container() if request.pod else self._locally())
        except ActivityError as err:
            await self._fell_back(policies.step_failure(err, node=request.node))
        except asyncio.CancelledError:
            clock.settle(Phase.FELL_BACK, "cancelled")
            raise
        state.version = restored.version
        clock.begin("publish")
        await self._publish(Phase.RESTORED, Reason.RESTORED, message=f"pid {restored.pid}")
        clock.settle(Phase.RESTORED, "done")
        return RestoreResult(
            checkpoint_id=request.checkpoint_id,
            version=state.version,
            pid=restored.pid,
            node=request.node,
            stage_seconds=restored.stage_seconds,
            step_seconds=dict(clock.seconds),
            criu_running=restored.criu_running,
        )

    async def _fell_back(self, failure: PipelineFailedError) -> NoReturn:
        """The pod (if any) starts cold, the status says why, and the run fails with it."""
        request = self._request
        assert request is not None
        self._state.failed(failure, Phase.FELL_BACK, "fell-back")
        if request.pod is not None:
            await self._fall_back(f"{failure.reason}: {failure.message}")
        await self._publish(Phase.FELL_BACK, failure.reason, message=failure.message)
        if request.pod is not None and request.pod.standby == "image":
            # No `patched` needed: recorded histories predate image standbys, so none
            # of them takes this branch.
            await self._stop_image_standby()
        raise application_error(failure) from None

    async def _locally(self) -> RestoredWorkload:
        request = self._request
        assert request is not None
        opts = policies.restore_options(request.answer_timeout_seconds)
        restore = RestoreInput(
            checkpoint_id=request.checkpoint_id,
            version=request.version,
            name=request.name,
            answer_timeout_seconds=request.answer_timeout_seconds,
            storage=request.storage,
            env=request.env,
        )
        return await self._on_node(
            RestoreSteps.restore_checkpoint,
            restore,
            opts,
            f"restore {request.checkpoint_id} on {request.node}",
        )

    async def _into_container(self) -> RestoredWorkload:
        """The pod's standby container takes the restored tree (same node queue, so the
        activity is dispatched eagerly to the worker that started this workflow)."""
        request = self._request
        assert request is not None and request.pod is not None
        opts = policies.container_restore_options(request.deadline_seconds)
        restore = ContainerRestoreInput(
            target=request.pod,
            checkpoint_id=request.checkpoint_id,
            version=request.version,
            gms_sentinel=request.gms_sentinel,
            storage=request.storage,
            manifest_sha256=request.manifest_sha256,
            unverified=request.unverified,
        )
        restored = await self._on_node(
            ContainerSteps.restore_container,
            restore,
            opts,
            f"restore {request.checkpoint_id} into {request.pod.pod_name}",
        )
        return RestoredWorkload(
            pid=restored.pid, version=restored.version, stage_seconds=restored.stage_seconds
        )

    async def _on_node(
        self, step: Callable[[S, I], Awaitable[R]], arg: I, opts: policies.StepOptions, summary: str
    ) -> R:
        """The restore activity, on the node's own queue (eagerly dispatched)."""
        assert self._request is not None
        return await workflow.execute_activity_method(
            step,
            arg,
            task_queue=node_task_queue(self._request.node),
            start_to_close_timeout=opts.start_to_close,
            heartbeat_timeout=opts.heartbeat,
            schedule_to_start_timeout=policies.RESTORE_SCHEDULE_TO_START,
            retry_policy=opts.retry,
            summary=summary,
        )

    async def _fall_back(self, reason: str) -> None:
        """`restore-failed` for the standby, also when the node activity could not write it
        (timed out, its worker died): the standby then starts the workload cold."""
        request = self._request
        assert request is not None and request.pod is not None
        try:
            await workflow.execute_activity_method(
                ContainerSteps.write_container_sentinel,
                ContainerSentinelInput(
                    target=request.pod, sentinel=Sentinel.RESTORE_FAILED, content=reason
                ),
                task_queue=node_task_queue(request.node),
                start_to_close_timeout=policies.SENTINEL.start_to_close,
                schedule_to_start_timeout=policies.RESTORE_SCHEDULE_TO_START,
                retry_policy=policies.SENTINEL.retry,
                summary="restore-failed: start cold",
            )
        except ActivityError as err:  # the pod or its node is gone: nothing waits
            workflow.logger.warning("restore-failed not written: %s", err)

    async def _stop_image_standby(self) -> None:
        """After the pod's annotations turned the image's standby off (published above): stop
        it, so that the kubelet restarts the container and it starts cold."""
        request = self._request
        assert request is not None and request.pod is not None
        try:
            await workflow.execute_activity_method(
                ContainerSteps.stop_standby,
                request.pod,
                task_queue=node_task_queue(request.node),
                start_to_close_timeout=policies.SENTINEL.start_to_close,
                schedule_to_start_timeout=policies.RESTORE_SCHEDULE_TO_START,
                retry_policy=policies.SENTINEL.retry,
                summary="stop the image's standby: it restarts cold",
            )
        except ActivityError as err:  # the pod or its node is gone
            workflow.logger.warning("standby not stopped: %s", err)

    async def _publish(self, phase: Phase, reason: Reason, *, message: str) -> None:
        assert self._request is not None
        await publish_status(
            "restore",
            self._request,
            self._state,
            phase,
            reason,
            message=message,
            pod=self._request.pod,
        )
