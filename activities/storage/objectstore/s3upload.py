"""Publishing a committed local version to S3: parallel multipart upload, SHA-256 taken
from the same read that feeds the upload, zstd where it pays, resumable, manifest last.

Each file is read once, sequentially; its SHA-256 is updated as each part is read and
must equal the manifest's before the object is completed (a mismatch aborts the upload and
names the file), so no object ever holds bytes other than those the manifest describes.
Files up to one part go up with one PUT each, in parallel; larger files as multipart
uploads whose parts are sent by a pool while the reader moves on.

Resuming: a retry lists what the killed attempt left. Objects already complete (same size,
and the `sha256` metadata that was set only on objects whose bytes matched) are skipped
without reading them. For an unfinished multipart upload of a file, every part is still
read and hashed (the SHA-256 must cover every byte, and S3 cannot hand back a part's
SHA-256 unless it was uploaded with one), but a part whose size and ETag (the MD5 of its
bytes, for unencrypted and SSE-S3 objects) match what is stored is not sent again. Under
SSE-KMS ETags are not MD5s, so such parts are sent again.

Compression (`settings.compression == "auto"`, see `compression`): a file worth it goes to
`<path>.zst`, compressed as it is read; its digest and `sha256` metadata stay those of the
plain bytes. Its frame goes up with one PUT if it fits one part, else as a multipart upload
of fixed-size compressed parts, made the same on a retry, so resumed like any other. A
retry counts a file done if either object of it is complete, and removes the other.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from activities.storage.chunks import table_path
from activities.storage.objectstore.compression import (
    MIN_FILE_SIZE,
    SAMPLE_SIZE,
    FileReading,
    Part,
    compress_whole,
    compressed_bound,
    worth_compressing,
)
from activities.storage.objectstore.parallel import FirstFailure, results, worker_pool
from activities.storage.objectstore.placing import read_local_manifest
from activities.storage.objectstore.s3calls import S3Calls
from activities.storage.objectstore.s3keys import S3Location, compressed_name
from activities.storage.objectstore.transfer import (
    Meter,
    ProgressCallback,
    TransferReport,
    TransferSettings,
)
from api.errors import DigestMismatchError
from api.manifest import FileDigest, Manifest
from api.naming import MANIFEST_FILE

if TYPE_CHECKING:
    from mypy_boto3_s3.literals import ServerSideEncryptionType
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef


class Encryption(TypedDict, total=False):
    """The server-side encryption arguments of an object's PUT or multipart upload."""

    ServerSideEncryption: ServerSideEncryptionType
    SSEKMSKeyId: str


def sse_args(settings: TransferSettings) -> Encryption:
    """The server-side encryption arguments of every object written with `settings`."""
    args = Encryption()
    if settings.sse:
        args["ServerSideEncryption"] = settings.sse
    if settings.kms_key_id:
        args["SSEKMSKeyId"] = settings.kms_key_id
    return args


@dataclass(frozen=True)
class _Stored:
    size: int
    etag: str


@dataclass
class _Multipart:
    key: str
    upload_id: str
    stored_parts: dict[int, _Stored]
    etags: dict[int, str]
    sending: list[Future[None]]


class VersionUpload:
    def __init__(
        self,
        *,
        s3: S3Calls,
        location: S3Location,
        settings: TransferSettings,
        local_dir: Path,
        checkpoint_id: str,
        version: str,
    ) -> None:
        self._s3 = s3
        self._location = location
        self._settings = settings
        self._dir = local_dir
        self._checkpoint_id = checkpoint_id
        self._version = version
        self._bucket = location.bucket
        self._paths: frozenset[str] = frozenset()
        # Parts read and not yet sent: the pool's, plus two so the reader keeps ahead.
        self._buffers = threading.BoundedSemaphore(settings.concurrency + 2)
        self._failure = FirstFailure()

    def _key(self, path: str) -> str:
        return self._location.key(self._checkpoint_id, self._version, path)

    def _compressed_key(self, entry: FileDigest) -> str | None:
        name = compressed_name(entry.path, self._paths)
        return None if name is None else self._key(name)

    def _compressing(self, entry: FileDigest) -> str | None:
        """The key to compress `entry` to, if the settings and its size allow it."""
        if self._settings.compression == "off" or entry.size < MIN_FILE_SIZE:
            return None
        if self._settings.streamable and table_path(entry.path) in self._paths:
            return None  # a page image restores stream by range (decision 0039)
        return self._compressed_key(entry)

    def run(self, *, progress: ProgressCallback | None) -> TransferReport:
        manifest, raw = read_local_manifest(
            self._dir, checkpoint_id=self._checkpoint_id, version=self._version
        )
        self._paths = frozenset(entry.path for entry in manifest.files)
        meter = Meter(total=manifest.size_bytes, callback=progress)
        if self._already_committed(raw):
            meter.add(done=manifest.size_bytes, transferred=0)
            return meter.report(manifest)
        stored = self._stored_sizes()
        threshold = self._settings.part_size
        with (
            worker_pool(self._settings.concurrency, name="s3-files") as files,
            worker_pool(self._settings.concurrency, name="s3-parts") as parts,
        ):
            pending = [
                files.submit(self._put_small, entry, meter, stored)
                for entry in manifest.files
                if entry.size <= threshold
            ]
            for future in pending:
                self._failure.watch(future)
            for entry in manifest.files:
                if entry.size > threshold:
                    pending.append(self._put_large(entry, meter, stored, parts, files))
            results(pending)
        self._put_manifest(raw, manifest)
        return meter.report(manifest)

    def _already_committed(self, raw: bytes) -> bool:
        key = self._key(MANIFEST_FILE)
        existing = self._s3.read_if_present(Bucket=self._bucket, Key=key)
        if existing is None:
            return False
        if existing != raw:
            raise DigestMismatchError(
                f"{self._location.uri(key)}: a different manifest is already committed"
            )
        return True

    def _stored_sizes(self) -> dict[str, int]:
        """Objects already under the version (from a killed attempt): key → size."""
        prefix = self._key("")
        return {
            str(item["Key"]): int(item["Size"])
            for page in self._s3.list_objects(Bucket=self._bucket, Prefix=prefix)
            for item in page.get("Contents", [])
        }

    def _skip_complete(self, entry: FileDigest, meter: Meter, stored: dict[str, int]) -> bool:
        """True if an object of `entry` is already complete (plain: same size; either:
        `sha256` metadata that was set only on objects whose bytes matched)."""
        plain, packed = self._key(entry.path), self._compressed_key(entry)
        for key in (plain, packed):
            if key is None or key not in stored or (key == plain and stored[key] != entry.size):
                continue
            head = self._s3.call(self._s3.client.head_object, Bucket=self._bucket, Key=key)
            if head.get("Metadata", {}).get("sha256") == entry.sha256:
                self._drop_other(entry, key, stored)
                meter.add(done=entry.size, transferred=0)
                return True
        return False

    def _drop_other(self, entry: FileDigest, key: str, stored: dict[str, int]) -> None:
        """Remove the other object of `entry` than `key` (left by an attempt with other
        settings, or damaged): downloads refuse a file stored both ways."""
        for other in (self._key(entry.path), self._compressed_key(entry)):
            if other is not None and other != key and other in stored:
                self._s3.call(self._s3.client.delete_object, Bucket=self._bucket, Key=other)

    def _put_small(self, entry: FileDigest, meter: Meter, stored: dict[str, int]) -> None:
        if self._skip_complete(entry, meter, stored):
            return
        data = (self._dir / entry.path).read_bytes()
        key = self._key(entry.path)
        self._check_digest(entry, key, len(data), hashlib.sha256(data).hexdigest())
        packed = self._compressing(entry)
        if packed is not None and worth_compressing(memoryview(data)[:SAMPLE_SIZE]):
            key, data = packed, compress_whole(data)
        self._put_object(entry, key, data, stored)
        meter.add(done=entry.size, transferred=len(data))

    def _put_object(self, entry: FileDigest, key: str, data: bytes, stored: dict[str, int]) -> None:
        self._drop_other(entry, key, stored)
        self._s3.call(
            self._s3.client.put_object,
            Bucket=self._bucket,
            Key=key,
            Body=data,
            Metadata={"sha256": entry.sha256},
            **sse_args(self._settings),
        )

    def _check_digest(self, entry: FileDigest, key: str, size: int, sha256: str) -> None:
        where = f"{self._dir / entry.path} (for {self._location.uri(key)})"
        if size != entry.size:
            raise DigestMismatchError(f"{where} has {size} bytes, manifest says {entry.size}")
        if sha256 != entry.sha256:
            raise DigestMismatchError(f"{where} does not match its SHA-256 digest; not uploaded")

    def _put_large(
        self,
        entry: FileDigest,
        meter: Meter,
        stored: dict[str, int],
        parts: ThreadPoolExecutor,
        files: ThreadPoolExecutor,
    ) -> Future[None]:
        """Read (compressing where it pays) and hash `entry` part by part here, sending
        parts through `parts`; the completion waits for them in `files`. Returns that
        completion."""
        done: Future[None] = Future()
        if self._skip_complete(entry, meter, stored):
            done.set_result(None)
            return done
        packed = self._compressing(entry)
        reading = FileReading(
            self._dir / entry.path,
            part_size=self._settings.part_size_for(entry.size),
            # sized for the largest frame the file can make, to stay within S3's part count
            packed_part_size=(
                None
                if packed is None
                else self._settings.part_size_for(compressed_bound(entry.size))
            ),
        )
        produced = reading.parts()
        first, second = self._next_part(produced), self._next_part(produced)
        key = packed if packed is not None and reading.compressed else self._key(entry.path)
        if first is None or second is None:  # a compressed frame that fits one part
            return self._put_whole(entry, key, reading, first, meter, stored, files)
        upload = self._multipart(entry, key)
        for part in itertools.chain((first, second), iter(lambda: self._next_part(produced), None)):
            self._send_part(upload, part, meter, parts)
        try:
            self._check_digest(entry, key, reading.size, reading.sha256)
        except DigestMismatchError:
            self._abort(upload)
            raise
        completion = files.submit(self._complete, entry, upload, stored)
        self._failure.watch(completion)
        return completion

    def _next_part(self, produced: Iterator[Part]) -> Part | None:
        self._failure.check()
        self._buffers.acquire()  # released once the part is sent or skipped
        try:
            part = next(produced, None)
        except BaseException:
            self._buffers.release()
            raise
        if part is None:
            self._buffers.release()
        return part

    def _put_whole(
        self,
        entry: FileDigest,
        key: str,
        reading: FileReading,
        part: Part | None,
        meter: Meter,
        stored: dict[str, int],
        files: ThreadPoolExecutor,
    ) -> Future[None]:
        """Send a file that came out as one part (or none) with one PUT, in `files`."""
        try:
            self._check_digest(entry, key, reading.size, reading.sha256)
        except BaseException:
            if part is not None:
                self._buffers.release()
            raise

        def put() -> None:
            try:
                self._put_object(entry, key, part.data if part else b"", stored)
            finally:
                if part is not None:
                    self._buffers.release()
            meter.add(done=entry.size, transferred=len(part.data) if part else 0)

        completion = files.submit(put)
        self._failure.watch(completion)
        return completion

    def _send_part(
        self, upload: _Multipart, part: Part, meter: Meter, parts: ThreadPoolExecutor
    ) -> None:
        have = upload.stored_parts.get(part.number)
        if have and have.size == len(part.data):
            etag = f'"{hashlib.md5(part.data, usedforsecurity=False).hexdigest()}"'
            if etag == have.etag:
                upload.etags[part.number] = have.etag
                self._buffers.release()
                meter.add(done=part.plain, transferred=0)
                return
        future = parts.submit(self._upload_part, upload, part, meter)
        self._failure.watch(future)
        upload.sending.append(future)

    def _upload_part(self, upload: _Multipart, part: Part, meter: Meter) -> None:
        try:
            sent = self._s3.call(
                self._s3.client.upload_part,
                Bucket=self._bucket,
                Key=upload.key,
                UploadId=upload.upload_id,
                PartNumber=part.number,
                Body=part.data,
            )
        finally:
            self._buffers.release()
        upload.etags[part.number] = str(sent["ETag"])
        meter.add(done=part.plain, transferred=len(part.data))

    def _multipart(self, entry: FileDigest, key: str) -> _Multipart:
        """The newest unfinished upload of `key` with its stored parts, or a new one."""
        found = [
            upload
            for page in self._s3.list_uploads(Bucket=self._bucket, Prefix=key)
            for upload in page.get("Uploads", [])
            if upload["Key"] == key
        ]
        if found:
            newest = max(found, key=lambda upload: upload["Initiated"])
            upload_id = str(newest["UploadId"])
            return _Multipart(key, upload_id, self._stored_parts(key, upload_id), {}, [])
        created = self._s3.call(
            self._s3.client.create_multipart_upload,
            Bucket=self._bucket,
            Key=key,
            Metadata={"sha256": entry.sha256},
            **sse_args(self._settings),
        )
        return _Multipart(key, str(created["UploadId"]), {}, {}, [])

    def _stored_parts(self, key: str, upload_id: str) -> dict[int, _Stored]:
        pages = self._s3.list_parts(Bucket=self._bucket, Key=key, UploadId=upload_id)
        return {
            int(part["PartNumber"]): _Stored(int(part["Size"]), str(part["ETag"]))
            for page in pages
            for part in page.get("Parts", [])
        }

    def _complete(self, entry: FileDigest, upload: _Multipart, stored: dict[str, int]) -> None:
        results(list(upload.sending))
        self._drop_other(entry, upload.key, stored)
        parts: list[CompletedPartTypeDef] = [
            {"PartNumber": n, "ETag": upload.etags[n]} for n in sorted(upload.etags)
        ]
        self._s3.call(
            self._s3.client.complete_multipart_upload,
            Bucket=self._bucket,
            Key=upload.key,
            UploadId=upload.upload_id,
            MultipartUpload={"Parts": parts},
        )

    def _abort(self, upload: _Multipart) -> None:
        results(list(upload.sending))
        self._s3.call(
            self._s3.client.abort_multipart_upload,
            Bucket=self._bucket,
            Key=upload.key,
            UploadId=upload.upload_id,
        )

    def _put_manifest(self, raw: bytes, manifest: Manifest) -> None:
        self._s3.call(
            self._s3.client.put_object,
            Bucket=self._bucket,
            Key=self._key(MANIFEST_FILE),
            Body=raw,
            ContentType="application/json",
            **sse_args(self._settings),
        )
