"""Publishing a committed local version to S3: parallel multipart upload, SHA-256 taken
from the same read that feeds the upload, resumable, manifest last.

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
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from activities.objectstore.parallel import FirstFailure, results, worker_pool
from activities.objectstore.placing import read_local_manifest
from activities.objectstore.s3calls import S3Calls
from activities.objectstore.s3keys import S3Location
from activities.objectstore.transfer import (
    Meter,
    ProgressCallback,
    TransferReport,
    TransferSettings,
)
from api.errors import DigestMismatchError
from api.manifest import FileDigest, Manifest
from api.naming import MANIFEST_FILE


@dataclass(frozen=True)
class _Stored:
    size: int
    etag: str


@dataclass
class _Multipart:
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
        # Parts read and not yet sent: the pool's, plus two so the reader keeps ahead.
        self._buffers = threading.BoundedSemaphore(settings.concurrency + 2)
        self._failure = FirstFailure()

    def _key(self, path: str) -> str:
        return self._location.key(self._checkpoint_id, self._version, path)

    def _sse(self) -> dict[str, str]:
        args: dict[str, str] = {}
        if self._settings.sse:
            args["ServerSideEncryption"] = self._settings.sse
        if self._settings.kms_key_id:
            args["SSEKMSKeyId"] = self._settings.kms_key_id
        return args

    def run(self, *, progress: ProgressCallback | None) -> TransferReport:
        manifest, raw = read_local_manifest(
            self._dir, checkpoint_id=self._checkpoint_id, version=self._version
        )
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
            for page in self._s3.pages("list_objects_v2", Bucket=self._bucket, Prefix=prefix)
            for item in page.get("Contents", [])
        }

    def _is_complete(self, entry: FileDigest, stored: dict[str, int]) -> bool:
        key = self._key(entry.path)
        if stored.get(key) != entry.size:
            return False
        head = self._s3.call("head_object", Bucket=self._bucket, Key=key)
        return bool(head.get("Metadata", {}).get("sha256") == entry.sha256)

    def _put_small(self, entry: FileDigest, meter: Meter, stored: dict[str, int]) -> None:
        if self._is_complete(entry, stored):
            meter.add(done=entry.size, transferred=0)
            return
        data = (self._dir / entry.path).read_bytes()
        self._check_digest(entry, len(data), hashlib.sha256(data).hexdigest())
        self._s3.call(
            "put_object",
            Bucket=self._bucket,
            Key=self._key(entry.path),
            Body=data,
            Metadata={"sha256": entry.sha256},
            **self._sse(),
        )
        meter.add(done=entry.size, transferred=entry.size)

    def _check_digest(self, entry: FileDigest, size: int, sha256: str) -> None:
        where = f"{self._dir / entry.path} (for {self._location.uri(self._key(entry.path))})"
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
        """Read and hash `entry` part by part here, sending parts through `parts`; the
        completion waits for them in `files`. Returns that completion."""
        done: Future[None] = Future()
        if self._is_complete(entry, stored):
            meter.add(done=entry.size, transferred=0)
            done.set_result(None)
            return done
        upload = self._multipart(entry)
        digest = hashlib.sha256()
        size = 0
        for number, data in self._read_parts(entry):
            digest.update(data)
            size += len(data)
            self._send_part(entry, upload, number, data, meter, parts)
        try:
            self._check_digest(entry, size, digest.hexdigest())
        except DigestMismatchError:
            self._abort(entry, upload)
            raise
        completion = files.submit(self._complete, entry, upload)
        self._failure.watch(completion)
        return completion

    def _read_parts(self, entry: FileDigest) -> Iterator[tuple[int, bytes]]:
        part_size = self._settings.part_size_for(entry.size)
        with (self._dir / entry.path).open("rb", buffering=0) as src:
            number = 1
            while True:
                self._failure.check()
                self._buffers.acquire()  # released once the part is sent or skipped
                data = src.read(part_size)
                if not data:
                    self._buffers.release()
                    return
                yield number, data
                number += 1

    def _send_part(
        self,
        entry: FileDigest,
        upload: _Multipart,
        number: int,
        data: bytes,
        meter: Meter,
        parts: ThreadPoolExecutor,
    ) -> None:
        have = upload.stored_parts.get(number)
        if have and have.size == len(data):
            etag = f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'
            if etag == have.etag:
                upload.etags[number] = have.etag
                self._buffers.release()
                meter.add(done=len(data), transferred=0)
                return
        future = parts.submit(self._upload_part, entry, upload, number, data, meter)
        self._failure.watch(future)
        upload.sending.append(future)

    def _upload_part(
        self, entry: FileDigest, upload: _Multipart, number: int, data: bytes, meter: Meter
    ) -> None:
        try:
            sent = self._s3.call(
                "upload_part",
                Bucket=self._bucket,
                Key=self._key(entry.path),
                UploadId=upload.upload_id,
                PartNumber=number,
                Body=data,
            )
        finally:
            self._buffers.release()
        upload.etags[number] = str(sent["ETag"])
        meter.add(done=len(data), transferred=len(data))

    def _multipart(self, entry: FileDigest) -> _Multipart:
        """The newest unfinished upload of this key with its stored parts, or a new one."""
        key = self._key(entry.path)
        found = [
            upload
            for page in self._s3.pages("list_multipart_uploads", Bucket=self._bucket, Prefix=key)
            for upload in page.get("Uploads", [])
            if upload["Key"] == key
        ]
        if found:
            newest = max(found, key=lambda upload: upload["Initiated"])
            upload_id = str(newest["UploadId"])
            return _Multipart(upload_id, self._stored_parts(key, upload_id), {}, [])
        created = self._s3.call(
            "create_multipart_upload",
            Bucket=self._bucket,
            Key=key,
            Metadata={"sha256": entry.sha256},
            **self._sse(),
        )
        return _Multipart(str(created["UploadId"]), {}, {}, [])

    def _stored_parts(self, key: str, upload_id: str) -> dict[int, _Stored]:
        pages = self._s3.pages("list_parts", Bucket=self._bucket, Key=key, UploadId=upload_id)
        return {
            int(part["PartNumber"]): _Stored(int(part["Size"]), str(part["ETag"]))
            for page in pages
            for part in page.get("Parts", [])
        }

    def _complete(self, entry: FileDigest, upload: _Multipart) -> None:
        results(list(upload.sending))
        parts = [{"PartNumber": n, "ETag": upload.etags[n]} for n in sorted(upload.etags)]
        self._s3.call(
            "complete_multipart_upload",
            Bucket=self._bucket,
            Key=self._key(entry.path),
            UploadId=upload.upload_id,
            MultipartUpload={"Parts": parts},
        )

    def _abort(self, entry: FileDigest, upload: _Multipart) -> None:
        results(list(upload.sending))
        self._s3.call(
            "abort_multipart_upload",
            Bucket=self._bucket,
            Key=self._key(entry.path),
            UploadId=upload.upload_id,
        )

    def _put_manifest(self, raw: bytes, manifest: Manifest) -> None:
        self._s3.call(
            "put_object",
            Bucket=self._bucket,
            Key=self._key(MANIFEST_FILE),
            Body=raw,
            ContentType="application/json",
            **self._sse(),
        )
