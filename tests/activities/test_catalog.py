"""The local catalog: committed versions only, newest first, found by name or checkpoint ID."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from activities.storage.catalog import LocalCatalog
from activities.storage.store import CheckpointStore, digest_tree
from api.errors import CheckpointNotFoundError
from api.identity import CheckpointIdentity, checkpoint_id
from api.manifest import CriuInfo, HostInfo, Manifest, SourceInfo

pytestmark = pytest.mark.timeout(30)

LLAMA = CheckpointIdentity(model="meta-llama/Llama-2-7b-hf", backend_framework="vllm")
QWEN = CheckpointIdentity(model="Qwen/Qwen2-7B", backend_framework="sglang")
T0 = datetime(2026, 11, 24, tzinfo=UTC)


def _commit(
    store: CheckpointStore,
    identity: CheckpointIdentity,
    name: str,
    version: str,
    created_at: datetime,
) -> Manifest:
    ckpt = checkpoint_id(identity)
    staging = store.fresh_staging(ckpt, version)
    (staging / "criu").mkdir()
    (staging / "criu" / "pages-1.img").write_bytes(version.encode())
    manifest = Manifest(
        checkpoint_id=ckpt,
        version=version,
        identity=identity,
        created_at=created_at,
        source=SourceInfo(node="n", namespace="local", name=name),
        criu=CriuInfo(version="4.2.1"),
        host=HostInfo(kernel="k", arch="x86_64"),
        files=digest_tree(staging),
    )
    store.commit(staging, manifest)
    return manifest


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    """Two checkpoints: llama with two versions, qwen with one committed between them."""
    store = CheckpointStore(tmp_path / "checkpoints")
    _commit(store, LLAMA, "llama", "20261124T000000Z-aaaaaa", T0)
    _commit(store, QWEN, "qwen", "20261124T010000Z-bbbbbb", T0 + timedelta(hours=1))
    _commit(store, LLAMA, "llama", "20261124T020000Z-cccccc", T0 + timedelta(hours=2))
    return store


def test_lists_committed_versions_newest_first(store: CheckpointStore) -> None:
    listed = LocalCatalog(store.root).checkpoints()
    assert [(e.name, e.version) for e in listed] == [
        ("llama", "20261124T020000Z-cccccc"),
        ("qwen", "20261124T010000Z-bbbbbb"),
        ("llama", "20261124T000000Z-aaaaaa"),
    ]
    assert [e.checkpoint_id for e in listed] == [
        checkpoint_id(LLAMA),
        checkpoint_id(QWEN),
        checkpoint_id(LLAMA),
    ]


def test_an_entry_lists_the_manifest_and_leads_to_it(store: CheckpointStore) -> None:
    catalog = LocalCatalog(store.root)
    entry = catalog.checkpoints()[1]
    version_dir = store.version_dir(checkpoint_id(QWEN), "20261124T010000Z-bbbbbb")
    assert (entry.name, entry.model, entry.backend, entry.node) == (
        "qwen",
        "Qwen/Qwen2-7B",
        "sglang",
        "n",
    )
    assert entry.size_bytes == len("20261124T010000Z-bbbbbb")
    assert entry.location == str(version_dir)
    manifest = catalog.manifest(entry)
    assert manifest == store.verify(version_dir, checkpoint_id=checkpoint_id(QWEN))
    assert manifest.created_at == T0 + timedelta(hours=1)
    assert entry.namespace == "local"


def test_ignores_staging_and_directories_that_are_not_checkpoint_ids(
    store: CheckpointStore,
) -> None:
    before = LocalCatalog(store.root).checkpoints()
    newest = (Path(before[0].location) / "manifest.json").read_text()
    # A dump staged with its manifest but not yet renamed into place, a version directory
    # without a manifest (not committed), directories and files that are not checkpoint IDs,
    # and a manifest that belongs to another checkpoint.
    staged = store.fresh_staging(checkpoint_id(LLAMA), "20261124T030000Z-dddddd")
    (staged / "manifest.json").write_text(newest)
    (staged.parent / "manifest.json").write_text(newest)
    (store.root / checkpoint_id(QWEN) / "versions" / "20261124T040000Z-eeeeee").mkdir()
    for stray in ("not-a-checkpoint", "96429B2725761A09", "96429b2725761a0", "tmp"):
        (store.root / stray / "versions" / "v").mkdir(parents=True)
        (store.root / stray / "versions" / "v" / "manifest.json").write_text(newest)
    (store.root / "0123456789abcdef").write_text("a file, not a checkpoint directory")
    elsewhere = store.root / checkpoint_id(QWEN) / "versions" / "20261124T050000Z-ffffff"
    elsewhere.mkdir()
    (elsewhere / "manifest.json").write_text(newest)

    assert LocalCatalog(store.root).checkpoints() == before


def test_an_empty_or_missing_root_lists_nothing(tmp_path: Path) -> None:
    assert LocalCatalog(tmp_path / "absent").checkpoints() == []
    (tmp_path / "empty").mkdir()
    assert LocalCatalog(tmp_path / "empty").checkpoints() == []


def test_a_damaged_manifest_is_skipped_not_fatal(store: CheckpointStore) -> None:
    newest = store.version_dir(checkpoint_id(LLAMA), "20261124T020000Z-cccccc")
    (newest / "manifest.json").write_text("{not json")
    listed = LocalCatalog(store.root).checkpoints()
    assert [e.version for e in listed] == ["20261124T010000Z-bbbbbb", "20261124T000000Z-aaaaaa"]


@pytest.mark.parametrize("ref", ["llama", checkpoint_id(LLAMA)])
def test_find_by_name_or_id_returns_the_newest_version(store: CheckpointStore, ref: str) -> None:
    found = LocalCatalog(store.root).find(ref)
    assert found.checkpoint_id == checkpoint_id(LLAMA)
    assert found.name == "llama"
    assert found.version == "20261124T020000Z-cccccc"


def test_find_the_other_checkpoint(store: CheckpointStore) -> None:
    catalog = LocalCatalog(store.root)
    assert catalog.find("qwen").version == "20261124T010000Z-bbbbbb"
    assert catalog.find(checkpoint_id(QWEN)).name == "qwen"


@pytest.mark.parametrize("ref", ["mistral", "ffffffffffffffff"])
def test_unknown_ref_lists_the_known_names(store: CheckpointStore, ref: str) -> None:
    with pytest.raises(CheckpointNotFoundError) as caught:
        LocalCatalog(store.root).find(ref)
    message = str(caught.value)
    assert repr(ref) in message
    assert str(store.root) in message
    assert message.endswith("(known: llama, qwen)")


def test_unknown_ref_in_an_empty_catalog_says_none_known(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match=r"\(known: none\)$"):
        LocalCatalog(tmp_path).find("llama")


def test_fractions_of_a_second_order_versions(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    _commit(store, LLAMA, "llama", "20261124T000000Z-aaaaaa", T0)
    _commit(store, LLAMA, "llama", "20261124T000000Z-bbbbbb", T0 + timedelta(milliseconds=500))
    assert LocalCatalog(tmp_path).find("llama").version == "20261124T000000Z-bbbbbb"


def test_a_name_that_looks_like_an_id_is_still_found(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    _commit(store, QWEN, "cafe0123cafe0123", "20261124T000000Z-aaaaaa", T0)
    assert LocalCatalog(tmp_path).find("cafe0123cafe0123").checkpoint_id == checkpoint_id(QWEN)
