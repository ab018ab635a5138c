"""The node cache against a real S3-protocol server (moto's): one download however many
restores ask, LRU eviction that spares versions in use, and nothing unverified or
half-written ever listed (damaged objects, a full disk)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from activities.contracts import RemoteStorage
from activities.storage.objectstore.cache import LOCKS, NodeCache, location_key
from activities.storage.objectstore.filesystem import FilesystemBackend
from activities.storage.objectstore.s3 import S3Backend, S3Location
from activities.storage.objectstore.s3calls import client_config
from activities.storage.objectstore.transfer import (
    TransferProgress,
    TransferReport,
    TransferSettings,
)
from activities.storage.store import CheckpointStore
from activities.storage.verified import VerifiedFiles
from api.errors import CheckpointNotFoundError, DigestMismatchError, ForbiddenError, StorageError
from api.manifest import Manifest
from tests.checkpoint_trees import (
    CKPT,
    LARGE,
    OTHER_CKPT,
    VERSION,
    MiB,
    committed_version,
    tree_files,
)
from tests.s3server import new_bucket, s3_client

SETTINGS = TransferSettings(part_size=5 * MiB, concurrency=4, durable=False)
PREFIX = "team-a/checkpoints"
SMALL = 100_000  # bytes in each version of `_small_files`
V1, V2, V3 = (f"2026112{day}T000000Z-aaaaaa" for day in (1, 2, 3))
LOC = "s3-0123456789abcdef"  # the cache's name of the store (`location_key`)


class CountingBackend(S3Backend):
    """The real S3 backend, counting the downloads it starts."""

    downloads = 0

    def download_version(self, **kwargs: Any) -> TransferReport:
        self.downloads += 1
        return super().download_version(**kwargs)


@pytest.fixture
def client(s3_endpoint: str) -> Any:
    return s3_client(s3_endpoint, config=client_config(SETTINGS))


@pytest.fixture
def bucket(client: Any) -> str:
    return new_bucket(client)


@pytest.fixture
def backend(client: Any, bucket: str) -> CountingBackend:
    return CountingBackend(client=client, location=S3Location(bucket, PREFIX), settings=SETTINGS)


def _publish(
    backend: S3Backend, tmp_path: Path, files: dict[str, bytes], *, version: str = VERSION
) -> None:
    local = committed_version(tmp_path / "node", files, version=version)
    backend.upload_version(local, checkpoint_id=CKPT, version=version)


def _small_files() -> dict[str, bytes]:
    return {"criu/pages-1.img": os.urandom(SMALL - 8), "criu/core-1.img": b"core" * 2}


def _uri(bucket: str, version: str) -> str:
    return f"s3://{bucket}/{PREFIX}/{CKPT}/versions/{version}/"


def _cached(cache: NodeCache) -> list[str]:
    return [entry.version for entry in cache.entries()]


def _files_outside_locks(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and LOCKS not in p.parts]


async def test_a_fetched_version_verifies_without_hashing_again(
    backend: CountingBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = tree_files()
    _publish(backend, tmp_path, files)
    verified = VerifiedFiles(tmp_path / "verified")
    root = tmp_path / "cache"
    path = await NodeCache(root, verified=verified).fetch(
        backend, location=LOC, checkpoint_id=CKPT, version=VERSION
    )

    store = CheckpointStore(root / LOC, verified=verified)
    assert store.find(CKPT, VERSION) == path
    for relative, data in files.items():
        assert (path / relative).read_bytes() == data

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr("activities.storage.store.sha256_file", no_hashing)
    assert store.verify(path, checkpoint_id=CKPT).version == VERSION
    for private in (root, root / LOC / CKPT, root / LOC / CKPT / "versions", root / LOCKS):
        assert private.stat().st_mode & 0o777 == 0o700


async def test_the_empty_version_is_the_newest_and_a_cached_one_is_not_fetched_again(
    backend: CountingBackend, tmp_path: Path
) -> None:
    for version in (V1, V2):
        _publish(backend, tmp_path, _small_files(), version=version)
    cache = NodeCache(tmp_path / "cache")
    first = await cache.fetch(backend, location=LOC, checkpoint_id=CKPT)
    again = await cache.fetch(backend, location=LOC, checkpoint_id=CKPT, version=V2)
    assert first == again == CheckpointStore(tmp_path / "cache" / LOC).version_dir(CKPT, V2)
    assert backend.downloads == 1
    assert _cached(cache) == [V2]


async def test_concurrent_fetches_of_one_version_share_one_download(
    backend: CountingBackend, tmp_path: Path
) -> None:
    files = tree_files()
    _publish(backend, tmp_path, files)
    cache = NodeCache(tmp_path / "cache")
    seen: list[list[TransferProgress]] = [[] for _ in range(8)]
    paths = await asyncio.gather(
        *(
            cache.fetch(
                backend, location=LOC, checkpoint_id=CKPT, version=VERSION, progress=reports.append
            )
            for reports in seen
        )
    )
    assert backend.downloads == 1
    assert len(set(paths)) == 1
    total = sum(map(len, files.values()))
    assert all(reports[-1].bytes_done == total for reports in seen)  # each waiter heartbeats


async def test_two_caches_on_one_root_download_once(
    backend: CountingBackend, tmp_path: Path
) -> None:
    """Two processes' caches on one root: the file lock makes the second find it committed."""
    _publish(backend, tmp_path, _small_files())
    root = tmp_path / "cache"
    paths = await asyncio.gather(
        NodeCache(root).fetch(backend, location=LOC, checkpoint_id=CKPT, version=VERSION),
        NodeCache(root).fetch(backend, location=LOC, checkpoint_id=CKPT, version=VERSION),
    )
    assert backend.downloads == 1
    assert paths[0] == paths[1]


async def test_the_least_recently_used_version_not_in_use_is_evicted(
    backend: CountingBackend, bucket: str, tmp_path: Path
) -> None:
    for version in (V1, V2, V3):
        _publish(backend, tmp_path, _small_files(), version=version)
    root = tmp_path / "cache"
    cache = NodeCache(root, max_bytes=2 * SMALL + SMALL // 2)
    await cache.fetch(backend, location=LOC, checkpoint_id=CKPT, version=V1)
    await cache.fetch(backend, location=LOC, checkpoint_id=CKPT, version=V2)
    with cache.using(LOC, CKPT, V1):
        pass  # V2 is now the least recently used
    await cache.fetch(backend, location=LOC, checkpoint_id=CKPT, version=V3)
    assert _cached(cache) == [V1, V3]

    with cache.using(LOC, CKPT, V1):  # the least recently used, but in use: V3 goes instead
        await cache.fetch(backend, location=LOC, checkpoint_id=CKPT, version=V2)
        assert _cached(cache) == [V1, V2]
        with cache.using(LOC, CKPT, V2):
            message = (
                f"cache at {root} holds {2 * SMALL} bytes in use, max {2 * SMALL + SMALL // 2}: "
                f"cannot fit {_uri(bucket, V3)} \\({SMALL} bytes\\)"
            )
            with pytest.raises(StorageError, match=message):
                await cache.fetch(backend, location=LOC, checkpoint_id=CKPT, version=V3)
            assert all(entry.in_use for entry in cache.entries())
        assert not cache.evict(LOC, CKPT, V1)
    assert not any(entry.in_use for entry in cache.entries())
    assert cache.entries()[0].last_used < cache.entries()[1].last_used
    assert cache.evict(LOC, CKPT, V1)
    assert not cache.evict(LOC, CKPT, V1)
    assert _cached(cache) == [V2]
    assert backend.downloads == 4
    assert CheckpointStore(root / LOC).staged() == []


async def test_a_version_bigger_than_the_cache_is_refused_by_name(
    backend: CountingBackend, bucket: str, tmp_path: Path
) -> None:
    _publish(backend, tmp_path, _small_files())
    root = tmp_path / "cache"
    cache = NodeCache(root, max_bytes=SMALL - 1)
    message = (
        f"cache at {root} holds 0 bytes in use, max {SMALL - 1}: "
        f"cannot fit {_uri(bucket, VERSION)} \\({SMALL} bytes\\)"
    )
    with pytest.raises(StorageError, match=message):
        await cache.fetch(backend, location=LOC, checkpoint_id=CKPT, version=VERSION)
    assert backend.downloads == 0
    assert cache.entries() == []


async def test_a_damaged_object_is_named_and_nothing_is_cached(
    backend: CountingBackend, client: Any, bucket: str, tmp_path: Path
) -> None:
    _publish(backend, tmp_path, tree_files())
    key = f"{PREFIX}/{CKPT}/versions/{VERSION}/{LARGE}"
    original = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    damaged = bytearray(original)
    damaged[5 * MiB + 100] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(damaged))
    root = tmp_path / "cache"
    cache = NodeCache(root, max_bytes=64 * MiB)
    with pytest.raises(
        DigestMismatchError, match=f"s3://{bucket}/{key} does not match its SHA-256"
    ):
        await cache.fetch(backend, location=LOC, checkpoint_id=CKPT, version=VERSION)
    assert cache.entries() == []
    assert CheckpointStore(root / LOC).staged() == []
    assert _files_outside_locks(root) == []

    client.put_object(Bucket=bucket, Key=key, Body=original)  # repaired: nothing stale in the way
    await cache.fetch(backend, location=LOC, checkpoint_id=CKPT, version=VERSION)
    assert _cached(cache) == [VERSION]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs (a small disk to fill) needs root")
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount_point)]
    mounted = subprocess.run(command, capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


async def test_a_full_disk_is_named_and_leaves_nothing_half_written(
    backend: CountingBackend, bucket: str, tmp_path: Path, small_disk: Path
) -> None:
    _publish(backend, tmp_path, tree_files())  # 5 MiB: more than the disk holds
    cache = NodeCache(small_disk)
    message = f"{_uri(bucket, VERSION)}: cannot land in the node cache at {small_disk}: No space"
    with pytest.raises(StorageError, match=message):
        await cache.fetch(backend, location=LOC, checkpoint_id=CKPT, version=VERSION)
    assert cache.entries() == []
    assert CheckpointStore(small_disk / LOC).staged() == []
    assert _files_outside_locks(small_disk) == []
    assert shutil.disk_usage(small_disk).used < 64 * 1024  # the partial bytes are gone too


async def test_without_a_byte_bound_the_cache_takes_half_its_disk(
    tmp_path: Path, small_disk: Path
) -> None:
    from activities.host.layout import NodeLayout
    from workers.compose import node_cache
    from workers.settings import Settings

    # 1.2 MiB: it fits the 2 MiB disk, not half of it.
    files = {"criu/pages-1.img": os.urandom(1200 * 1024), "criu/core-1.img": b"core"}
    pvc = FilesystemBackend(root=tmp_path / "pvc", settings=SETTINGS)
    pvc.upload_version(
        committed_version(tmp_path / "node", files), checkpoint_id=CKPT, version=VERSION
    )
    settings = Settings(home=small_disk)  # WARMSTART_STORAGE__CACHE_MAX_BYTES unset
    layout = NodeLayout(small_disk)
    cache = node_cache(settings, layout, VerifiedFiles(layout.verified_cache))

    assert cache.max_bytes == shutil.disk_usage(small_disk).total // 2
    with pytest.raises(StorageError, match=f"cache at {layout.checkpoint_cache} holds 0 bytes"):
        await cache.fetch(pvc, location=LOC, checkpoint_id=CKPT, version=VERSION)
    assert cache.entries() == []
    # A byte bound, where set, is the bound.
    bounded = replace(settings, storage=replace(settings.storage, cache_max_bytes=2 << 20))
    assert node_cache(bounded, layout, VerifiedFiles(layout.verified_cache)).max_bytes == 2 << 20


async def test_a_missing_version_is_named(
    backend: CountingBackend, bucket: str, tmp_path: Path
) -> None:
    _publish(backend, tmp_path, _small_files())
    cache = NodeCache(tmp_path / "cache")
    missing = "20990101T000000Z-ffffff"
    with pytest.raises(
        CheckpointNotFoundError, match=f"{_uri(bucket, missing)}manifest.json does not exist"
    ):
        await cache.fetch(backend, location=LOC, checkpoint_id=CKPT, version=missing)
    location = f"s3://{bucket}/{PREFIX}/{OTHER_CKPT}/versions/"
    with pytest.raises(
        CheckpointNotFoundError,
        match=f"no committed version of checkpoint {OTHER_CKPT} in {location}",
    ):
        await cache.fetch(backend, location=LOC, checkpoint_id=OTHER_CKPT)
    assert backend.downloads == 0
    assert cache.entries() == []


async def test_the_cache_fills_from_the_filesystem_backend_too(tmp_path: Path) -> None:
    files = _small_files()
    pvc = FilesystemBackend(root=tmp_path / "pvc", settings=SETTINGS)
    pvc.upload_version(
        committed_version(tmp_path / "node", files), checkpoint_id=CKPT, version=VERSION
    )
    assert pvc.read_manifest(CKPT, VERSION).size_bytes == SMALL
    path = await NodeCache(tmp_path / "cache").fetch(pvc, location=LOC, checkpoint_id=CKPT)
    assert (
        CheckpointStore(tmp_path / "cache" / LOC).verify(path, checkpoint_id=CKPT).version
        == VERSION
    )
    manifest = tmp_path / "pvc" / CKPT / "versions" / V1 / "manifest.json"
    with pytest.raises(CheckpointNotFoundError, match=f"{manifest} does not exist"):
        pvc.read_manifest(CKPT, V1)


async def test_a_version_fetched_from_one_store_is_never_found_for_another(
    client: Any, backend: CountingBackend, tmp_path: Path
) -> None:
    """Two stores holding the same checkpoint ID and version (one of them another tenant's,
    say): each location's restores get that location's bytes, fetched from it."""
    mine, theirs = {"criu/core-1.img": b"mine"}, {"criu/core-1.img": b"theirs"}
    _publish(backend, tmp_path / "a", mine)
    other = CountingBackend(
        client=client, location=S3Location(new_bucket(client), PREFIX), settings=SETTINGS
    )
    _publish(other, tmp_path / "b", theirs)
    cache = NodeCache(tmp_path / "cache")
    first = await cache.fetch(backend, location=LOC, checkpoint_id=CKPT, version=VERSION)
    elsewhere = "s3-fedcba9876543210"
    second = await cache.fetch(other, location=elsewhere, checkpoint_id=CKPT, version=VERSION)
    assert (backend.downloads, other.downloads) == (1, 1)
    assert (first / "criu/core-1.img").read_bytes() == b"mine"
    assert (second / "criu/core-1.img").read_bytes() == b"theirs"
    assert sorted((e.location, e.version) for e in cache.entries()) == [
        (LOC, VERSION),
        (elsewhere, VERSION),
    ]


def test_locations_differ_by_endpoint_bucket_prefix_and_credentials() -> None:
    base = RemoteStorage(bucket="ckpts", prefix="fleet", endpoint="http://s3.local")
    key = location_key(base)
    assert key.startswith("s3-") and len(key) == 19
    assert location_key(base.model_copy(update={"prefix": "/fleet/"})) == key
    assert location_key(base.model_copy(update={"sse": "AES256", "region": "eu"})) == key
    for change in (
        {"endpoint": "http://attacker:9000"},
        {"bucket": "other"},
        {"prefix": "fleet/b"},
        {"credentials_secret": "keys", "secret_namespace": "inference"},
        {"kind": "gcs"},
    ):
        assert location_key(base.model_copy(update=change)) != key, change
    one = {"credentials_secret": "keys", "secret_namespace": "team-a"}
    two = {"credentials_secret": "keys", "secret_namespace": "team-b"}
    assert location_key(base.model_copy(update=one)) != location_key(base.model_copy(update=two))


async def test_a_refused_manifest_downloads_no_file(
    backend: CountingBackend, tmp_path: Path
) -> None:
    _publish(backend, tmp_path, _small_files())
    cache = NodeCache(tmp_path / "cache")
    seen: list[str] = []

    def refuse(manifest: Manifest) -> None:
        seen.append(manifest.source.namespace)
        raise ForbiddenError("not this namespace's")

    with pytest.raises(ForbiddenError, match="not this namespace's"):
        await cache.fetch(backend, location=LOC, checkpoint_id=CKPT, version=VERSION, accept=refuse)
    assert (seen, backend.downloads) == (["local"], 0)
    assert _files_outside_locks(tmp_path / "cache") == []


def test_versions_cached_without_their_location_are_swept(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    unkeyed = committed_version(root, _small_files())  # <root>/<id>/versions/<version>
    keyed = committed_version(root / LOC, _small_files())
    assert NodeCache(root).sweep_unkeyed() == [root / CKPT]
    assert not unkeyed.exists() and keyed.is_dir()
    assert [e.location for e in NodeCache(root).entries()] == [LOC]
