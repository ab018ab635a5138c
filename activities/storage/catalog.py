"""The catalog of committed checkpoints: the one interface the CLI lists and resolves them by.

Local mode reads the checkpoint root's committed manifests (a version counts only once its
`manifest.json`, the commit marker, exists); a cluster catalog will read Checkpoint
resources and the storage backend behind the same interface. Workflow histories are not a
catalog: they expire with the namespace's retention, checkpoints do not.

Listing parses manifests with `json` into light entries and imports neither Temporal nor
pydantic, so `warmstart list` starts fast; `manifest()` loads and validates the whole one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from api.errors import CheckpointNotFoundError, DigestMismatchError
from api.naming import MANIFEST_FILE, is_checkpoint_id, require_path_element

if TYPE_CHECKING:
    from api.manifest import Manifest

STAGING = "tmp"


@dataclass(frozen=True)
class CatalogEntry:
    """One committed checkpoint version, as listed; `document` is its manifest as stored."""

    name: str
    checkpoint_id: str
    version: str
    model: str
    backend: str
    size_bytes: int
    node: str
    created_at: datetime
    location: str  # where the version lives (a directory here, a storage URI on a cluster)
    document: dict[str, Any]


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
    """Version directories of a checkpoint that hold a manifest, oldest first."""
    versions = root / require_path_element(checkpoint_id, what="checkpoint ID") / "versions"
    if not versions.is_dir():
        return []
    return sorted(
        p for p in versions.iterdir() if p.name != STAGING and (p / MANIFEST_FILE).is_file()
    )


def _entry(version_dir: Path) -> CatalogEntry | None:
    """The listing of one version, or None where its manifest is unreadable (restore says why)."""
    try:
        return entry_of(json.loads((version_dir / MANIFEST_FILE).read_bytes()), str(version_dir))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_entry(entries: list[CatalogEntry], ref: str, *, where: str) -> CatalogEntry:
    """The newest of `entries` (newest first) with checkpoint ID `ref`, else named `ref`."""
    # A 16-hex ref is an ID first; a workload may still be named like one.
    matches = [e for e in entries if is_checkpoint_id(ref) and e.checkpoint_id == ref]
    matches = matches or [e for e in entries if e.name == ref]
    if not matches:
        known = ", ".join(sorted({e.name for e in entries})) or "none"
        raise CheckpointNotFoundError(
            f"no committed checkpoint named or with ID {ref!r} in {where} (known: {known})"
        )
    return matches[0]


def entry_of(doc: dict[str, Any], location: str) -> CatalogEntry:
    """The catalog entry of a manifest document (KeyError, ValueError, TypeError if it is
    not one)."""
    return CatalogEntry(
        name=str(doc["source"]["name"]),
        checkpoint_id=str(doc["checkpoint_id"]),
        version=str(doc["version"]),
        model=str(doc["identity"]["model"]),
        backend=str(doc["identity"]["backend_framework"]),
        size_bytes=sum(int(f["size"]) for f in doc["files"]),
        node=str(doc["source"]["node"]),
        created_at=datetime.fromisoformat(str(doc["created_at"])),
        location=location,
        document=doc,
    )


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
        return sorted(found, key=lambda e: e.created_at, reverse=True)

    def find(self, ref: str) -> CatalogEntry:
        return find_entry(self.checkpoints(), ref, where=str(self.root))

    def manifest(self, entry: CatalogEntry) -> Manifest:
        return load_manifest(Path(entry.location))
