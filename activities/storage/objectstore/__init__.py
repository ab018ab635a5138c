"""Where committed checkpoint versions are published to and fetched from: one interface,
`Backend`, that the node (upload, prefetch, restore), the catalog and retention use alike;
a filesystem and an S3 implementation. Which backend serves a `RemoteStorage` is its
`kind`, looked up in `activities.storage.backends`.

A capture commits a version under the node-local root first (`activities.storage.store.
CheckpointStore`: staging, manifest last, rename); a backend then publishes that committed
directory, and a restore fetches a version back into a local version directory that is a
committed version again, for `CheckpointStore.verify` and CRIU.

- `filesystem.FilesystemBackend(root=...)`: another checkpoint root, such as the RWX PVC,
  in `CheckpointStore`'s layout and commit protocol.
- `s3.S3Backend(client=..., location=S3Location(bucket, prefix), settings=...)`: the same
  keys under `s3://<bucket>/<prefix>/`, manifest uploaded last; parallel multipart upload
  and ranged download, resumable uploads (`s3upload`, `s3download`); an index of empty
  objects whose keys carry each version's listing (`s3keys`), so listing reads no manifest.
- `cache.NodeCache(root)`: the node's bounded LRU directory that restores from a backend
  read; one download per version however many restores of it arrive at once.

Every file's SHA-256 is computed from the bytes as they are copied, sent or received and
compared with the manifest; a version counts only once its manifest exists; nothing
unverified is left under a final name. Calls are blocking: activities run them in a
thread (`asyncio.to_thread`) and pass a `progress` callback that heartbeats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from activities.storage.objectstore.transfer import ProgressCallback, TransferReport
from api.catalog import CatalogEntry
from api.manifest import Manifest


class Backend(Protocol):
    def upload_version(
        self,
        local_dir: Path,
        *,
        checkpoint_id: str,
        version: str,
        progress: ProgressCallback | None = None,
    ) -> TransferReport:
        """Publish the committed local version `local_dir` and list it in the index; a
        retry resumes, or (already committed) only lists it again."""
        ...

    def download_version(
        self,
        *,
        checkpoint_id: str,
        version: str,
        dest_dir: Path,
        progress: ProgressCallback | None = None,
    ) -> TransferReport:
        """Fetch a committed version into the local version directory `dest_dir`."""
        ...

    def checkpoint_ids(self) -> list[str]:
        """Checkpoint IDs with anything stored, sorted."""
        ...

    def list_versions(self, checkpoint_id: str) -> list[str]:
        """Committed versions (those whose manifest exists), oldest first."""
        ...

    def listed(self) -> list[CatalogEntry]:
        """The versions the store's index lists, newest first, without reading a manifest
        (a listing, or local files). A version committed without its index entry (before
        there was one, or by an upload stopped in between) is missing until `index` adds it."""
        ...

    def index(self, manifest: Manifest) -> None:
        """List a committed version in the index (idempotent)."""
        ...

    def read_manifest(self, checkpoint_id: str, version: str) -> Manifest:
        """The committed manifest of a version, checked (`placing.check_manifest`); a
        version without one is CheckpointNotFoundError naming where it was looked for."""
        ...

    def delete_version(self, *, checkpoint_id: str, version: str) -> bool:
        """Unlist, uncommit (the manifest goes first), then remove everything of the
        version; returns whether it was still committed. Idempotent."""
        ...

    def sweep_incomplete(self, *, older_than_seconds: float, dry_run: bool) -> list[str]:
        """Transfers left unfinished longer ago than that (a crashed uploader's parts or
        staging), removed unless `dry_run`; returns where they were."""
        ...

    def uri(self, checkpoint_id: str = "", version: str = "") -> str:
        """Where the store (no checkpoint ID), a checkpoint's versions
        (`.../<checkpointID>/versions/`) or one version (`.../versions/<version>/`) live:
        what messages and `storageURI` name. An object store's start with the location's
        `RemoteStorage.uri`, which `api.storage.stored_at` reads back."""
        ...
