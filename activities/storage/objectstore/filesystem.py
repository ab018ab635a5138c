"""Checkpoint versions in another filesystem root (the RWX PVC): publishing a committed
version from node-local staging, and fetching one back, with large buffered copies that
hash the bytes as they are copied (the copy is the only read)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

from activities.host.files import fsync_dir
from activities.storage.catalog import LocalCatalog
from activities.storage.objectstore.parallel import results, worker_pool
from activities.storage.objectstore.placing import (
    PartialFile,
    already_committed,
    check_listing,
    check_manifest,
    commit_manifest,
    prepare_destination,
    read_local_manifest,
)
from activities.storage.objectstore.transfer import (
    Meter,
    ProgressCallback,
    TransferReport,
    TransferSettings,
)
from activities.storage.store import CheckpointStore
from api.catalog import CatalogEntry
from api.errors import CheckpointNotFoundError, DigestMismatchError
from api.manifest import FileDigest, Manifest
from api.naming import MANIFEST_FILE, is_checkpoint_id

# Copies at once: enough to overlap one file's hashing with another's I/O.
_COPIES = 4


class FilesystemBackend:
    """Versions under `root`, laid out and committed exactly as `CheckpointStore` does."""

    def __init__(self, *, root: Path, settings: TransferSettings | None = None) -> None:
        self.store = CheckpointStore(root)
        self.settings = settings or TransferSettings()
        self._buffers = threading.local()

    def upload_version(
        self,
        local_dir: Path,
        *,
        checkpoint_id: str,
        version: str,
        progress: ProgressCallback | None = None,
    ) -> TransferReport:
        """Copy into `<root>`'s staging, verify, write the manifest, rename into place."""
        manifest, raw = read_local_manifest(local_dir, checkpoint_id=checkpoint_id, version=version)
        meter = Meter(total=manifest.size_bytes, callback=progress)
        final = self.store.version_dir(checkpoint_id, version)
        if already_committed(final, raw):
            meter.add(done=manifest.size_bytes, transferred=0)
            return meter.report(manifest)
        staging = self.store.fresh_staging(checkpoint_id, version)
        try:
            self._copy_all(manifest, local_dir, staging, meter)
            commit_manifest(staging, raw, durable=self.settings.durable)
            os.rename(staging, final)
            fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return meter.report(manifest)

    def download_version(
        self,
        *,
        checkpoint_id: str,
        version: str,
        dest_dir: Path,
        progress: ProgressCallback | None = None,
    ) -> TransferReport:
        """Copy a committed version into `dest_dir` (its version directory), verified."""
        source = self.store.version_dir(checkpoint_id, version)
        manifest, raw = self._manifest(checkpoint_id, version)
        meter = Meter(total=manifest.size_bytes, callback=progress)
        if prepare_destination(dest_dir, raw):
            meter.add(done=manifest.size_bytes, transferred=0)
            return meter.report(manifest)
        check_listing(manifest, _sizes(source), name=lambda path: str(source / path))
        self._copy_all(manifest, source, dest_dir, meter)
        commit_manifest(dest_dir, raw, durable=self.settings.durable)
        return meter.report(manifest)

    def checkpoint_ids(self) -> list[str]:
        root = self.store.root
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if p.is_dir() and is_checkpoint_id(p.name))

    def list_versions(self, checkpoint_id: str) -> list[str]:
        """Committed versions (those with a manifest), oldest first."""
        return [path.name for path in self.store.versions(checkpoint_id)]

    def listed(self) -> list[CatalogEntry]:
        """Read from the manifests themselves: local files, no index needed."""
        return [
            replace(entry, location=self.uri(entry.checkpoint_id, entry.version))
            for entry in LocalCatalog(self.store.root).checkpoints()
        ]

    def index(self, manifest: Manifest) -> None:
        """Nothing to do: the committed manifest lists the version here."""

    def read_manifest(self, checkpoint_id: str, version: str) -> Manifest:
        """The committed manifest of a version, checked."""
        return self._manifest(checkpoint_id, version)[0]

    def _manifest(self, checkpoint_id: str, version: str) -> tuple[Manifest, bytes]:
        path = self.store.version_dir(checkpoint_id, version) / MANIFEST_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError as err:
            raise CheckpointNotFoundError(
                f"{path} does not exist: checkpoint {checkpoint_id} "
                f"has no committed version {version}"
            ) from err
        where = str(path)
        return check_manifest(raw, checkpoint_id=checkpoint_id, version=version, where=where), raw

    def uri(self, checkpoint_id: str = "", version: str = "") -> str:
        if not checkpoint_id:
            return f"{self.store.root}/"
        versions = self.store.checkpoint_dir(checkpoint_id) / "versions"
        return f"{self.store.version_dir(checkpoint_id, version) if version else versions}/"

    def delete_version(self, *, checkpoint_id: str, version: str) -> bool:
        """Uncommit first (the manifest goes), then remove the files."""
        final = self.store.version_dir(checkpoint_id, version)
        try:
            (final / MANIFEST_FILE).unlink()
            existed = True
        except FileNotFoundError:
            existed = False
        if final.is_dir():
            fsync_dir(final)
        shutil.rmtree(final, ignore_errors=True)
        return existed

    def sweep_incomplete(self, *, older_than_seconds: float, dry_run: bool) -> list[str]:
        """Staging directories untouched for that long (a copy that crashed)."""
        if dry_run:
            cutoff = time.time() - older_than_seconds
            stale = [p for _id, p in self.store.staged() if p.stat().st_mtime < cutoff]
        else:
            stale = self.store.sweep_staging(older_than_seconds=older_than_seconds)
        return [f"{path}/" for path in stale]

    def _copy_all(self, manifest: Manifest, source: Path, dest: Path, meter: Meter) -> None:
        biggest_first = sorted(manifest.files, key=lambda entry: -entry.size)
        with worker_pool(_COPIES, name="fs-copy") as pool:
            copies: list[Future[None]] = [
                pool.submit(self._copy, entry, source, dest, meter) for entry in biggest_first
            ]
            results(copies)

    def _buffer(self) -> bytearray:
        """This thread's copy buffer, reused: fresh memory costs a page fault per page."""
        buffer: bytearray | None = getattr(self._buffers, "buffer", None)
        if buffer is None or len(buffer) != self.settings.copy_buffer:
            buffer = self._buffers.buffer = bytearray(self.settings.copy_buffer)
        return buffer

    def _copy(self, entry: FileDigest, source: Path, dest: Path, meter: Meter) -> None:
        path = source / entry.path
        partial = PartialFile(dest, entry, where=str(path))
        buffer = self._buffer()
        try:
            with path.open("rb", buffering=0) as src:
                while count := src.readinto(buffer):
                    partial.write(memoryview(buffer)[:count])
                    meter.add(done=count, transferred=count)
        except FileNotFoundError as err:
            partial.discard()
            raise DigestMismatchError(f"{path} is missing") from err
        except BaseException:
            partial.discard()
            raise
        partial.finish()


def _sizes(version_dir: Path) -> dict[str, int]:
    """Every file under a version directory: relative path → size."""
    return {
        str(path.relative_to(version_dir)): path.stat().st_size
        for path in version_dir.rglob("*")
        if path.is_file()
    }
