"""Checkpoint versions in S3 (any S3-compatible endpoint): the `s3` kind of remote storage.

`S3Kind` opens backends for a worker, one boto3 client per endpoint, region and
credentials (`client_config` sizes its connection pool); `S3Backend` works through the
client it is given.

Keys mirror the filesystem layout: `<prefix>/<checkpointID>/versions/<version>/<file>`, or
`<file>.zst` for a file stored zstd-compressed (where that pays, `settings.compression`).
S3 has no rename, so there is no staging: every file is uploaded to its final key, and
`manifest.json` is uploaded last, only after every file completed and matched its digest.
A version without a manifest object does not exist for listing, describing or restoring;
deletion removes the manifest first, so a half-deleted version is never listed either.
The index (`s3keys`) lists committed versions by key alone.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from activities.storage.backends import KindContext
from activities.storage.objectstore.s3calls import S3Calls, client_config
from activities.storage.objectstore.s3download import StoredObject, VersionDownload, read_manifest
from activities.storage.objectstore.s3keys import S3Location
from activities.storage.objectstore.s3upload import VersionUpload, sse_args
from activities.storage.objectstore.transfer import (
    ProgressCallback,
    TransferReport,
    TransferSettings,
)
from api.catalog import CatalogEntry, entry_from_token, entry_of, entry_token, newest_first
from api.errors import (
    CheckpointNotFoundError,
    DigestMismatchError,
    InvalidNameError,
    InvalidSpecError,
    StorageError,
)
from api.manifest import Manifest
from api.naming import MANIFEST_FILE, is_checkpoint_id
from api.storage import RemoteStorage

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["S3Backend", "S3Connection", "S3Kind", "S3Location", "StoredObject"]
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class S3Kind:
    """Opens S3 backends for one worker, sharing a client per endpoint, region and keys."""

    def __init__(self, context: KindContext) -> None:
        self._transfer = context.transfer
        self._read_secret = context.read_secret
        self._clients: dict[tuple[str, ...], S3Client] = {}
        self._lock = threading.Lock()

    def open(self, storage: RemoteStorage) -> S3Backend:
        if not _BUCKET.match(storage.bucket):
            raise InvalidSpecError(
                f"{storage.uri}: {storage.bucket!r} is not an S3 bucket name (3-63 of a-z, "
                "0-9, '.' and '-')"
            )
        settings = self._transfer
        if storage.sse:
            settings = replace(settings, sse=storage.sse, kms_key_id=storage.kms_key_id)
        keys = self._credentials(storage)
        return S3Backend(
            client=self._client(storage, keys),
            location=S3Location(storage.bucket, storage.prefix),
            settings=settings,
            connection=S3Connection(
                endpoint=storage.endpoint,
                region=storage.region,
                keys=keys,
            ),
        )

    def _client(self, storage: RemoteStorage, keys: dict[str, str]) -> S3Client:
        cache_key = (
            storage.endpoint,
            storage.region,
            *sorted(f"{k}={v}" for k, v in keys.items()),
        )
        with self._lock:
            client = self._clients.get(cache_key)
            if client is None:
                import boto3  # its import is slow; only workers that move bytes pay it

                client = boto3.session.Session().client(
                    "s3",
                    endpoint_url=storage.endpoint or None,
                    region_name=storage.region or None,
                    config=client_config(self._transfer),
                    aws_access_key_id=keys.get("aws_access_key_id"),
                    aws_secret_access_key=keys.get("aws_secret_access_key"),
                    aws_session_token=keys.get("aws_session_token"),
                )
                self._clients[cache_key] = client
        return client

    def _credentials(self, storage: RemoteStorage) -> dict[str, str]:
        if not storage.credentials_secret:
            return {}  # boto3's standard chain
        where = f"Secret {storage.secret_namespace}/{storage.credentials_secret}"
        if self._read_secret is None:
            raise InvalidSpecError(
                f"{storage.uri}: credentials {where} are named, but this worker has no API "
                "access to read Secrets (use boto3's standard chain on it)"
            )
        data = self._read_secret(storage.secret_namespace, storage.credentials_secret)
        missing = [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not data.get(k)]
        if missing:
            raise StorageError(f"{storage.uri}: credentials {where} lack {', '.join(missing)}")
        keys = {
            "aws_access_key_id": data["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": data["AWS_SECRET_ACCESS_KEY"],
        }
        if data.get("AWS_SESSION_TOKEN"):
            keys["aws_session_token"] = data["AWS_SESSION_TOKEN"]
        return keys


@dataclass(frozen=True)
class S3Connection:
    """How a process of its own reaches the same bucket (a streamed restore's page source):
    the endpoint, the region and the keys (none: boto3's standard chain)."""

    endpoint: str = ""
    region: str = ""
    keys: dict[str, str] = field(default_factory=dict)


class S3Backend:
    """Publish, fetch, list and delete checkpoint versions under one S3 location."""

    def __init__(
        self,
        *,
        client: S3Client,
        location: S3Location,
        settings: TransferSettings | None = None,
        connection: S3Connection | None = None,
    ) -> None:
        self.client = client
        self.connection = connection or S3Connection()
        self._s3 = S3Calls(client)
        self.location = location
        self.settings = settings or TransferSettings()

    def upload_version(
        self,
        local_dir: Path,
        *,
        checkpoint_id: str,
        version: str,
        progress: ProgressCallback | None = None,
    ) -> TransferReport:
        """Upload the committed local version `local_dir` (a retry resumes, see s3upload),
        then list it in the index."""
        upload = VersionUpload(
            s3=self._s3,
            location=self.location,
            settings=self.settings,
            local_dir=local_dir,
            checkpoint_id=checkpoint_id,
            version=version,
        )
        report = upload.run(progress=progress)
        self.index(report.manifest)
        return report

    def download_version(
        self,
        *,
        checkpoint_id: str,
        version: str,
        dest_dir: Path,
        progress: ProgressCallback | None = None,
    ) -> TransferReport:
        """Fetch a committed version into `dest_dir` (its version directory), verified."""
        return self._download(checkpoint_id, version, dest_dir).run(progress=progress)

    def download_streamed(
        self,
        *,
        checkpoint_id: str,
        version: str,
        dest_dir: Path,
        streamed: Callable[[Manifest, list[StoredObject]], list[StoredObject]],
    ) -> tuple[Manifest, bytes, list[StoredObject]]:
        """Fetch a version's files into `dest_dir`, verified, except those `streamed` picks:
        those are returned (decision 0039), with the manifest and its bytes; `dest_dir` gets
        no manifest."""
        return self._download(checkpoint_id, version, dest_dir).run_streamed(streamed)

    def _download(self, checkpoint_id: str, version: str, dest_dir: Path) -> VersionDownload:
        return VersionDownload(
            s3=self._s3,
            location=self.location,
            settings=self.settings,
            checkpoint_id=checkpoint_id,
            version=version,
            dest_dir=dest_dir,
        )

    def checkpoint_ids(self) -> list[str]:
        root, found = self.location.root, []
        pages = self._s3.list_objects(Bucket=self.location.bucket, Prefix=root, Delimiter="/")
        for page in pages:
            for common in page.get("CommonPrefixes", []):
                name = common.get("Prefix", "")[len(root) :].rstrip("/")
                if is_checkpoint_id(name):
                    found.append(name)
        return sorted(found)

    def list_versions(self, checkpoint_id: str) -> list[str]:
        """Committed versions (those with a manifest object), oldest first: one listing of
        the checkpoint's keys."""
        prefix = self.location.versions_prefix(checkpoint_id)
        found = []
        for page in self._s3.list_objects(Bucket=self.location.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                version, _, path = item.get("Key", "")[len(prefix) :].partition("/")
                if path == MANIFEST_FILE:
                    found.append(version)
        return sorted(found)

    def listed(self) -> list[CatalogEntry]:
        """The index: committed versions with what a listing shows, from keys alone."""
        tokens: dict[tuple[str, str], tuple[datetime, str]] = {}
        root = self.location.index_root
        for page in self._s3.list_objects(Bucket=self.location.bucket, Prefix=root):
            for item in page.get("Contents", []):
                found = self.location.indexed(item.get("Key", ""))
                if found is None or not is_checkpoint_id(found[0]):
                    continue
                when = item.get("LastModified", datetime.min.replace(tzinfo=UTC))
                prior = tokens.get(found[:2])
                if prior is None or prior[0] <= when:
                    tokens[found[:2]] = (when, found[2])
        entries = []
        for (checkpoint_id, version), (_when, token) in tokens.items():
            entry = self._entry(checkpoint_id, version, token)
            if entry is not None:
                entries.append(entry)
        return newest_first(entries)

    def _entry(self, checkpoint_id: str, version: str, token: str) -> CatalogEntry | None:
        try:
            location = self.uri(checkpoint_id, version)
        except InvalidNameError:
            return None  # not a key we write
        entry = entry_from_token(
            token, checkpoint_id=checkpoint_id, version=version, location=location
        )
        if entry is not None:
            return entry
        try:  # a listing too long for a key: the manifest tells
            manifest = self.read_manifest(checkpoint_id, version)
        except (CheckpointNotFoundError, DigestMismatchError):
            return None
        return entry_of(manifest.model_dump(mode="json"), location)

    def index(self, manifest: Manifest) -> None:
        """Put the version's index object (and remove any other of it)."""
        checkpoint_id, version = manifest.checkpoint_id, manifest.version
        entry = entry_of(manifest.model_dump(mode="json"), self.uri(checkpoint_id, version))
        key = self.location.index_key(checkpoint_id, version, entry_token(entry))
        bucket = self.location.bucket
        self._s3.call(
            self._s3.client.put_object, Bucket=bucket, Key=key, Body=b"", **sse_args(self.settings)
        )
        self._unindex(checkpoint_id, version, keep=key)

    def read_manifest(self, checkpoint_id: str, version: str) -> Manifest:
        """The committed manifest object of a version, checked."""
        manifest, _raw = read_manifest(
            self._s3, self.location, checkpoint_id=checkpoint_id, version=version
        )
        return manifest

    def uri(self, checkpoint_id: str = "", version: str = "") -> str:
        if not checkpoint_id:
            return self.location.uri(self.location.root)
        if version:
            return self.location.uri(self.location.version_prefix(checkpoint_id, version))
        return self.location.uri(self.location.versions_prefix(checkpoint_id))

    def delete_version(self, *, checkpoint_id: str, version: str) -> bool:
        """Unlist, uncommit (manifest first), then remove every object and unfinished
        upload; returns whether the manifest was still there."""
        bucket = self.location.bucket
        prefix = self.location.version_prefix(checkpoint_id, version)
        self._unindex(checkpoint_id, version)
        try:
            self._s3.call(self._s3.client.head_object, Bucket=bucket, Key=prefix + MANIFEST_FILE)
            existed = True
        except CheckpointNotFoundError:
            existed = False
        self._s3.call(self._s3.client.delete_object, Bucket=bucket, Key=prefix + MANIFEST_FILE)
        self._delete_under(prefix)
        self._abort_uploads(prefix, before=None, dry_run=False)
        return existed

    def _unindex(self, checkpoint_id: str, version: str, *, keep: str = "") -> None:
        """Remove the version's index objects (but `keep`): one, as a rule."""
        bucket, prefix = self.location.bucket, self.location.index_prefix(checkpoint_id, version)
        for page in self._s3.list_objects(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if item["Key"] != keep:
                    self._s3.call(self._s3.client.delete_object, Bucket=bucket, Key=item["Key"])

    def _delete_under(self, prefix: str) -> None:
        bucket = self.location.bucket
        for page in self._s3.list_objects(Bucket=bucket, Prefix=prefix):
            keys = [item["Key"] for item in page.get("Contents", [])]
            if keys:
                self._s3.call(
                    self._s3.client.delete_objects,
                    Bucket=bucket,
                    Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True},
                )

    def sweep_incomplete(self, *, older_than_seconds: float, dry_run: bool) -> list[str]:
        """Multipart uploads under the location started longer ago than that (a crashed
        uploader's parts cost storage): aborted unless `dry_run`; their URIs."""
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_seconds)
        keys = self._abort_uploads(self.location.root, before=cutoff, dry_run=dry_run)
        return [self.location.uri(key) for key in keys]

    def _abort_uploads(self, prefix: str, *, before: datetime | None, dry_run: bool) -> list[str]:
        bucket = self.location.bucket
        found = []
        for page in self._s3.list_uploads(Bucket=bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                if before is not None and upload["Initiated"] >= before:
                    continue
                if not dry_run:
                    self._s3.call(
                        self._s3.client.abort_multipart_upload,
                        Bucket=bucket,
                        Key=upload["Key"],
                        UploadId=upload["UploadId"],
                    )
                found.append(upload["Key"])
        return found
