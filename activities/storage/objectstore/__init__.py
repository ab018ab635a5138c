"""Where committed checkpoint versions are published to and fetched from: one interface,
a filesystem backend and an S3 backend.

A capture commits a version under the node-local root first (`activities.storage.store.
CheckpointStore`: staging, manifest last, rename); a backend then publishes that committed
directory, and a restore fetches a version back into a local version directory that is a
committed version again, for `CheckpointStore.verify` and CRIU.

    class Backend(Protocol):
        upload_version(local_dir, *, checkpoint_id, version, progress=None) -> TransferReport
        download_version(*, checkpoint_id, version, dest_dir, progress=None) -> TransferReport
        list_versions(checkpoint_id) -> list[str]        # committed only, oldest first
        read_manifest(checkpoint_id, version) -> Manifest  # the committed one, checked
        delete_version(*, checkpoint_id, version) -> None
        uri(checkpoint_id, version="") -> str             # where it lives, for messages

- `filesystem.FilesystemBackend(root=...)`: another checkpoint root, such as the RWX PVC,
  in `CheckpointStore`'s layout and commit protocol.
- `s3.S3Backend(client=..., location=S3Location(bucket, prefix), settings=...)`: the same
  keys under `s3://<bucket>/<prefix>/`, manifest uploaded last; parallel multipart upload
  and ranged download, resumable uploads (`s3upload`, `s3download`).
- `cache.NodeCache(root)`: the node's bounded LRU directory that restores from a backend
  read; one download per version however many restores of it arrive at once.

Every file's SHA-256 is computed from the bytes as they are copied, sent or received and
compared with the manifest; a version counts only once its manifest exists; nothing
unverified is left under a final name. Transfers are blocking: activities run them in a
thread (`asyncio.to_thread`) and pass a `progress` callback that heartbeats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from activities.storage.objectstore.transfer import ProgressCallback, TransferReport
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
        """Publish the committed local version `local_dir`; a retry resumes or returns."""
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

    def list_versions(self, checkpoint_id: str) -> list[str]:
        """Committed versions (those whose manifest exists), oldest first."""
        ...

    def read_manifest(self, checkpoint_id: str, version: str) -> Manifest:
        """The committed manifest of a version, checked (`placing.check_manifest`); a
        version without one is CheckpointNotFoundError naming where it was looked for."""
        ...

    def delete_version(self, *, checkpoint_id: str, version: str) -> None:
        """Uncommit (the manifest goes first), then remove everything of the version."""
        ...

    def uri(self, checkpoint_id: str, version: str = "") -> str:
        """Where a checkpoint's versions live (`.../<checkpointID>/versions/`), or one
        version (`.../versions/<version>/`): what messages name."""
        ...
