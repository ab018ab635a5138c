"""Committed checkpoint versions on a temporary store, for the retention tests."""

from __future__ import annotations

from datetime import datetime

from activities.storage.store import CheckpointStore, digest_tree
from api.identity import CheckpointIdentity, checkpoint_id
from api.manifest import CriuInfo, HostInfo, Manifest, SourceInfo
from api.naming import checkpoint_version


def commit_version(
    store: CheckpointStore,
    *,
    model: str,
    created_at: datetime,
    namespace: str = "local",
    size: int = 16,
    suffix: str = "abcdef",
) -> Manifest:
    """A committed version of the checkpoint of `model` with one `size`-byte image file."""
    identity = CheckpointIdentity(model=model, backend_framework="vllm")
    ckpt = checkpoint_id(identity)
    version = checkpoint_version(created_at, suffix)
    staging = store.fresh_staging(ckpt, version)
    (staging / "criu").mkdir()
    (staging / "criu" / "pages-1.img").write_bytes(b"x" * size)
    manifest = Manifest(
        checkpoint_id=ckpt,
        version=version,
        identity=identity,
        created_at=created_at,
        source=SourceInfo(node="n", namespace=namespace, name=model),
        criu=CriuInfo(version="4.2.1"),
        host=HostInfo(kernel="k", arch="x86_64"),
        files=digest_tree(staging),
    )
    store.commit(staging, manifest)
    return manifest
