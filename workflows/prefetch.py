"""PrefetchWorkflow: warm the node caches of some nodes with a checkpoint version before
pods land there (`warmstart prefetch`, or a Checkpoint's `prefetch` field once it is Ready).

Each node fetches on its own queue, all at once or `nodes_at_once` at a time (a cap on the
bucket's concurrent reads of the version); a node that fails or is gone is reported, not
retried forever, and does not fail the others: a cold cache only slows a restore.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.contracts import PrefetchInput, PrefetchResult
    from activities.steps import PrefetchSteps
    from api.naming import PREFETCH_WORKFLOW, node_task_queue
    from workflows import policies
    from workflows.contracts import NodePrefetch, PrefetchReport, PrefetchRequest

FETCH_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=5),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=3,
)


@workflow.defn(name=PREFETCH_WORKFLOW, failure_exception_types=policies.FAILING_EXCEPTIONS)
class PrefetchWorkflow:
    @workflow.run
    async def run(self, request: PrefetchRequest) -> PrefetchReport:
        # At most `nodes_at_once` fetching, in the order the nodes are named (the
        # semaphore's waiters wake first come, first served; none: all at once, as before).
        at_once = asyncio.Semaphore(request.nodes_at_once) if request.nodes_at_once else None
        fetches = [self._fetch(request, node, at_once) for node in request.nodes]
        return PrefetchReport(nodes=list(await asyncio.gather(*fetches)))

    async def _fetch(
        self, request: PrefetchRequest, node: str, at_once: asyncio.Semaphore | None
    ) -> NodePrefetch:
        async with at_once or contextlib.nullcontext():
            return await self._fetch_on(request, node)

    async def _fetch_on(self, request: PrefetchRequest, node: str) -> NodePrefetch:
        try:
            result: PrefetchResult = await workflow.execute_activity_method(
                PrefetchSteps.prefetch_version,
                PrefetchInput(
                    checkpoint_id=request.checkpoint_id,
                    version=request.version,
                    storage=request.storage,
                ),
                task_queue=node_task_queue(node),
                start_to_close_timeout=policies.UPLOAD.start_to_close,
                heartbeat_timeout=policies.UPLOAD.heartbeat,
                schedule_to_start_timeout=timedelta(seconds=request.node_timeout_seconds),
                retry_policy=FETCH_RETRY,
                summary=f"prefetch {request.checkpoint_id} on {node}",
            )
        except ActivityError as err:
            failure = policies.step_failure(err, node=node)
            return NodePrefetch(node=node, error=f"{failure.reason}: {failure.message}")
        return NodePrefetch(node=node, result=result)
