"""Object keys of checkpoint versions: the filesystem layout under `s3://<bucket>/<prefix>/`,
each file under its path, or zstd-compressed under `<path>.zst`; and the index.

The index is one empty object per committed version,
`<prefix>/index/<checkpointID>/<version>/<token>`, whose last element packs what a listing
shows (`api.catalog.entry_token`): one ListObjectsV2 request per thousand versions answers
`warmstart list`, and no manifest is read until one version is described. It is written
after the manifest and removed before it, so it never lists an uncommitted version."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from api.naming import require_path_element

COMPRESSED_SUFFIX = ".zst"
INDEX = "index"  # never a checkpoint ID (16 hex digits)
# The token of an index object whose listing would not fit in a key: the manifest is read.
NO_SUMMARY = "manifest"
MAX_KEY_BYTES = 1024


def compressed_name(path: str, paths: Collection[str]) -> str | None:
    """The name under which the version's file `path` is stored compressed, or None where
    that name is itself a file of the version (`paths`), which then keeps it: such a file
    is always stored plain, so every object name means one thing."""
    name = path + COMPRESSED_SUFFIX
    return None if name in paths else name


@dataclass(frozen=True)
class S3Location:
    """Where checkpoints live: `s3://<bucket>/<prefix>/`; prefix elements are path elements."""

    bucket: str
    prefix: str = ""

    def __post_init__(self) -> None:
        for part in self.prefix.strip("/").split("/") if self.prefix.strip("/") else ():
            require_path_element(part, what="S3 prefix element")

    @property
    def root(self) -> str:
        prefix = self.prefix.strip("/")
        return f"{prefix}/" if prefix else ""

    def versions_prefix(self, checkpoint_id: str) -> str:
        return f"{self.root}{require_path_element(checkpoint_id, what='checkpoint ID')}/versions/"

    def version_prefix(self, checkpoint_id: str, version: str) -> str:
        version = require_path_element(version, what="version")
        return f"{self.versions_prefix(checkpoint_id)}{version}/"

    def key(self, checkpoint_id: str, version: str, path: str) -> str:
        return self.version_prefix(checkpoint_id, version) + path

    @property
    def index_root(self) -> str:
        return f"{self.root}{INDEX}/"

    def index_prefix(self, checkpoint_id: str, version: str) -> str:
        checkpoint_id = require_path_element(checkpoint_id, what="checkpoint ID")
        version = require_path_element(version, what="version")
        return f"{self.index_root}{checkpoint_id}/{version}/"

    def index_key(self, checkpoint_id: str, version: str, token: str) -> str:
        key = self.index_prefix(checkpoint_id, version) + token
        if len(key.encode()) > MAX_KEY_BYTES:
            return self.index_prefix(checkpoint_id, version) + NO_SUMMARY
        return key

    def indexed(self, key: str) -> tuple[str, str, str] | None:
        """(checkpoint ID, version, token) of an index object's key, else None."""
        parts = key.removeprefix(self.index_root).split("/")
        if not key.startswith(self.index_root) or len(parts) != 3 or not all(parts):
            return None
        return parts[0], parts[1], parts[2]

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"
