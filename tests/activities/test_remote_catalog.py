"""The remote store's catalog on a real S3-protocol server (moto's): listing reads the index
only (one ListObjectsV2 request, no manifest), describing reads one manifest; a version
committed before there was an index is listed once retention has indexed it; a listing too
long for an object key is read from its manifest."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from activities.storage.objectstore.s3 import S3Backend, S3Location
from activities.storage.remote_catalog import RemoteCatalog
from activities.storage.retention import RemoteVersions
from activities.storage.store import CheckpointStore
from api.manifest import Manifest
from tests.committing import commit_version
from tests.s3server import new_bucket, s3_client

pytestmark = pytest.mark.timeout(60)
T0 = datetime(2026, 11, 24, tzinfo=UTC)
PREFIX = "fleet/checkpoints"


class Sent:
    """The S3 operations our own client sends, by name (a boto3 event hook)."""

    def __init__(self, client: Any) -> None:
        self.counts: Counter[str] = Counter()
        client.meta.events.register("before-call.s3", self._count)

    def _count(self, model: Any, **_: Any) -> None:
        self.counts[model.name] += 1

    def take(self) -> dict[str, int]:
        counts, self.counts = dict(self.counts), Counter()
        return counts


class Store:
    def __init__(self, endpoint: str, tmp_path: Path) -> None:
        self.client = s3_client(endpoint)
        self.bucket = new_bucket(self.client)
        self.backend = S3Backend(client=self.client, location=S3Location(self.bucket, PREFIX))
        self.node = CheckpointStore(tmp_path / "node")
        self.sent = Sent(self.client)

    def publish(self, **kwargs: Any) -> Manifest:
        manifest = commit_version(self.node, **kwargs)
        self.backend.upload_version(
            self.node.version_dir(manifest.checkpoint_id, manifest.version),
            checkpoint_id=manifest.checkpoint_id,
            version=manifest.version,
        )
        return manifest

    def index_keys(self) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"{PREFIX}/index/")
        return [str(item["Key"]) for item in listed.get("Contents", [])]


@pytest.fixture
def store(s3_endpoint: str, tmp_path: Path) -> Store:
    return Store(s3_endpoint, tmp_path)


def test_listing_reads_the_index_alone_and_describing_reads_one_manifest(store: Store) -> None:
    old = store.publish(model="llama", created_at=T0, size=10)
    other = store.publish(model="qwen", created_at=T0 + timedelta(hours=1), namespace="team")
    new = store.publish(model="llama", created_at=T0 + timedelta(hours=2), suffix="bbbbbb")
    store.sent.take()

    catalog = RemoteCatalog(store.backend)
    listed = catalog.checkpoints()
    assert store.sent.take() == {"ListObjectsV2": 1}
    assert [(e.name, e.checkpoint_id, e.version) for e in listed] == [
        (m.source.name, m.checkpoint_id, m.version) for m in (new, other, old)
    ]
    qwen = listed[1]
    assert (qwen.model, qwen.backend, qwen.size_bytes, qwen.node, qwen.namespace) == (
        "qwen",
        "vllm",
        16,
        "n",
        "team",
    )
    assert qwen.created_at == other.created_at
    assert (
        qwen.location
        == f"s3://{store.bucket}/{PREFIX}/{other.checkpoint_id}/versions/{other.version}/"
    )

    found = catalog.find("llama")
    assert (found.version, store.sent.take()) == (new.version, {"ListObjectsV2": 1})
    assert catalog.manifest(found) == new
    assert store.sent.take() == {"GetObject": 1}


def test_a_version_committed_before_the_index_is_listed_once_retention_indexed_it(
    store: Store,
) -> None:
    made = store.publish(model="llama", created_at=T0)
    [indexed] = store.index_keys()
    store.client.delete_object(Bucket=store.bucket, Key=indexed)  # as an older upload left it
    catalog = RemoteCatalog(store.backend)
    assert catalog.checkpoints() == []

    [version] = RemoteVersions(store.backend).versions()  # reads its manifest, indexes it
    assert (version.checkpoint_id, version.version) == (made.checkpoint_id, made.version)
    assert store.index_keys() == [indexed]
    store.sent.take()
    assert [e.version for e in catalog.checkpoints()] == [made.version]
    assert "GetObject" not in store.sent.take()


def test_an_upload_retried_after_its_manifest_lists_the_version(store: Store) -> None:
    made = store.publish(model="llama", created_at=T0)
    store.client.delete_object(Bucket=store.bucket, Key=store.index_keys()[0])
    report = store.backend.upload_version(
        store.node.version_dir(made.checkpoint_id, made.version),
        checkpoint_id=made.checkpoint_id,
        version=made.version,
    )
    assert report.bytes_transferred == 0  # committed already: only listed again
    assert [e.version for e in RemoteCatalog(store.backend).checkpoints()] == [made.version]


def test_a_listing_too_long_for_a_key_is_read_from_its_manifest(store: Store) -> None:
    made = store.publish(model="m" * 900, created_at=T0)
    assert [k.rsplit("/", 1)[1] for k in store.index_keys()] == ["manifest"]
    store.sent.take()
    [entry] = RemoteCatalog(store.backend).checkpoints()
    assert (entry.model, entry.version) == (made.identity.model, made.version)
    assert store.sent.take() == {"ListObjectsV2": 1, "GetObject": 1}


def test_deleting_a_version_unlists_it(store: Store) -> None:
    made = store.publish(model="llama", created_at=T0)
    kept = store.publish(model="qwen", created_at=T0)
    assert store.backend.delete_version(checkpoint_id=made.checkpoint_id, version=made.version)
    assert [e.name for e in RemoteCatalog(store.backend).checkpoints()] == [kept.source.name]
    assert len(store.index_keys()) == 1
