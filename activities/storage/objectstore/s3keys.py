"""Object keys of checkpoint versions: the filesystem layout under `s3://<bucket>/<prefix>/`,
each file under its path, or zstd-compressed under `<path>.zst`."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from api.naming import require_path_element

COMPRESSED_SUFFIX = ".zst"


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

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"
