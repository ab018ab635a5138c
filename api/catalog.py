"""A committed checkpoint version as catalogs list it, found by name or checkpoint ID; and
its summary as a short token, which an object store's index keeps in an object key so that
listing the index answers `warmstart list` without reading any manifest.

Light on purpose (standard library only): the CLI lists with it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from api.errors import CheckpointNotFoundError
from api.naming import is_checkpoint_id

_TOKEN_FORMAT = "1"


@dataclass(frozen=True)
class CatalogEntry:
    """One committed checkpoint version, as listed (its manifest is read only for details)."""

    name: str
    checkpoint_id: str
    version: str
    model: str
    backend: str
    size_bytes: int
    node: str
    namespace: str
    created_at: datetime
    location: str  # where the version lives: a directory, or its store's URI

    def summary(self) -> dict[str, object]:
        """What `warmstart list -o json` prints of it."""
        return {
            "name": self.name,
            "checkpoint_id": self.checkpoint_id,
            "version": self.version,
            "model": self.model,
            "backend": self.backend,
            "size_bytes": self.size_bytes,
            "node": self.node,
            "namespace": self.namespace,
            "created_at": self.created_at.isoformat(),
            "location": self.location,
        }


def entry_of(doc: Mapping[str, Any], location: str) -> CatalogEntry:
    """The entry of a manifest document (KeyError, ValueError, TypeError if it is not one)."""
    return CatalogEntry(
        name=str(doc["source"]["name"]),
        checkpoint_id=str(doc["checkpoint_id"]),
        version=str(doc["version"]),
        model=str(doc["identity"]["model"]),
        backend=str(doc["identity"]["backend_framework"]),
        size_bytes=sum(int(f["size"]) for f in doc["files"]),
        node=str(doc["source"]["node"]),
        namespace=str(doc["source"].get("namespace", "")),
        created_at=datetime.fromisoformat(str(doc["created_at"])),
        location=location,
    )


def entry_token(entry: CatalogEntry) -> str:
    """The listed fields an ID and version do not give, as one key-safe path element
    (`1.` and URL-safe base64 of a JSON array)."""
    fields = [
        entry.name,
        entry.model,
        entry.backend,
        entry.size_bytes,
        entry.node,
        entry.namespace,
        entry.created_at.isoformat(),
    ]
    packed = json.dumps(fields, separators=(",", ":")).encode()
    return f"{_TOKEN_FORMAT}.{base64.urlsafe_b64encode(packed).decode().rstrip('=')}"


def entry_from_token(
    token: str, *, checkpoint_id: str, version: str, location: str
) -> CatalogEntry | None:
    """The entry `entry_token` packed, or None for a token it did not write."""
    form, _, packed = token.partition(".")
    if form != _TOKEN_FORMAT or not packed:
        return None
    try:
        raw = base64.urlsafe_b64decode(packed + "=" * (-len(packed) % 4))
        name, model, backend, size, node, namespace, created = json.loads(raw)
        return CatalogEntry(
            name=str(name),
            checkpoint_id=checkpoint_id,
            version=version,
            model=str(model),
            backend=str(backend),
            size_bytes=int(size),
            node=str(node),
            namespace=str(namespace),
            created_at=datetime.fromisoformat(str(created)),
            location=location,
        )
    except (ValueError, TypeError):
        return None


def newest_first(entries: Sequence[CatalogEntry]) -> list[CatalogEntry]:
    return sorted(entries, key=lambda e: (e.created_at, e.version), reverse=True)


def find_entry(entries: Sequence[CatalogEntry], ref: str, *, where: str) -> CatalogEntry:
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
