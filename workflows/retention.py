"""RetentionWorkflow: list committed versions, find the protected ones, plan deletions with
the pure `api.retention.plan_deletions`, delete, sweep orphans; where the request includes
remote storage, list, plan, delete and sweep incomplete uploads in S3 too; report.

It runs on the control queue (started by the `warmstart-retention` Schedule or by
`warmstart gc`); its activities go to the same queue, whose worker mounts the store.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.contracts import (
        DeleteVersionInput,
        DeleteVersionResult,
        ListVersionsInput,
        ProtectedInput,
        SweepInput,
        SweepResult,
        UploadSweepInput,
    )
    from activities.steps import RetentionSteps
    from api.retention import RETENTION_WORKFLOW, Deletion, ProtectedRef, plan_deletions
    from workflows import policies
    from workflows.retention_contracts import RemoteSummary, RetentionRequest, RetentionSummary

# Listing and sweeping read every manifest; deleting removes a tree of up to ~160 GiB.
STORE_STEP_TIMEOUT = timedelta(minutes=30)
STORE_STEP_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=5),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=5,
)
I = TypeVar("I")  # noqa: E741
R = TypeVar("R")
DeleteStep = Callable[[RetentionSteps, DeleteVersionInput], Awaitable[DeleteVersionResult]]


@workflow.defn(name=RETENTION_WORKFLOW, failure_exception_types=policies.FAILING_EXCEPTIONS)
class RetentionWorkflow:
    @workflow.run
    async def run(self, request: RetentionRequest) -> RetentionSummary:
        listed = await _store_step(
            RetentionSteps.list_checkpoint_versions,
            ListVersionsInput(),
            "list committed versions",
        )
        protected = await _store_step(
            RetentionSteps.protected_versions,
            ProtectedInput(),
            "find live restores and Ready references",
        )
        plan = plan_deletions(
            listed.versions, request.policies, now=workflow.now(), protected=protected.refs
        )
        if not request.dry_run:
            await self._delete(plan, RetentionSteps.delete_version)
        swept = await _store_step(
            RetentionSteps.sweep_orphans,
            SweepInput(
                staging_older_than_seconds=request.staging_older_than_seconds,
                dry_run=request.dry_run,
            ),
            "sweep orphans" + (" (dry run)" if request.dry_run else ""),
        )
        # Added steps only where asked, so that histories of runs without S3 still replay.
        remote = await self._apply_remote(request, protected.refs) if request.remote else None
        return summarize(
            request,
            plan,
            listed=len(listed.versions),
            protected=len(protected.refs),
            swept=swept,
            remote=remote,
        )

    async def _apply_remote(
        self, request: RetentionRequest, protected: Sequence[ProtectedRef]
    ) -> RemoteSummary:
        """The same policy and protected references over the versions in S3, then the
        sweep of its incomplete uploads."""
        listed = await _store_step(
            RetentionSteps.list_remote_versions,
            ListVersionsInput(),
            "list committed versions in S3",
        )
        plan = plan_deletions(
            listed.versions, request.policies, now=workflow.now(), protected=protected
        )
        if not request.dry_run:
            await self._delete(plan, RetentionSteps.delete_remote_version, where=" in S3")
        uploads = await _store_step(
            RetentionSteps.sweep_remote_uploads,
            UploadSweepInput(
                older_than_seconds=request.uploads_older_than_seconds, dry_run=request.dry_run
            ),
            "abort stale uploads in S3" + (" (dry run)" if request.dry_run else ""),
        )
        return RemoteSummary(
            location=listed.location,
            deleted=tuple(plan),
            bytes_freed=sum(d.size_bytes for d in plan),
            kept=len(listed.versions) - len(plan),
            aborted_uploads=uploads.aborted,
        )

    async def _delete(self, plan: list[Deletion], step: DeleteStep, *, where: str = "") -> None:
        """One activity per version, in turn: each is retried on its own and shows in the UI."""
        for deletion in plan:
            workflow.logger.info(
                "deleting checkpoint %s version %s%s: %s",
                deletion.checkpoint_id,
                deletion.version,
                where,
                deletion.reason,
            )
            await _store_step(
                step,
                DeleteVersionInput(checkpoint_id=deletion.checkpoint_id, version=deletion.version),
                f"delete {deletion.checkpoint_id}/{deletion.version}{where}: {deletion.reason}",
            )


async def _store_step(step: Callable[[Any, I], Awaitable[R]], arg: I, summary: str) -> R:
    """A step over a store: listing and sweeping read every manifest, a deletion removes a
    tree of up to ~160 GiB."""
    return await workflow.execute_activity_method(
        step,
        arg,
        start_to_close_timeout=STORE_STEP_TIMEOUT,
        retry_policy=STORE_STEP_RETRY,
        summary=summary,
    )


def summarize(
    request: RetentionRequest,
    plan: list[Deletion],
    *,
    listed: int,
    protected: int,
    swept: SweepResult,
    remote: RemoteSummary | None = None,
) -> RetentionSummary:
    return RetentionSummary(
        dry_run=request.dry_run,
        deleted=tuple(plan),
        bytes_freed=sum(d.size_bytes for d in plan),
        kept=listed - len(plan),
        protected=protected,
        swept_staging=swept.staging,
        swept_half_deleted=swept.half_deleted,
        swept_quarantine=swept.quarantine,
        remote=remote,
    )
