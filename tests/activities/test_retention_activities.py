"""Retention activities on a temporary store: listing, deletion (manifest first, finished
on a retry after a crash), orphan sweeping, and the references of running restores."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio import workflow
from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Worker

from activities.storage.catalog import LocalCatalog
from activities.storage.quarantine import NodeClass, Quarantine, QuarantineEvidence
from activities.storage.retention import (
    CHECKPOINT_ID_KEY,
    DeleteVersionInput,
    ListVersionsInput,
    ProtectedInput,
    RetentionActivities,
    SweepInput,
)
from activities.storage.store import CheckpointStore
from api.manifest import Manifest
from api.naming import MANIFEST_FILE, RESTORE_WORKFLOW
from api.retention import ProtectedRef
from tests.committing import commit_version
from workflows.visibility import CHECKPOINT_ID

pytestmark = pytest.mark.timeout(60)
T0 = datetime(2026, 11, 24, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "checkpoints")


def _activities(store: CheckpointStore, client: Client) -> RetentionActivities:
    return RetentionActivities(store=store, client=client)


def _delete_input(manifest: Manifest) -> DeleteVersionInput:
    return DeleteVersionInput(checkpoint_id=manifest.checkpoint_id, version=manifest.version)


def test_the_key_is_the_one_workflows_index() -> None:
    assert CHECKPOINT_ID_KEY == CHECKPOINT_ID


async def test_lists_committed_versions_with_namespace_and_size(
    store: CheckpointStore, client: Client
) -> None:
    made = commit_version(store, model="m", created_at=T0, namespace="team-a", size=1000)
    store.fresh_staging(made.checkpoint_id, "uncommitted")
    listed = await ActivityEnvironment().run(
        _activities(store, client).list_checkpoint_versions, ListVersionsInput()
    )
    [version] = listed.versions
    assert (version.checkpoint_id, version.version) == (made.checkpoint_id, made.version)
    assert (version.namespace, version.created_at) == ("team-a", T0)
    assert version.size_bytes == made.size_bytes >= 1000


async def test_delete_removes_the_manifest_first_and_a_retry_finishes(
    store: CheckpointStore, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = commit_version(store, model="m", created_at=T0)
    kept = commit_version(store, model="m", created_at=T0 + timedelta(hours=1), suffix="bbbbbb")
    version_dir = store.version_dir(made.checkpoint_id, made.version)
    acts = _activities(store, client)

    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError("worker killed while removing files")

    monkeypatch.setattr(shutil, "rmtree", crash)
    with pytest.raises(OSError, match="worker killed"):
        await ActivityEnvironment().run(acts.delete_version, _delete_input(made))
    monkeypatch.undo()
    # The files are still there, but the version no longer exists for any reader.
    assert (version_dir / "criu" / "pages-1.img").exists()
    assert not (version_dir / MANIFEST_FILE).exists()
    listed = await ActivityEnvironment().run(acts.list_checkpoint_versions, ListVersionsInput())
    assert [v.version for v in listed.versions] == [kept.version]
    assert [e.version for e in LocalCatalog(store.root).checkpoints()] == [kept.version]

    result = await ActivityEnvironment().run(acts.delete_version, _delete_input(made))
    assert not result.existed
    assert not version_dir.exists()
    again = await ActivityEnvironment().run(acts.delete_version, _delete_input(made))
    assert not again.existed


async def test_sweep_finishes_a_deletion_whose_retries_ran_out(
    store: CheckpointStore, client: Client
) -> None:
    made = commit_version(store, model="m", created_at=T0)
    version_dir = store.version_dir(made.checkpoint_id, made.version)
    (version_dir / MANIFEST_FILE).unlink()  # the crash left only the files
    acts, request = _activities(store, client), SweepInput(staging_older_than_seconds=3600)
    fresh = await ActivityEnvironment().run(acts.sweep_orphans, request)
    assert fresh.half_deleted == () and version_dir.exists()  # a writer may still be there
    _age(version_dir, seconds=7200)
    swept = await ActivityEnvironment().run(acts.sweep_orphans, request)
    assert swept.half_deleted == (f"{made.checkpoint_id}/versions/{made.version}",)
    assert not version_dir.exists()


def _age(root: Path, *, seconds: float) -> None:
    then = time.time() - seconds
    for path in [root, *root.rglob("*")]:
        os.utime(path, (then, then))


def _quarantine(
    store: CheckpointStore, checkpoint_id: str, *, nodes: tuple[str, ...], hours_ago: float = 0
) -> None:
    """Evidence of `nodes` against a version of `checkpoint_id`, their latest failure
    `hours_ago` hours ago."""
    at = datetime.now(UTC) - timedelta(hours=hours_ago)
    for node in nodes:
        Quarantine(store.root, clock=lambda: at).record(  # as recorded then
            QuarantineEvidence(
                checkpoint_id=checkpoint_id,
                version="20261124T000000Z-aaaaaa",
                node_class=NodeClass(gpu_model="H100", gpu_driver="560", criu="4.2"),
                node=node,
                reason="RestoreFailed",
                message="criu restore failed",
                since=at,
                last=at,
            )
        )


async def test_sweep_removes_old_staging_and_quarantine_of_gone_checkpoints(
    store: CheckpointStore, client: Client
) -> None:
    live = commit_version(store, model="live", created_at=T0)
    gone = commit_version(store, model="gone", created_at=T0)
    shutil.rmtree(store.version_dir(gone.checkpoint_id, gone.version))
    _quarantine(store, live.checkpoint_id, nodes=("gpu-1", "gpu-2"))
    _quarantine(store, gone.checkpoint_id, nodes=("gpu-1", "gpu-2"))
    old = store.fresh_staging(live.checkpoint_id, "old-dump")
    fresh = store.fresh_staging(live.checkpoint_id, "running-dump")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    acts = _activities(store, client)

    dry = SweepInput(staging_older_than_seconds=3600, dry_run=True)
    planned = await ActivityEnvironment().run(acts.sweep_orphans, dry)
    assert old.exists() and len(Quarantine(store.root).entries()) == 2

    request = SweepInput(staging_older_than_seconds=3600)
    swept = await ActivityEnvironment().run(acts.sweep_orphans, request)
    assert swept == planned
    assert swept.staging == (f"{live.checkpoint_id}/versions/tmp/old-dump",)
    assert len(swept.quarantine) == 2
    assert all(path.startswith(f"{gone.checkpoint_id}/quarantine/") for path in swept.quarantine)
    assert not old.exists() and fresh.exists()
    assert [e.checkpoint_id for e in Quarantine(store.root).entries()] == [live.checkpoint_id]


async def test_sweep_removes_lapsed_quarantine_evidence(
    store: CheckpointStore, client: Client
) -> None:
    live = commit_version(store, model="live", created_at=T0)
    _quarantine(store, live.checkpoint_id, nodes=("gpu-1",))
    _quarantine(store, live.checkpoint_id, nodes=("gpu-2",), hours_ago=25)
    acts = _activities(store, client)

    dry = SweepInput(staging_older_than_seconds=3600, dry_run=True)
    planned = await ActivityEnvironment().run(acts.sweep_orphans, dry)
    [lapsed] = planned.quarantine
    assert lapsed.startswith(f"{live.checkpoint_id}/quarantine/") and lapsed.endswith("/gpu-2.json")
    assert (store.root / lapsed).exists()

    request = SweepInput(staging_older_than_seconds=3600)
    swept = await ActivityEnvironment().run(acts.sweep_orphans, request)
    assert swept.quarantine == (lapsed,)
    assert not (store.root / lapsed).exists()
    [pending] = Quarantine(store.root).entries(pending=True)
    assert pending.nodes == ("gpu-1",)


@workflow.defn(name=RESTORE_WORKFLOW, sandboxed=False)
class StandInRestore:
    """Runs until cancelled, like a restore in progress."""

    @workflow.run
    async def run(self, request: dict[str, Any]) -> None:
        await workflow.wait_condition(lambda: False)


async def _protected_until(
    acts: RetentionActivities, found: Sequence[str], *, seconds: float = 15
) -> list[ProtectedRef]:
    """The protected references once all of `found` are among the referrers (visibility is
    eventually consistent)."""
    deadline = time.monotonic() + seconds
    while True:
        refs = (await ActivityEnvironment().run(acts.protected_versions, ProtectedInput())).refs
        if all(any(r.referrer == f for r in refs) for f in found) or time.monotonic() > deadline:
            return list(refs)
        await asyncio.sleep(0.2)


async def test_running_restores_and_ready_resources_are_protected(
    store: CheckpointStore, client: Client
) -> None:
    ready = ProtectedRef(checkpoint_id="cccccccccccccccc", referrer="Checkpoint ns/ready")

    async def ready_references() -> Sequence[ProtectedRef]:
        return [ready]

    acts = RetentionActivities(store=store, client=client, ready_references=ready_references)
    queue = f"restore-{uuid.uuid4().hex[:8]}"
    pinned_id, newest_id = f"restore/test/pinned/{queue}", f"restore/test/newest/{queue}"
    async with Worker(client, task_queue=queue, workflows=[StandInRestore]):
        # Started without the search attribute: its start input names the checkpoint.
        pinned = await client.start_workflow(
            RESTORE_WORKFLOW,
            {"checkpoint_id": "aaaaaaaaaaaaaaaa", "version": "20261124T000000Z-abcdef"},
            id=pinned_id,
            task_queue=queue,
        )
        newest = await client.start_workflow(
            RESTORE_WORKFLOW,
            {"checkpoint_id": "bbbbbbbbbbbbbbbb", "version": ""},
            id=newest_id,
            task_queue=queue,
            search_attributes=TypedSearchAttributes(
                [SearchAttributePair(CHECKPOINT_ID, "bbbbbbbbbbbbbbbb")]
            ),
        )
        try:
            refs = await _protected_until(acts, [pinned_id, newest_id])
        finally:
            await pinned.cancel()
            await newest.cancel()
    ours = {r.referrer: r for r in refs if r.referrer in (pinned_id, newest_id)}
    assert ours[pinned_id] == ProtectedRef(
        checkpoint_id="aaaaaaaaaaaaaaaa", version="20261124T000000Z-abcdef", referrer=pinned_id
    )
    assert ours[newest_id] == ProtectedRef(checkpoint_id="bbbbbbbbbbbbbbbb", referrer=newest_id)
    assert ready in refs
