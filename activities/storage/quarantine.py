"""Quarantine: which checkpoints failed to restore on which node class, so the next
restore there starts cold at once instead of failing the same way again.

A node class is what decides whether a restore can work: GPU model, GPU driver and CRIU
version. Entries live beside the checkpoint in the store (`<root>/<checkpointID>/
quarantine/<namespace>.<class key>.json`), so every node sharing the store (the RWX volume on
a cluster, the state directory locally) sees them; `warmstart quarantine` lists and
clears them through the control worker, which mounts that store (`queries`). An entry is
the namespace's whose restore failed: the same checkpoint ID captured in another namespace
is other versions, and is not refused for it.
"""

from __future__ import annotations

from pathlib import Path

from activities.host.files import write_atomically
from api.naming import require_path_element
from api.quarantine import NodeClass, QuarantineEntry, node_class

__all__ = ["QUARANTINE_DIR", "NodeClass", "Quarantine", "QuarantineEntry", "node_class"]
QUARANTINE_DIR = "quarantine"


class Quarantine:
    """The quarantine entries of a checkpoint store."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, checkpoint_id: str) -> Path:
        checked = require_path_element(checkpoint_id, what="checkpoint ID")
        return self.root / checked / QUARANTINE_DIR

    def _path(self, checkpoint_id: str, cls: NodeClass, namespace: str) -> Path:
        if not namespace:  # an entry recorded before entries had a namespace
            return self._dir(checkpoint_id) / f"{cls.key}.json"
        checked = require_path_element(namespace, what="namespace")
        return self._dir(checkpoint_id) / f"{checked}.{cls.key}.json"

    def find(self, checkpoint_id: str, cls: NodeClass, *, namespace: str) -> QuarantineEntry | None:
        """The entry of `namespace`'s restores of `checkpoint_id` on node class `cls`."""
        try:
            data = self._path(checkpoint_id, cls, namespace).read_bytes()
        except FileNotFoundError:
            return None
        return QuarantineEntry.model_validate_json(data)

    def record(self, entry: QuarantineEntry) -> Path:
        path = self._path(entry.checkpoint_id, entry.node_class, entry.namespace)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, entry.model_dump_json(indent=2).encode())
        return path

    def entries(self, checkpoint_id: str = "") -> list[QuarantineEntry]:
        """The entries of one checkpoint, or of all; oldest first."""
        pattern = f"{checkpoint_id or '*'}/{QUARANTINE_DIR}/*.json"
        found = []
        for path in sorted(self.root.glob(pattern)):
            try:
                found.append(QuarantineEntry.model_validate_json(path.read_bytes()))
            except (OSError, ValueError):
                continue
        return sorted(found, key=lambda entry: entry.since)

    def clear(self, checkpoint_id: str) -> list[QuarantineEntry]:
        """Remove every entry of `checkpoint_id`; returns what was removed."""
        removed = self.entries(checkpoint_id)
        for entry in removed:
            self._path(checkpoint_id, entry.node_class, entry.namespace).unlink(missing_ok=True)
        return removed
