"""Committed checkpoint-like versions for the storage backend tests."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from activities.storage.store import CheckpointStore, digest_tree
from api.identity import CheckpointIdentity
from api.manifest import CriuInfo, HostInfo, Manifest, SourceInfo

CKPT = "96429b2725761a09"
OTHER_CKPT = "0123456789abcdef"
VERSION = "20261124T000000Z-aaaaaa"
MiB = 1 << 20
LARGE = "criu/pages-1.img"


def tree_files(*, large_bytes: int = 5 * MiB + 12345) -> dict[str, bytes]:
    """Several small files, an empty one, and one large enough for two 5 MiB parts."""
    return {
        "criu/core-1.img": b"core" * 100,
        "criu/mm-1.img": os.urandom(70_000),
        "criu/empty.img": b"",
        "criu/dump.log": b"dump ok\n",
        "workload-output.log": b"serving\n",
        LARGE: os.urandom(large_bytes),
    }


def manifest_for(staging: Path, *, checkpoint_id: str = CKPT, version: str = VERSION) -> Manifest:
    return Manifest(
        checkpoint_id=checkpoint_id,
        version=version,
        identity=CheckpointIdentity(model="m", backend_framework="vllm"),
        created_at=datetime.now(UTC),
        source=SourceInfo(node="n", namespace="local", name="w"),
        criu=CriuInfo(version="4.2.1"),
        host=HostInfo(kernel="k", arch="x86_64"),
        files=digest_tree(staging),
    )


def committed_version(
    root: Path,
    files: dict[str, bytes],
    *,
    checkpoint_id: str = CKPT,
    version: str = VERSION,
) -> Path:
    """A version committed under `root` by the node-local store, as a capture leaves it.
    `files` gains what the commit adds: the page images' chunk tables (decision 0039)."""
    store = CheckpointStore(root)
    staging = store.fresh_staging(checkpoint_id, version)
    for path, data in files.items():
        (staging / path).parent.mkdir(parents=True, exist_ok=True)
        (staging / path).write_bytes(data)
    manifest = manifest_for(staging, checkpoint_id=checkpoint_id, version=version)
    final = store.commit(staging, manifest)
    for entry in manifest.files:
        files.setdefault(entry.path, (final / entry.path).read_bytes())
    return final


def final_names(version_dir: Path) -> list[str]:
    """Files under `version_dir` by relative path, temp files included."""
    if not version_dir.is_dir():
        return []
    return sorted(str(p.relative_to(version_dir)) for p in version_dir.rglob("*") if p.is_file())


def fetched(cache_root: Path) -> CheckpointStore:
    """What a node cache fetched, from the one location it fetched from: its store
    (`<cache>/<kind>-<hash>/`, `activities.storage.objectstore.cache.location_key`)."""
    [location] = [p for p in cache_root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return CheckpointStore(location)
