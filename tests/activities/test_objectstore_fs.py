"""The filesystem backend (the PVC): publish from node-local staging, fetch back,
verified copies, manifest last, damaged trees refused by name."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from activities.storage.objectstore.filesystem import FilesystemBackend
from activities.storage.objectstore.transfer import TransferProgress, TransferSettings
from activities.storage.store import CheckpointStore
from api.errors import CheckpointNotFoundError, DigestMismatchError
from tests.checkpoint_trees import (
    CKPT,
    LARGE,
    OTHER_CKPT,
    VERSION,
    MiB,
    committed_version,
    final_names,
    tree_files,
)

SETTINGS = TransferSettings(copy_buffer=1 * MiB)


@pytest.fixture
def files() -> dict[str, bytes]:
    return tree_files(large_bytes=3 * MiB + 7)


@pytest.fixture
def local(tmp_path: Path, files: dict[str, bytes]) -> Path:
    return committed_version(tmp_path / "node", files)


@pytest.fixture
def pvc(tmp_path: Path) -> FilesystemBackend:
    return FilesystemBackend(root=tmp_path / "pvc", settings=SETTINGS)


def _dest(tmp_path: Path) -> Path:
    return CheckpointStore(tmp_path / "cache").version_dir(CKPT, VERSION)


def test_publish_and_fetch_round_trip(
    pvc: FilesystemBackend, local: Path, files: dict[str, bytes], tmp_path: Path
) -> None:
    seen: list[TransferProgress] = []
    sent = pvc.upload_version(local, checkpoint_id=CKPT, version=VERSION, progress=seen.append)
    assert sent.bytes_transferred == sent.bytes_total == seen[-1].bytes_done
    published = pvc.store.version_dir(CKPT, VERSION)
    assert pvc.store.verify(published, checkpoint_id=CKPT) == sent.manifest
    assert pvc.store.staged() == []
    assert pvc.list_versions(CKPT) == [VERSION]

    dest = _dest(tmp_path)
    got = pvc.download_version(checkpoint_id=CKPT, version=VERSION, dest_dir=dest)
    assert CheckpointStore(tmp_path / "cache").verify(dest, checkpoint_id=CKPT) == got.manifest
    assert final_names(dest) == sorted([*files, "manifest.json"])
    assert all((dest / path).read_bytes() == data for path, data in files.items())
    again = pvc.upload_version(local, checkpoint_id=CKPT, version=VERSION)
    assert again.bytes_transferred == 0


def test_a_local_file_changed_after_its_commit_is_not_published(
    pvc: FilesystemBackend, local: Path
) -> None:
    with (local / LARGE).open("r+b") as pages:
        pages.seek(MiB)
        pages.write(b"X")
    with pytest.raises(DigestMismatchError, match=f"{local / LARGE} does not match its SHA-256"):
        pvc.upload_version(local, checkpoint_id=CKPT, version=VERSION)
    assert pvc.list_versions(CKPT) == []
    assert pvc.store.staged() == []


def _rewrite_manifest(version_dir: Path, change: Callable[[dict[str, object]], None]) -> None:
    path = version_dir / "manifest.json"
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _first_file_path(document: dict[str, object], value: str) -> None:
    files = document["files"]
    assert isinstance(files, list)
    files[0]["path"] = value


# case: (damage to the published version, message, the file that must not land)
DAMAGE: dict[str, tuple[Callable[[Path], None], str, str | None]] = {
    "flipped": (lambda v: _flip(v / LARGE), f"{LARGE} does not match its SHA-256", LARGE),
    "truncated": (
        lambda v: (v / LARGE).write_bytes(b"short"),
        f"{LARGE} has 5 bytes, manifest says {3 * MiB + 7}",
        LARGE,
    ),
    "missing": (lambda v: (v / "criu/core-1.img").unlink(), "criu/core-1.img is missing", None),
    "extra": (
        lambda v: (v / "criu/extra.img").write_bytes(b"x"),
        "criu/extra.img is not in the manifest",
        None,
    ),
    "another checkpoint's manifest": (
        lambda v: _rewrite_manifest(v, lambda d: d.update(checkpoint_id=OTHER_CKPT)),
        f"manifest is for checkpoint {OTHER_CKPT}, expected {CKPT}",
        None,
    ),
    "escaping path": (
        lambda v: _rewrite_manifest(v, lambda d: _first_file_path(d, "../../../etc/x")),
        "must stay inside the version",
        None,
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_published_version_is_refused_by_name(
    pvc: FilesystemBackend, local: Path, tmp_path: Path, damage: str
) -> None:
    pvc.upload_version(local, checkpoint_id=CKPT, version=VERSION)
    change, message, damaged = DAMAGE[damage]
    change(pvc.store.version_dir(CKPT, VERSION))
    dest = _dest(tmp_path)
    with pytest.raises(DigestMismatchError, match=message):
        pvc.download_version(checkpoint_id=CKPT, version=VERSION, dest_dir=dest)
    landed = final_names(dest)
    assert "manifest.json" not in landed and damaged not in landed
    assert not [name for name in landed if name.endswith(".partial")]


def test_uncommitted_and_deleted_versions_do_not_exist(
    pvc: FilesystemBackend, local: Path, tmp_path: Path
) -> None:
    pvc.upload_version(local, checkpoint_id=CKPT, version=VERSION)
    pvc.delete_version(checkpoint_id=CKPT, version=VERSION)
    assert pvc.list_versions(CKPT) == []
    assert not pvc.store.version_dir(CKPT, VERSION).exists()
    with pytest.raises(CheckpointNotFoundError, match=f"has no committed version {VERSION}"):
        pvc.download_version(checkpoint_id=CKPT, version=VERSION, dest_dir=_dest(tmp_path))
