"""Retention activities over an S3 location on a real S3-protocol server (moto's): versions
listed from their manifests, deletion manifest first (finished on a retry after a crash),
stale multipart uploads aborted or, on a dry run, only reported."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

from activities.storage.objectstore.s3 import S3Backend, S3Location
from activities.storage.retention import (
    DeleteVersionInput,
    ListVersionsInput,
    RemoteVersions,
    RetentionActivities,
    UploadSweepInput,
)
from activities.storage.store import CheckpointStore
from api.errors import InvalidSpecError
from api.manifest import Manifest
from tests.committing import commit_version
from tests.s3server import new_bucket, s3_client

pytestmark = pytest.mark.timeout(60)
T0 = datetime(2026, 11, 24, tzinfo=UTC)
PREFIX = "fleet/checkpoints"
# moto reports every multipart upload as initiated on 2010-11-10: an upload is "fresh" only
# for a threshold reaching back further than that.
CENTURY = 100 * 365 * 86400.0


class Bucket:
    """A fresh bucket, the S3 location under it, and a node store to capture versions in."""

    def __init__(self, endpoint: str, tmp_path: Path) -> None:
        self.client = s3_client(endpoint)
        self.name = new_bucket(self.client)
        self.remote = RemoteVersions(
            S3Backend(client=self.client, location=S3Location(self.name, PREFIX))
        )
        self.node = CheckpointStore(tmp_path / "node")

    def publish(self, **kwargs: Any) -> Manifest:
        """A version committed on the node and uploaded, as a capture with S3 leaves it."""
        manifest = commit_version(self.node, **kwargs)
        version_dir = self.node.version_dir(manifest.checkpoint_id, manifest.version)
        self.remote.backend.upload_version(
            version_dir, checkpoint_id=manifest.checkpoint_id, version=manifest.version
        )
        return manifest

    def keys(self, manifest: Manifest) -> list[str]:
        prefix = f"{PREFIX}/{manifest.checkpoint_id}/versions/{manifest.version}/"
        listed = self.client.list_objects_v2(Bucket=self.name, Prefix=prefix)
        return sorted(str(item["Key"])[len(prefix) :] for item in listed.get("Contents", []))

    def start_upload(self, manifest: Manifest, path: str) -> str:
        key = f"{PREFIX}/{manifest.checkpoint_id}/versions/{manifest.version}/{path}"
        self.client.create_multipart_upload(Bucket=self.name, Key=key)
        return f"s3://{self.name}/{key}"

    def uploads(self) -> list[str]:
        listed = self.client.list_multipart_uploads(Bucket=self.name)
        return [str(u["Key"]) for u in listed.get("Uploads", [])]


@pytest.fixture
def bucket(s3_endpoint: str, tmp_path: Path) -> Bucket:
    return Bucket(s3_endpoint, tmp_path)


def _activities(bucket: Bucket, client: Client) -> RetentionActivities:
    store = CheckpointStore(bucket.node.root.parent / "control")
    return RetentionActivities(store=store, client=client, remote=bucket.remote)


def _delete_input(manifest: Manifest) -> DeleteVersionInput:
    return DeleteVersionInput(checkpoint_id=manifest.checkpoint_id, version=manifest.version)


async def test_lists_committed_versions_from_their_manifests(
    bucket: Bucket, client: Client
) -> None:
    made = bucket.publish(model="m", created_at=T0, namespace="team-a", size=1000)
    other = bucket.publish(model="n", created_at=T0 + timedelta(hours=1))
    # A version whose manifest is gone (a deletion under way) is not listed.
    bucket.client.delete_object(
        Bucket=bucket.name,
        Key=f"{PREFIX}/{other.checkpoint_id}/versions/{other.version}/manifest.json",
    )
    listed = await ActivityEnvironment().run(
        _activities(bucket, client).list_remote_versions, ListVersionsInput()
    )
    assert listed.location == f"s3://{bucket.name}/{PREFIX}/"
    [version] = listed.versions
    assert (version.checkpoint_id, version.version) == (made.checkpoint_id, made.version)
    assert (version.namespace, version.created_at) == ("team-a", T0)
    assert version.size_bytes == made.size_bytes >= 1000


async def test_delete_removes_the_manifest_first_and_a_retry_finishes(
    bucket: Bucket, client: Client
) -> None:
    made = bucket.publish(model="m", created_at=T0)
    kept = bucket.publish(model="m", created_at=T0 + timedelta(hours=1), suffix="bbbbbb")
    acts = _activities(bucket, client)

    def crash(**kwargs: Any) -> None:
        raise OSError("worker killed while removing objects")

    # The real client against the real server, failing where a crash would stop it.
    bucket.client.meta.events.register("before-call.s3.DeleteObjects", crash)
    with pytest.raises(OSError, match="worker killed"):
        await ActivityEnvironment().run(acts.delete_remote_version, _delete_input(made))
    bucket.client.meta.events.unregister("before-call.s3.DeleteObjects", crash)
    # The objects are still there, but the version no longer exists for any reader.
    assert bucket.keys(made) == ["criu/pages-1.img"]
    listed = await ActivityEnvironment().run(acts.list_remote_versions, ListVersionsInput())
    assert [v.version for v in listed.versions] == [kept.version]

    result = await ActivityEnvironment().run(acts.delete_remote_version, _delete_input(made))
    assert not result.existed and bucket.keys(made) == []
    assert bucket.keys(kept) == ["criu/pages-1.img", "manifest.json"]


async def test_stale_uploads_are_reported_on_a_dry_run_then_aborted(
    bucket: Bucket, client: Client
) -> None:
    made = bucket.publish(model="m", created_at=T0)
    uri = bucket.start_upload(made, "criu/pages-2.img")
    acts = _activities(bucket, client)

    fresh = UploadSweepInput(older_than_seconds=CENTURY)
    assert (await ActivityEnvironment().run(acts.sweep_remote_uploads, fresh)).aborted == ()
    dry = UploadSweepInput(older_than_seconds=3600, dry_run=True)
    planned = await ActivityEnvironment().run(acts.sweep_remote_uploads, dry)
    assert planned.aborted == (uri,) and len(bucket.uploads()) == 1

    swept = await ActivityEnvironment().run(
        acts.sweep_remote_uploads, UploadSweepInput(older_than_seconds=3600)
    )
    assert swept == planned and bucket.uploads() == []
    assert bucket.keys(made) == ["criu/pages-1.img", "manifest.json"]


async def test_without_a_configured_location_the_remote_steps_are_refused(
    tmp_path: Path, client: Client
) -> None:
    acts = RetentionActivities(store=CheckpointStore(tmp_path), client=client)
    with pytest.raises(InvalidSpecError, match="WARMSTART_STORAGE__S3_BUCKET"):
        await ActivityEnvironment().run(acts.list_remote_versions, ListVersionsInput())
