"""Checkpoint retention from the outside: the policies from settings, the
`warmstart-retention` Schedule, one run on demand (`warmstart gc`), its summary as text, and
the control worker's retention activities (with the S3 location, where configured)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleHandle,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)

from activities.storage.quarantine import Quarantine
from activities.storage.retention import ReadyReferences, RetentionActivities, no_ready_references
from activities.storage.store import CheckpointStore
from api.errors import InvalidSpecError
from api.retention import RETENTION_SCHEDULE_ID, RetentionPolicies, RetentionPolicy
from workers.remote import remote_versions
from workers.settings import Settings
from workflows.retention import RetentionWorkflow
from workflows.retention_contracts import RemoteSummary, RetentionRequest, RetentionSummary


def retention_policies(settings: Settings) -> RetentionPolicies:
    """The default policy from settings plus the per-namespace ones of `policies_file`."""
    r = settings.retention
    default = RetentionPolicy(
        keep_newest_per_identity=r.keep_newest_per_identity,
        max_age_days=r.max_age_days,
        max_total_bytes=r.max_total_bytes,
    )
    if r.policies_file is None:
        return RetentionPolicies(default=default)
    try:
        by_namespace = json.loads(Path(r.policies_file).read_text())
        return RetentionPolicies(default=default, by_namespace=by_namespace)
    except (OSError, ValueError, ValidationError) as err:
        raise InvalidSpecError(f"retention policies file {r.policies_file}: {err}") from err


def retention_request(settings: Settings, *, dry_run: bool = False) -> RetentionRequest:
    """With remote storage configured, the run covers the remote store too."""
    return RetentionRequest(
        policies=retention_policies(settings),
        dry_run=dry_run,
        remote=settings.storage.configured,
    )


def retention_schedule(settings: Settings) -> Schedule:
    """Every `interval_seconds`, a RetentionWorkflow on the control queue; a run still going
    when the next is due makes that one skip."""
    action = ScheduleActionStartWorkflow(
        RetentionWorkflow.run,
        retention_request(settings),
        id=RETENTION_SCHEDULE_ID,
        task_queue=settings.node.control_task_queue,
    )
    interval = timedelta(seconds=settings.retention.interval_seconds)
    return Schedule(
        action=action,
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=interval)]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )


async def ensure_retention_schedule(client: Client, *, settings: Settings) -> ScheduleHandle:
    """Create the `warmstart-retention` Schedule, or update it to these settings."""
    schedule = retention_schedule(settings)
    try:
        return await client.create_schedule(RETENTION_SCHEDULE_ID, schedule)
    except ScheduleAlreadyRunningError:
        handle = client.get_schedule_handle(RETENTION_SCHEDULE_ID)

        def replace(_: ScheduleUpdateInput) -> ScheduleUpdate:
            return ScheduleUpdate(schedule=schedule)

        await handle.update(replace)
        return handle


async def run_retention(client: Client, *, settings: Settings, dry_run: bool) -> RetentionSummary:
    """One RetentionWorkflow now, on the control queue; its summary."""
    return await client.execute_workflow(
        RetentionWorkflow.run,
        retention_request(settings, dry_run=dry_run),
        id=f"retention/manual/{uuid.uuid4()}",
        task_queue=settings.node.control_task_queue,
    )


def summary_lines(summary: RetentionSummary) -> list[str]:
    """The summary as a person reads it."""
    verb = "would delete" if summary.dry_run else "deleted"
    lines = [
        f"checkpoint {d.checkpoint_id} version {d.version} ({d.namespace}, "
        f"{d.size_bytes} bytes): {verb}, {d.reason}"
        for d in summary.deleted
    ]
    swept = (
        *summary.swept_staging,
        *summary.swept_half_deleted,
        *summary.swept_quarantine,
    )
    lines += [f"{'would sweep' if summary.dry_run else 'swept'} {path}" for path in swept]
    lines.append(
        f"{verb} {len(summary.deleted)} version(s), {summary.bytes_freed} bytes; "
        f"kept {summary.kept}; {summary.protected} protected reference(s)"
    )
    if summary.remote is not None:
        lines += _remote_lines(summary.remote, dry_run=summary.dry_run)
    return lines


def _remote_lines(remote: RemoteSummary, *, dry_run: bool) -> list[str]:
    verb = "would delete" if dry_run else "deleted"
    lines = [
        f"{remote.location}: checkpoint {d.checkpoint_id} version {d.version} ({d.namespace}, "
        f"{d.size_bytes} bytes): {verb}, {d.reason}"
        for d in remote.deleted
    ]
    abort = "would abort" if dry_run else "aborted"
    lines += [f"{abort} incomplete upload {uri}" for uri in remote.aborted_uploads]
    lines.append(
        f"{remote.location}: {verb} {len(remote.deleted)} version(s), "
        f"{remote.bytes_freed} bytes; kept {remote.kept}"
    )
    return lines


def retention_activities(
    client: Client, *, settings: Settings, ready_references: ReadyReferences | None = None
) -> list[Callable[..., Any]]:
    """The control worker's retention activities over its checkpoint root (on a cluster the
    checkpoints PVC, mounted there) and, where configured, the S3 location. On a cluster,
    `ready_references` reads the versions in use there (those Ready resources reference and
    those admitted restore-target pods wait for)."""
    retention = RetentionActivities(
        store=CheckpointStore(settings.checkpoint_root),
        client=client,
        ready_references=ready_references or no_ready_references,
        remote=remote_versions(settings),
        quarantine=Quarantine(
            settings.checkpoint_root,
            policy=settings.quarantine.policy(cluster=ready_references is not None),
        ),
    )
    return [
        retention.list_checkpoint_versions,
        retention.protected_versions,
        retention.delete_version,
        retention.sweep_orphans,
        retention.list_remote_versions,
        retention.delete_remote_version,
        retention.sweep_remote_uploads,
    ]
