"""Landing a version on local disk: manifest checks, and files written under temp names
that are renamed into place only once their size and SHA-256 match the manifest."""

from __future__ import annotations

import ctypes
import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath

from pydantic import ValidationError

from activities.host.files import write_atomically
from api.errors import CheckpointNotFoundError, DigestMismatchError, InvalidNameError
from api.manifest import FileDigest, Manifest
from api.naming import MANIFEST_FILE, require_path_element

PARTIAL_SUFFIX = ".partial"


def read_local_manifest(
    version_dir: Path, *, checkpoint_id: str, version: str
) -> tuple[Manifest, bytes]:
    """The committed manifest of a local version, checked, with its bytes as stored."""
    path = version_dir / MANIFEST_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise CheckpointNotFoundError(f"{path} is missing: the version is not committed") from err
    return check_manifest(raw, checkpoint_id=checkpoint_id, version=version, where=str(path)), raw


def check_manifest(raw: bytes, *, checkpoint_id: str, version: str, where: str) -> Manifest:
    """`raw` as a manifest of exactly this checkpoint and version, every file path a
    plain relative path of safe elements; raise DigestMismatchError naming `where`."""
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as err:
        problem = err.errors()[0]["msg"]
        raise DigestMismatchError(f"{where} is not a valid manifest: {problem}") from err
    if manifest.checkpoint_id != checkpoint_id:
        raise DigestMismatchError(
            f"{where}: manifest is for checkpoint {manifest.checkpoint_id}, "
            f"expected {checkpoint_id}"
        )
    if manifest.version != version:
        raise DigestMismatchError(
            f"{where}: manifest is for version {manifest.version}, expected {version}"
        )
    seen: set[str] = set()
    for entry in manifest.files:
        _check_file_path(entry.path, where=where)
        if entry.path in seen or entry.path == MANIFEST_FILE:
            raise DigestMismatchError(f"{where}: file {entry.path!r} is listed twice")
        seen.add(entry.path)
    return manifest


def _check_file_path(path: str, *, where: str) -> None:
    try:
        for part in path.split("/"):
            require_path_element(part, what="file path element")
    except InvalidNameError as err:
        raise DigestMismatchError(f"{where}: file path {path!r} is refused: {err}") from err


def check_listing(
    manifest: Manifest,
    listing: Mapping[str, int],
    *,
    name: Callable[[str], str],
    compressed: Callable[[str], str | None] | None = None,
) -> dict[str, str]:
    """Compare what the backend holds (relative name → size) with the manifest before
    fetching a byte: a missing, short or long file, or one not in the manifest, is refused.
    A file may instead be held compressed under the name `compressed(path)` gives (its size
    is then checked as it is decompressed), but not both ways at once. Returns each file's
    path → the name holding it."""
    held: dict[str, str] = {}
    for entry in manifest.files:
        packed = compressed(entry.path) if compressed is not None else None
        size = listing.get(entry.path)
        if packed is not None and packed in listing:
            if size is not None:
                raise DigestMismatchError(
                    f"{name(entry.path)} and {name(packed)} both hold {entry.path}; "
                    "refused: one of them is not the version's"
                )
            held[entry.path] = packed
            continue
        if size is None:
            raise DigestMismatchError(f"{name(entry.path)} is missing")
        if size != entry.size:
            raise DigestMismatchError(
                f"{name(entry.path)} has {size} bytes, manifest says {entry.size}"
            )
        held[entry.path] = entry.path
    extra = sorted(set(listing) - set(held.values()) - {MANIFEST_FILE})
    if extra:
        raise DigestMismatchError(f"{name(extra[0])} is not in the manifest")
    return held


def already_committed(version_dir: Path, raw_manifest: bytes) -> bool:
    """True if this very manifest is committed in `version_dir` (a retry after the commit);
    a different one there is refused."""
    existing = version_dir / MANIFEST_FILE
    if not existing.is_file():
        return False
    if existing.read_bytes() != raw_manifest:
        raise DigestMismatchError(f"{existing}: a different manifest is already committed here")
    return True


def prepare_destination(dest_dir: Path, raw_manifest: bytes) -> bool:
    """Make `dest_dir` (private) and drop temp files of an earlier attempt; True if the
    version is already committed there (see `already_committed`)."""
    if already_committed(dest_dir, raw_manifest):
        return True
    make_private_dirs(dest_dir)
    for stale in dest_dir.rglob(f".*{PARTIAL_SUFFIX}"):
        stale.unlink(missing_ok=True)
    return False


def make_private_dirs(path: Path) -> None:
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)


def commit_manifest(dest_dir: Path, raw_manifest: bytes, *, durable: bool) -> None:
    """The commit marker, last: the directory is now a committed version. With `durable`,
    every file and rename under it reaches the disk first (one syncfs of its filesystem
    costs far less than an fsync per file and directory)."""
    if durable:
        sync_filesystem(dest_dir)
    write_atomically(dest_dir / MANIFEST_FILE, raw_manifest)


def sync_filesystem(path: Path) -> None:
    """syncfs(2) of the filesystem holding `path` (sync(2) where libc lacks it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
        if syncfs is None:
            os.sync()
        elif syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


class PartialFile:
    """One file being written under a temp name, hashed as its bytes arrive (in order)."""

    def __init__(self, dest_dir: Path, entry: FileDigest, *, where: str) -> None:
        self.entry = entry
        self._where = where
        self.final = dest_dir / PurePosixPath(entry.path)
        make_private_dirs(self.final.parent)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.final.name}.", suffix=PARTIAL_SUFFIX, dir=self.final.parent
        )
        self._fd = fd
        self._tmp = Path(tmp)
        self._hash = hashlib.sha256()
        self._size = 0

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._size

    def write(self, data: bytes | memoryview) -> None:
        if self._size + len(data) > self.entry.size:  # a damaged stream must not fill the disk
            raise DigestMismatchError(
                f"{self._where} has more than the {self.entry.size} bytes the manifest says"
            )
        self._hash.update(data)
        self._size += len(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def finish(self) -> None:
        """Rename into place if size and digest match; otherwise remove it and raise."""
        try:
            if self._size != self.entry.size:
                raise DigestMismatchError(
                    f"{self._where} has {self._size} bytes, manifest says {self.entry.size}"
                )
            if self._hash.hexdigest() != self.entry.sha256:
                raise DigestMismatchError(f"{self._where} does not match its SHA-256 digest")
        except BaseException:
            self.discard()
            raise
        self._close()
        os.replace(self._tmp, self.final)

    def discard(self) -> None:
        self._close()
        self._tmp.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
