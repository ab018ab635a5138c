"""The catalog of committed checkpoints: the one interface the CLI lists and resolves them by.

Local mode reads the checkpoint root's committed manifests (a version counts only once its
`manifest.json`, the commit marker, exists); a cluster catalog will read Checkpoint
resources and the storage backend behind the same interface. Workflow histories are not a
catalog: they expire with the namespace's retention, checkpoints do not.

Reading only: no Temporal imports, so `warmstart list` starts fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from pydantic import ValidationError

from api.errors import CheckpointNotFoundError, DigestMismatchError
from api.manifest import MANIFEST_FILE, Manifest
from api.naming import is_checkpoint_id, require_path_element

STAGING = "tmp"


class Catalog(Protocol):
    def checkpoints(self) -> list[Manifest]:
        """Every committed checkpoint version, newest first."""
        ...

    def find(self, ref: str) -> Manifest:
        """The newest committed version named `ref`, or with checkpoint ID `ref`."""
        ...


def load_manifest(version_dir: Path) -> Manifest:
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


class LocalCatalog:
    """Committed checkpoints under a local checkpoint root."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def checkpoints(self) -> list[Manifest]:
        found = []
        entries = sorted(self.root.iterdir()) if self.root.is_dir() else []
        for entry in entries:
            if not (entry.is_dir() and is_checkpoint_id(entry.name)):
                continue
            for version in committed_versions(self.root, entry.name):
                try:
                    found.append(load_manifest(version))
                except (CheckpointNotFoundError, DigestMismatchError):
                    continue  # removed or damaged meanwhile: not listable, restore says why
        return sorted(found, key=lambda m: m.created_at, reverse=True)

    def find(self, ref: str) -> Manifest:
        manifests = self.checkpoints()
        by_id = is_checkpoint_id(ref)
        matches = [m for m in manifests if (m.checkpoint_id if by_id else m.source.name) == ref]
        if not matches:
            known = ", ".join(sorted({m.source.name for m in manifests})) or "none"
            raise CheckpointNotFoundError(
                f"no committed checkpoint named or with ID {ref!r} in {self.root} (known: {known})"
            )
        return matches[0]
