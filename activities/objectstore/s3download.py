"""Fetching a committed version from S3 into a local version directory, verified.

The manifest object is read first and checked (this checkpoint and version, safe relative
paths); the listing is compared with it before any file byte is fetched (missing, short,
long and unlisted objects are refused by key). Files up to one part come with one GET
each, in parallel; larger ones with ranged GETs sent ahead by a pool (all pinned to the
listed ETag, so a changed object cannot mix in) and consumed here in part order, so each
file's SHA-256 is computed incrementally as contiguous bytes arrive, never from a second
read. Bytes land in a temp file beside the final name and are renamed into place only
once size and digest match; `manifest.json` is written last, so the directory is a
committed version for `CheckpointStore.verify`, and nothing unverified carries a final name.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from activities.objectstore.parallel import FirstFailure, results, worker_pool
from activities.objectstore.placing import (
    PartialFile,
    check_listing,
    check_manifest,
    commit_manifest,
    prepare_destination,
)
from activities.objectstore.s3calls import S3Calls
from activities.objectstore.s3keys import S3Location
from activities.objectstore.transfer import (
    Meter,
    ProgressCallback,
    TransferReport,
    TransferSettings,
)
from api.errors import CheckpointNotFoundError, DigestMismatchError
from api.manifest import FileDigest, Manifest
from api.naming import MANIFEST_FILE


@dataclass(frozen=True)
class _Range:
    entry: FileDigest
    etag: str
    offset: int
    length: int

    @property
    def last(self) -> bool:
        return self.offset + self.length == self.entry.size


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
        listing = self._listing()
        sizes = {path: size for path, (size, _etag) in listing.items()}
        check_listing(manifest, sizes, name=self._uri)
        threshold = self._settings.part_size
        with (
            worker_pool(self._settings.concurrency, name="s3-files") as files,
            worker_pool(self._settings.concurrency, name="s3-parts") as parts,
        ):
            small = [
                files.submit(self._get_small, entry, listing[entry.path][1], meter)
                for entry in manifest.files
                if entry.size <= threshold
            ]
            for future in small:
                self._failure.watch(future)
            large = [(e, listing[e.path][1]) for e in manifest.files if e.size > threshold]
            self._get_large(large, parts, meter)
            results(small)
        commit_manifest(self._dest, raw, durable=self._settings.durable)
        return meter.report(manifest)

    def _listing(self) -> dict[str, tuple[int, str]]:
        """Objects under the version: relative path → (size, ETag)."""
        prefix = self._key("")
        return {
            str(item["Key"])[len(prefix) :]: (int(item["Size"]), str(item["ETag"]))
            for page in self._s3.pages("list_objects_v2", Bucket=self._bucket, Prefix=prefix)
            for item in page.get("Contents", [])
        }

    def _partial(self, entry: FileDigest) -> PartialFile:
        return PartialFile(self._dest, entry, where=self._uri(entry.path))

    def _get_small(self, entry: FileDigest, etag: str, meter: Meter) -> None:
        data = self._s3.read(Bucket=self._bucket, Key=self._key(entry.path), IfMatch=etag)
        partial = self._partial(entry)
        try:
            partial.write(data)
        except BaseException:
            partial.discard()
            raise
        partial.finish()
        meter.add(done=len(data), transferred=len(data))

    def _ranges(self, large: list[tuple[FileDigest, str]]) -> Iterator[_Range]:
        for entry, etag in large:
            part = self._settings.part_size_for(entry.size)
            for offset in range(0, entry.size, part):
                yield _Range(entry, etag, offset, min(part, entry.size - offset))

    def _get_large(
        self, large: list[tuple[FileDigest, str]], parts: ThreadPoolExecutor, meter: Meter
    ) -> None:
        """Ranged GETs run ahead in `parts`; here they are consumed in order, hashed, written."""
        ranges = self._ranges(large)
        ahead: deque[tuple[_Range, Future[bytes]]] = deque()
        partial: PartialFile | None = None
        try:
            self._fill(ahead, ranges, parts)
            while ahead:
                self._failure.check()
                piece, future = ahead.popleft()
                data = future.result()
                self._fill(ahead, ranges, parts)
                if piece.offset == 0:
                    partial = self._partial(piece.entry)
                assert partial is not None
                partial.write(data)
                meter.add(done=len(data), transferred=len(data))
                if piece.last:
                    partial.finish()
                    partial = None
        except BaseException:
            if partial is not None:
                partial.discard()
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
            Key=self._key(piece.entry.path),
            Range=f"bytes={piece.offset}-{end}",
            IfMatch=piece.etag,
        )
        if len(data) != piece.length:
            raise DigestMismatchError(
                f"{self._uri(piece.entry.path)}: bytes {piece.offset}-{end} came back "
                f"with {len(data)} bytes"
            )
        return data
