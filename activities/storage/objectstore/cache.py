"""The node cache of remote checkpoint versions: a bounded, least-recently-used directory
that restores read from, with one download per version however many restores of it arrive.

Versions are keyed by the location they were fetched from as well as by checkpoint ID and
version (`location_key`: kind, endpoint, bucket, prefix and whose credentials): a version
fetched from one store is never what a restore from another store finds, whatever IDs and
version names the two hold. Under each location's directory they are laid out and committed
as `CheckpointStore` does (`<root>/<location>/<checkpointID>/versions/<version>/`, manifest
last, staged under `versions/tmp/<version>` and renamed into place), so
`CheckpointStore(root / location).find/verify` read the cache. Beside them, per version,
`<root>/.locks/<location>-<checkpointID>-<version>`:

- `.fetch`: held exclusively (flock) by whoever downloads or evicts the version, so across
  processes the second fetcher waits and then finds it committed;
- `.use`: held shared by every restore reading the version (`using`); eviction takes it
  exclusively without waiting and skips versions it cannot lock. Its mtime is the
  version's LRU stamp.

The bound is `max_bytes`; a node worker whose settings name none bounds it to a share of
the filesystem that holds it (`share_of_disk`), so a node's cache cannot fill its disk.

Lock files are never removed: one unlinked while another process holds it open would let
two processes each hold "the" lock, on different inodes. The byte bound counts committed
versions and this process's downloads in flight; a download in flight in another process
is not counted (a node runs one node worker).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from activities import metrics
from activities.contracts import RemoteStorage
from activities.host.files import fsync_dir, write_atomically
from activities.storage.catalog import load_manifest
from activities.storage.objectstore import Backend
from activities.storage.objectstore.placing import make_private_dirs
from activities.storage.objectstore.transfer import ProgressCallback, TransferProgress
from activities.storage.store import CheckpointStore
from activities.storage.verified import VerifiedFiles
from api.errors import CheckpointNotFoundError, StorageError
from api.manifest import Manifest
from api.naming import MANIFEST_FILE, require_path_element

LOCKS = ".locks"
_FETCH = "fetch"
_USE = "use"
# A full disk or quota under the cache: retrying on this node cannot help.
_FULL = {errno.ENOSPC, errno.EDQUOT}
Key = tuple[str, str, str]  # (location, checkpoint ID, version)
Accept = Callable[[Manifest], None]


def location_key(storage: RemoteStorage) -> str:
    """The cache's name for the store `storage` names (its endpoint as the worker reaches
    it, with the worker's own filled in): `<kind>-<16 hex>` over kind, endpoint, bucket,
    prefix and the credentials Secret (with its namespace). Two locations differing in any
    of them never share a cached version."""
    where = [
        storage.kind,
        storage.endpoint,
        storage.bucket,
        storage.prefix.strip("/"),
        storage.secret_namespace,
        storage.credentials_secret,
    ]
    digest = hashlib.sha256(json.dumps(where).encode()).hexdigest()[:16]
    return f"{storage.kind}-{digest}"


def share_of_disk(path: Path, share: float) -> int:
    """`share` of the size of the filesystem holding `path` (or, while it does not exist
    yet, its nearest existing parent), in bytes."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    disk = os.statvfs(probe)
    return int(disk.f_blocks * disk.f_frsize * share)


@dataclass(frozen=True)
class CachedVersion:
    location: str
    checkpoint_id: str
    version: str
    size_bytes: int
    last_used: datetime
    in_use: bool


class _Flight:
    """One download and everyone waiting for it: each waiter's progress callback gets every
    report, so each waiting restore keeps heartbeating its own activity."""

    def __init__(self, start: Callable[[ProgressCallback], Awaitable[Path]]) -> None:
        self.listeners: list[ProgressCallback] = []
        self.task = asyncio.ensure_future(start(self.report))

    def report(self, progress: TransferProgress) -> None:
        for listener in list(self.listeners):
            listener(progress)


class NodeCache:
    """The cache under `root`, holding at most `max_bytes` of versions (None: no bound);
    downloads are recorded in `verified`, the record the restore's verify consults."""

    def __init__(
        self, root: Path, *, max_bytes: int | None = None, verified: VerifiedFiles | None = None
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._verified = verified
        self._flights: dict[Key, _Flight] = {}
        self._space = threading.Lock()  # eviction and reservations of this process's downloads
        self._reserved: dict[Key, int] = {}

    def store(self, location: str) -> CheckpointStore:
        """The versions fetched from `location` (a `location_key`), in the store's layout."""
        return CheckpointStore(self.root / require_path_element(location, what="location"))

    def version_dir(self, location: str, checkpoint_id: str, version: str) -> Path:
        return self.store(location).version_dir(checkpoint_id, version)

    async def fetch(
        self,
        backend: Backend,
        *,
        location: str,
        checkpoint_id: str,
        version: str = "",
        progress: ProgressCallback | None = None,
        accept: Accept | None = None,
    ) -> Path:
        """The committed version directory in the cache, downloaded from `backend` (the
        store `location` names) first unless already there; "" is the backend's newest
        version. Hold `using` around the fetch and the restore, so no eviction can come
        between them. `accept` sees the manifest before any file is downloaded and raises to
        refuse the version (the first fetcher's, when several wait for one download). A
        version that cannot fit, or a full disk, is StorageError naming the version and the
        cache."""
        if not version:
            version = await asyncio.to_thread(_newest, backend, checkpoint_id)
        key = (location, checkpoint_id, version)
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight(
                lambda report: asyncio.to_thread(self._fetch, backend, key, report, accept)
            )
            flight.task.add_done_callback(lambda task: self._landed(key, task))
        if progress is not None:
            flight.listeners.append(progress)
        try:
            # One waiter cancelled (its activity was) must not fail the others' download.
            return await asyncio.shield(flight.task)
        finally:
            if progress is not None:
                flight.listeners.remove(progress)

    def _landed(self, key: Key, task: asyncio.Future[Path]) -> None:
        del self._flights[key]
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have been cancelled

    @contextmanager
    def using(self, location: str, checkpoint_id: str, version: str) -> Iterator[None]:
        """Hold a version in use while a restore reads it (eviction skips it), whether or
        not it is cached yet. The shared lock waits only while an eviction of this very
        version removes its manifest."""
        with self._flock((location, checkpoint_id, version), _USE, fcntl.LOCK_SH) as fd:
            _touch(fd)
            yield

    def entries(self) -> list[CachedVersion]:
        """Committed versions in the cache, by location, checkpoint ID and version."""
        found = []
        for manifest_path in sorted(self.root.glob(f"*/*/versions/*/{MANIFEST_FILE}")):
            version_dir = manifest_path.parent
            key = (version_dir.parents[2].name, version_dir.parents[1].name, version_dir.name)
            try:
                size = load_manifest(version_dir).size_bytes
                used = self._last_used(key, manifest_path)
            except (CheckpointNotFoundError, FileNotFoundError):
                continue  # evicted while we looked
            found.append(CachedVersion(*key, size, used, self._in_use(key)))
        return found

    def sweep_unkeyed(self) -> list[Path]:
        """Remove versions an older node worker cached without their location
        (`<root>/<checkpointID>/versions/`): nothing finds them any more."""
        removed = []
        for versions in sorted(self.root.glob("*/versions")):
            shutil.rmtree(versions.parent, ignore_errors=True)
            removed.append(versions.parent)
        return removed

    def evict(self, location: str, checkpoint_id: str, version: str) -> bool:
        """Remove a cached version (its manifest first, so it is never found half-removed);
        False if it is in use, being fetched, or not cached."""
        key = (location, checkpoint_id, version)
        final = self.version_dir(*key)
        try:
            with self._flock(key, _FETCH, fcntl.LOCK_EX | fcntl.LOCK_NB):
                with self._flock(key, _USE, fcntl.LOCK_EX | fcntl.LOCK_NB):
                    if not (final / MANIFEST_FILE).is_file():
                        return False
                    (final / MANIFEST_FILE).unlink()
                    fsync_dir(final)
                # Restores may pin it again now; a fetch of it waits for the removal.
                shutil.rmtree(final, ignore_errors=True)
        except BlockingIOError:
            return False
        return True

    def adopt(
        self, location: str, manifest: Manifest, raw_manifest: bytes, *, complete_dir: Path
    ) -> bool:
        """Take `complete_dir`, every file of `manifest` in it and verified as it arrived (a
        streamed restore's copy, decision 0039), as the cached version, its manifest written
        last. False, leaving it where it is, while a fetch of the version runs or once the
        cache has it, where it does not fit, or is on another filesystem."""
        key = (location, manifest.checkpoint_id, manifest.version)
        final = self.version_dir(*key)
        where = f"version {manifest.version} of checkpoint {manifest.checkpoint_id}"
        try:
            with self._flock(key, _FETCH, fcntl.LOCK_EX | fcntl.LOCK_NB):
                if (final / MANIFEST_FILE).is_file():
                    return False
                with self._room(key, manifest.size_bytes, where=where):
                    write_atomically(complete_dir / MANIFEST_FILE, raw_manifest)
                    shutil.rmtree(final, ignore_errors=True)  # an interrupted eviction's
                    make_private_dirs(final.parent)
                    os.rename(complete_dir, final)
                    fsync_dir(final.parent)
                with self._flock(key, _USE, fcntl.LOCK_SH) as fd:
                    _touch(fd)
        except (BlockingIOError, StorageError):
            return False
        except OSError as err:
            if err.errno != errno.EXDEV:
                raise
            (complete_dir / MANIFEST_FILE).unlink(missing_ok=True)
            return False
        if self._verified is not None:
            digests = {f.path: f.sha256 for f in manifest.files}
            self._verified.remember(manifest.checkpoint_id, manifest.version, final, digests)
        return True

    def _fetch(
        self, backend: Backend, key: Key, progress: ProgressCallback, accept: Accept | None
    ) -> Path:
        final = self.version_dir(*key)
        with self._flock(key, _FETCH, fcntl.LOCK_EX):
            if not (final / MANIFEST_FILE).is_file():
                self._download(backend, key, progress, accept)
            # Stamped before the fetch lock goes: a version just fetched is never the LRU one.
            with self._flock(key, _USE, fcntl.LOCK_SH) as fd:
                _touch(fd)
        return final

    def _download(
        self, backend: Backend, key: Key, progress: ProgressCallback, accept: Accept | None
    ) -> None:
        """Into staging, renamed into place once complete; on any failure the staging goes."""
        location, checkpoint_id, version = key
        store = self.store(location)
        where = backend.uri(checkpoint_id, version)
        manifest = backend.read_manifest(checkpoint_id, version)
        if accept is not None:
            accept(manifest)  # refused before a byte of its files moves
        final = store.version_dir(checkpoint_id, version)
        staging = store.staging_dir(checkpoint_id, version)
        with self._room(key, manifest.size_bytes, where=where):
            try:
                store.fresh_staging(checkpoint_id, version)
                report = backend.download_version(
                    checkpoint_id=checkpoint_id,
                    version=version,
                    dest_dir=staging,
                    progress=progress,
                )
                metrics.transferred("download", report.bytes_transferred, report.seconds)
                shutil.rmtree(final, ignore_errors=True)  # what an interrupted eviction left
                os.rename(staging, final)
                fsync_dir(final.parent)
            except BaseException as err:
                shutil.rmtree(staging, ignore_errors=True)
                if isinstance(err, OSError) and err.errno in _FULL:
                    raise StorageError(
                        f"{where}: cannot land in the node cache at {self.root}: {err.strerror}"
                    ) from err
                raise
        if self._verified is not None:
            # Every byte was hashed as it arrived: the restore's verify need not read them again.
            digests = {f.path: f.sha256 for f in report.manifest.files}
            self._verified.remember(checkpoint_id, version, final, digests)

    @contextmanager
    def _room(self, key: Key, size: int, *, where: str) -> Iterator[None]:
        """Reserve `size` bytes for a download while it runs, evicting least-recently-used
        versions not in use to make them fit."""
        if self.max_bytes is None:
            yield
            return
        with self._space:
            self._make_room(size, self.max_bytes, where=where)
            self._reserved[key] = size
        try:
            yield
        finally:
            with self._space:
                del self._reserved[key]

    def _make_room(self, size: int, max_bytes: int, *, where: str) -> None:
        cached = sorted(self.entries(), key=lambda entry: entry.last_used)
        evictable = [entry for entry in cached if not entry.in_use]
        held = sum(self._reserved.values()) + sum(entry.size_bytes for entry in cached)
        in_use = held - sum(entry.size_bytes for entry in evictable)
        if in_use + size > max_bytes:  # checked first: never evict for nothing
            raise self._cannot_fit(in_use, size, max_bytes, where=where)
        for entry in evictable:
            if held + size <= max_bytes:
                return
            if self.evict(entry.location, entry.checkpoint_id, entry.version):
                held -= entry.size_bytes
        if held + size > max_bytes:  # some came into use meanwhile
            raise self._cannot_fit(held, size, max_bytes, where=where)

    def _cannot_fit(self, held: int, size: int, max_bytes: int, *, where: str) -> StorageError:
        return StorageError(
            f"cache at {self.root} holds {held} bytes in use, max {max_bytes}: "
            f"cannot fit {where} ({size} bytes)"
        )

    def _in_use(self, key: Key) -> bool:
        if not self._lock_file(key, _USE).exists():
            return False  # never used; not created here, its mtime would read as a use
        try:
            with self._flock(key, _USE, fcntl.LOCK_EX | fcntl.LOCK_NB):
                return False
        except BlockingIOError:
            return True

    def _last_used(self, key: Key, manifest_path: Path) -> datetime:
        """The `.use` file's mtime; the commit's for a version no one has touched yet."""
        try:
            stamp = self._lock_file(key, _USE).stat().st_mtime_ns
        except FileNotFoundError:
            stamp = manifest_path.stat().st_mtime_ns
        return datetime.fromtimestamp(stamp / 1e9, UTC)

    def _lock_file(self, key: Key, kind: str) -> Path:
        location, checkpoint_id, version = key
        require_path_element(location, what="location")
        require_path_element(checkpoint_id, what="checkpoint ID")
        require_path_element(version, what="version")
        return self.root / LOCKS / f"{location}-{checkpoint_id}-{version}.{kind}"

    @contextmanager
    def _flock(self, key: Key, kind: str, operation: int) -> Iterator[int]:
        """Hold flock `operation` on a lock file (created private); a LOCK_NB that cannot be
        had raises BlockingIOError."""
        path = self._lock_file(key, kind)
        make_private_dirs(path.parent)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, operation)
            yield fd
        finally:
            os.close(fd)  # releases the lock


def _touch(fd: int) -> None:
    """Stamp now, to the nanosecond: the kernel's own stamps are a clock tick coarse, and
    two uses within one tick would tie."""
    now = time.time_ns()
    os.utime(fd, ns=(now, now))


def _newest(backend: Backend, checkpoint_id: str) -> str:
    versions = backend.list_versions(checkpoint_id)
    if not versions:
        raise CheckpointNotFoundError(
            f"no committed version of checkpoint {checkpoint_id} in {backend.uri(checkpoint_id)}"
        )
    return versions[-1]
