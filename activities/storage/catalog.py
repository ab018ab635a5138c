"""The catalog of committed checkpoints: the one interface they are listed and resolved by.

`LocalCatalog` reads a checkpoint root's committed manifests (a version counts only once
its `manifest.json`, the commit marker, exists); `remote_catalog.RemoteCatalog` lists a
backend's index behind the same interface. Workflow histories are not a catalog: they
expire with the namespace's retention, checkpoints do not.

Listing parses manifests with `json` into light entries (`api.catalog`); `manifest()`
loads and validates the whole one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from api.catalog import CatalogEntry, entry_of, find_entry, newest_first
from api.errors import CheckpointNotFoundError, DigestMismatchError
from api.naming import MANIFEST_FILE, is_checkpoint_id, require_path_element

if TYPE_CHECKING:
    from api.manifest import Manifest

__all__ = [
    "STAGING",
    "UNVERIFIED",
    "Catalog",
    "CatalogEntry",
    "LocalCatalog",
    "entry_of",
    "find_entry",
]
STAGING = "tmp"
# In a committed version held back until its test restore answers (a verified capture,
# decision 0045): no catalog lists it and no restore finds it but that test restore.
UNVERIFIED = "unverified"


class Catalog(Protocol):
    def checkpoints(self) -> list[CatalogEntry]:
        """Every committed checkpoint version, newest first."""
        ...

    def find(self, ref: str) -> CatalogEntry:
        """The newest committed version named `ref`, or with checkpoint ID `ref`."""
        ...

    def manifest(self, entry: CatalogEntry) -> Manifest:
        """The validated manifest of `entry`."""
        ...


def load_manifest(version_dir: Path) -> Manifest:
    from pydantic import ValidationError

    from api.manifest import Manifest

    path = version_dir / MANIFEST_FILE
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except FileNotFoundError as err:
        raise CheckpointNotFoundError(f"{path} is missing") from err
    except ValidationError as err:
        raise DigestMismatchError(f"{path} is not a valid manifest: {err}") from err


def committed_versions(root: Path, checkpoint_id: str) -> list[Path]:
    """Version directories of a checkpoint that hold a manifest, oldest first; not one held
    back unverified."""
    versions = root / require_path_element(checkpoint_id, what="checkpoint ID") / "versions"
    if not versions.is_dir():
        return []
    return sorted(
        p
        for p in versions.iterdir()
        if p.name != STAGING and (p / MANIFEST_FILE).is_file() and not (p / UNVERIFIED).exists()
    )


def _entry(version_dir: Path) -> CatalogEntry | None:
    """The listing of one version, or None where its manifest is unreadable (restore says why)."""
    try:
        return entry_of(json.loads((version_dir / MANIFEST_FILE).read_bytes()), str(version_dir))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class LocalCatalog:
    """Committed checkpoints under a local checkpoint root."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def checkpoints(self) -> list[CatalogEntry]:
        found = []
        entries = sorted(self.root.iterdir()) if self.root.is_dir() else []
        for entry in entries:
            if not (entry.is_dir() and is_checkpoint_id(entry.name)):
                continue
            for version in committed_versions(self.root, entry.name):
                listed = _entry(version)
                if listed is not None and listed.checkpoint_id == entry.name:
                    found.append(listed)
        return newest_first(found)

    def find(self, ref: str) -> CatalogEntry:
        return find_entry(self.checkpoints(), ref, where=str(self.root))

    def manifest(self, entry: CatalogEntry) -> Manifest:
        """The manifest of `entry`'s version under this root (CheckpointNotFoundError
        where this root does not hold it)."""
        checkpoint = require_path_element(entry.checkpoint_id, what="checkpoint ID")
        version = require_path_element(entry.version, what="version")
        return load_manifest(self.root / checkpoint / "versions" / version)
