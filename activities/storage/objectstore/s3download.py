"""Fetching a committed version from S3 into a local version directory, verified.

The manifest object is read first and checked (this checkpoint and version, safe relative
paths); the listing is compared with it before any file byte is fetched (missing, short,
long and unlisted objects, and files stored both plain and as `<path>.zst`, are refused by
key). Objects up to one part come with one GET each, in parallel; larger ones with ranged
GETs sent ahead by a pool (all pinned to the listed ETag, so a changed object cannot mix
in) and consumed here in part order, so each file's SHA-256 is computed incrementally as
contiguous bytes arrive, never from a second read; a `.zst` object is decompressed as its
bytes arrive, and the plain bytes are hashed. Bytes land in a temp file beside the final
name and are renamed into place only once size and digest match; `manifest.json` is written
last, so the directory is a committed version for `CheckpointStore.verify`, and nothing
unverified carries a final name.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from activities.storage.objectstore.compression import DecompressingFile
from activities.storage.objectstore.parallel import FirstFailure, results, worker_pool
from activities.storage.objectstore.placing import (
    PartialFile,
    check_listing,
    check_manifest,
    commit_manifest,
    make_private_dirs,
    prepare_destination,
)
from activities.storage.objectstore.s3calls import S3Calls
from activities.storage.objectstore.s3keys import S3Location, compressed_name
from activities.storage.objectstore.transfer import (
    Meter,
    ProgressCallback,
    TransferReport,
    TransferSettings,
)
from api.errors import CheckpointNotFoundError, DigestMismatchError
from api.manifest import FileDigest, Manifest
from api.naming import MANIFEST_FILE


@dataclass(frozen=True)
class _Object:
    """The object holding a file of the version: `name` is its path or, compressed,
    `<path>.zst`; `size` and `etag` as listed."""

    entry: FileDigest
    name: str
    size: int
    etag: str

    @property
    def compressed(self) -> bool:
        return self.name != self.entry.path


@dataclass(frozen=True)
class StoredObject:
    """A file of a version as stored: its object's key, size and ETag, and whether it is
    stored compressed."""

    entry: FileDigest
    key: str
    size: int
    etag: str
    compressed: bool


@dataclass(frozen=True)
class _Range:
    held: _Object
    offset: int
    length: int

    @property
    def last(self) -> bool:
        return self.offset + self.length == self.held.size


class _Sink(Protocol):
    @property
    def size(self) -> int:
        """The file's bytes written so far."""
        ...

    def write(self, data: bytes) -> None: ...
    def finish(self) -> None: ...
    def discard(self) -> None: ...


def read_manifest(
    s3: S3Calls, location: S3Location, *, checkpoint_id: str, version: str
) -> tuple[Manifest, bytes]:
    """The committed manifest object of a version, checked, with its bytes as stored."""
    key = location.key(checkpoint_id, version, MANIFEST_FILE)
    uri = location.uri(key)
    try:
        raw = s3.read(Bucket=location.bucket, Key=key)
    except CheckpointNotFoundError as err:
        raise CheckpointNotFoundError(
            f"{uri} does not exist: checkpoint {checkpoint_id} has no committed version {version}"
        ) from err
    return check_manifest(raw, checkpoint_id=checkpoint_id, version=version, where=uri), raw


class VersionDownload:
    def __init__(
        self,
        *,
        s3: S3Calls,
        location: S3Location,
        settings: TransferSettings,
        checkpoint_id: str,
        version: str,
        dest_dir: Path,
    ) -> None:
        self._s3 = s3
        self._location = location
        self._settings = settings
        self._checkpoint_id = checkpoint_id
        self._version = version
        self._dest = dest_dir
        self._bucket = location.bucket
        self._failure = FirstFailure()

    def _key(self, path: str) -> str:
        return self._location.key(self._checkpoint_id, self._version, path)

    def _uri(self, path: str) -> str:
        return self._location.uri(self._key(path))

    def run(self, *, progress: ProgressCallback | None) -> TransferReport:
        manifest, raw = read_manifest(
            self._s3, self._location, checkpoint_id=self._checkpoint_id, version=self._version
        )
        meter = Meter(total=manifest.size_bytes, callback=progress)
        if prepare_destination(self._dest, raw):
            meter.add(done=manifest.size_bytes, transferred=0)
            return meter.report(manifest)
        self._get(self._objects(manifest), meter)
        commit_manifest(self._dest, raw, durable=self._settings.durable)
        return meter.report(manifest)

    def run_streamed(
        self, streamed: Callable[[Manifest, list[StoredObject]], list[StoredObject]]
    ) -> tuple[Manifest, bytes, list[StoredObject]]:
        """Fetch every file but those `streamed` picks (from the version's objects), which
        a page source fetches as the restore goes (decision 0039); none fetched where it picks
        none. The directory gets no manifest: it is never a committed version (the manifest's
        bytes are returned, for `NodeCache.adopt` once the stream is complete)."""
        manifest, raw = read_manifest(
            self._s3, self._location, checkpoint_id=self._checkpoint_id, version=self._version
        )
        make_private_dirs(self._dest)
        objects = self._objects(manifest)
        stored = [
            StoredObject(held.entry, self._key(held.name), held.size, held.etag, held.compressed)
            for held in objects
        ]
        picked = {item.entry.path for item in streamed(manifest, stored)}
        if not picked:
            return manifest, raw, []  # nothing streams: nothing fetched here
        rest = [held for held in objects if held.entry.path not in picked]
        self._get(rest, Meter(total=sum(held.entry.size for held in rest), callback=None))
        return manifest, raw, [item for item in stored if item.entry.path in picked]

    def _get(self, objects: list[_Object], meter: Meter) -> None:
        threshold = self._settings.part_size
        with (
            worker_pool(self._settings.concurrency, name="s3-files") as files,
            worker_pool(self._settings.concurrency, name="s3-parts") as parts,
        ):
            small = [
                files.submit(self._get_small, held, meter)
                for held in objects
                if held.size <= threshold
            ]
            for future in small:
                self._failure.watch(future)
            self._get_large([held for held in objects if held.size > threshold], parts, meter)
            results(small)

    def _objects(self, manifest: Manifest) -> list[_Object]:
        """The object holding each file, checked against the listing (`check_listing`)."""
        prefix = self._key("")
        listing = {
            str(item["Key"])[len(prefix) :]: (int(item["Size"]), str(item["ETag"]))
            for page in self._s3.list_objects(Bucket=self._bucket, Prefix=prefix)
            for item in page.get("Contents", [])
        }
        paths = {entry.path for entry in manifest.files}
        held = check_listing(
            manifest,
            {name: size for name, (size, _etag) in listing.items()},
            name=self._uri,
            compressed=lambda path: compressed_name(path, paths),
        )
        return [
            _Object(entry, held[entry.path], *listing[held[entry.path]]) for entry in manifest.files
        ]

    def _sink(self, held: _Object) -> _Sink:
        """Where `held`'s bytes go, in order: its file's temp file, through zstd if compressed."""
        where = self._uri(held.name)
        partial = PartialFile(self._dest, held.entry, where=where)
        return DecompressingFile(partial, where=where) if held.compressed else partial

    def _get_small(self, held: _Object, meter: Meter) -> None:
        data = self._s3.read(Bucket=self._bucket, Key=self._key(held.name), IfMatch=held.etag)
        sink = self._sink(held)
        try:
            sink.write(data)
            sink.finish()
        except BaseException:
            sink.discard()
            raise
        meter.add(done=held.entry.size, transferred=len(data))

    def _ranges(self, large: list[_Object]) -> Iterator[_Range]:
        for held in large:
            part = self._settings.part_size_for(held.size)
            for offset in range(0, held.size, part):
                yield _Range(held, offset, min(part, held.size - offset))

    def _get_large(self, large: list[_Object], parts: ThreadPoolExecutor, meter: Meter) -> None:
        """Ranged GETs run ahead in `parts`; here they are consumed in order, hashed, written."""
        ranges = self._ranges(large)
        ahead: deque[tuple[_Range, Future[bytes]]] = deque()
        sink: _Sink | None = None
        try:
            self._fill(ahead, ranges, parts)
            while ahead:
                self._failure.check()
                piece, future = ahead.popleft()
                data = future.result()
                self._fill(ahead, ranges, parts)
                if piece.offset == 0:
                    sink = self._sink(piece.held)
                assert sink is not None
                written = sink.size
                sink.write(data)
                meter.add(done=sink.size - written, transferred=len(data))
                if piece.last:
                    sink.finish()
                    sink = None
        except BaseException:
            if sink is not None:
                sink.discard()
            for _piece, future in ahead:
                future.cancel()
            raise

    def _fill(
        self,
        ahead: deque[tuple[_Range, Future[bytes]]],
        ranges: Iterator[_Range],
        parts: ThreadPoolExecutor,
    ) -> None:
        while len(ahead) < self._settings.concurrency + 2:
            piece = next(ranges, None)
            if piece is None:
                return
            ahead.append((piece, parts.submit(self._get_range, piece)))

    def _get_range(self, piece: _Range) -> bytes:
        end = piece.offset + piece.length - 1
        data = self._s3.read(
            Bucket=self._bucket,
            Key=self._key(piece.held.name),
            Range=f"bytes={piece.offset}-{end}",
            IfMatch=piece.held.etag,
        )
        if len(data) != piece.length:
            raise DigestMismatchError(
                f"{self._uri(piece.held.name)}: bytes {piece.offset}-{end} came back "
                f"with {len(data)} bytes"
            )
        return data
