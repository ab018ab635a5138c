"""Checkpoint versions in S3 (any S3-compatible endpoint), through a boto3 client the
caller builds (`client_config` sizes its connection pool) and injects.

Keys mirror the filesystem layout: `<prefix>/<checkpointID>/versions/<version>/<file>`, or
`<file>.zst` for a file stored zstd-compressed (where that pays, `settings.compression`).
S3 has no rename, so there is no staging: every file is uploaded to its final key, and
`manifest.json` is uploaded last, only after every file completed and matched its digest.
A version without a manifest object does not exist for listing, describing or restoring;
deletion removes the manifest first, so a half-deleted version is never listed either.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from activities.storage.objectstore.s3calls import S3Calls
from activities.storage.objectstore.s3download import VersionDownload, read_manifest
from activities.storage.objectstore.s3keys import S3Location
from activities.storage.objectstore.s3upload import VersionUpload
from activities.storage.objectstore.transfer import (
    ProgressCallback,
    TransferReport,
    TransferSettings,
)
from api.manifest import Manifest
from api.naming import MANIFEST_FILE

__all__ = ["S3Backend", "S3Location"]


class S3Backend:
    """Publish, fetch, list and delete checkpoint versions under one S3 location."""

    def __init__(
        self, *, client: Any, location: S3Location, settings: TransferSettings | None = None
    ) -> None:
        self.client = client
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
        """Upload the committed local version `local_dir`; a retry resumes (see s3upload)."""
        upload = VersionUpload(
            s3=self._s3,
            location=self.location,
            settings=self.settings,
            local_dir=local_dir,
            checkpoint_id=checkpoint_id,
            version=version,
        )
        return upload.run(progress=progress)

    def download_version(
        self,
        *,
        checkpoint_id: str,
        version: str,
        dest_dir: Path,
        progress: ProgressCallback | None = None,
    ) -> TransferReport:
        """Fetch a committed version into `dest_dir` (its version directory), verified."""
        download = VersionDownload(
            s3=self._s3,
            location=self.location,
            settings=self.settings,
            checkpoint_id=checkpoint_id,
            version=version,
            dest_dir=dest_dir,
        )
        return download.run(progress=progress)

    def list_versions(self, checkpoint_id: str) -> list[str]:
        """Committed versions (those with a manifest object), oldest first."""
        prefix = self.location.versions_prefix(checkpoint_id)
        found = []
        for page in self._s3.pages(
            "list_objects_v2", Bucket=self.location.bucket, Prefix=prefix, Delimiter="/"
        ):
            for common in page.get("CommonPrefixes", []):
                version = str(common["Prefix"])[len(prefix) :].rstrip("/")
                if self._is_committed(checkpoint_id, version):
                    found.append(version)
        return sorted(found)

    def _is_committed(self, checkpoint_id: str, version: str) -> bool:
        try:
            key = self.location.key(checkpoint_id, version, MANIFEST_FILE)
        except ValueError:
            return False  # not a name we write
        listed = self._s3.call(
            "list_objects_v2", Bucket=self.location.bucket, Prefix=key, MaxKeys=1
        )
        return any(item["Key"] == key for item in listed.get("Contents", []))

    def read_manifest(self, checkpoint_id: str, version: str) -> Manifest:
        """The committed manifest object of a version, checked."""
        return read_manifest(self._s3, self.location, checkpoint_id=checkpoint_id, version=version)[
            0
        ]

    def uri(self, checkpoint_id: str, version: str = "") -> str:
        if version:
            return self.location.uri(self.location.version_prefix(checkpoint_id, version))
        return self.location.uri(self.location.versions_prefix(checkpoint_id))

    def delete_version(self, *, checkpoint_id: str, version: str) -> None:
        """Uncommit (manifest first), then remove every object and unfinished upload."""
        bucket = self.location.bucket
        prefix = self.location.version_prefix(checkpoint_id, version)
        self._s3.call("delete_object", Bucket=bucket, Key=prefix + MANIFEST_FILE)
        for page in self._s3.pages("list_objects_v2", Bucket=bucket, Prefix=prefix):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                self._s3.call(
                    "delete_objects", Bucket=bucket, Delete={"Objects": keys, "Quiet": True}
                )
        self._abort_uploads(prefix, before=None)

    def abort_stale_uploads(self, *, older_than_seconds: float) -> list[str]:
        """Abort multipart uploads under the location started longer ago than that (a
        crashed uploader's parts cost storage); returns their keys."""
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_seconds)
        return self._abort_uploads(self.location.root, before=cutoff)

    def _abort_uploads(self, prefix: str, *, before: datetime | None) -> list[str]:
        bucket = self.location.bucket
        aborted = []
        for page in self._s3.pages("list_multipart_uploads", Bucket=bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                if before is not None and upload["Initiated"] >= before:
                    continue
                self._s3.call(
                    "abort_multipart_upload",
                    Bucket=bucket,
                    Key=upload["Key"],
                    UploadId=upload["UploadId"],
                )
                aborted.append(str(upload["Key"]))
        return aborted
