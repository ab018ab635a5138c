"""Quarantine: which checkpoint versions failed to restore on which node class, on which
nodes, so that the next restore there starts cold at once instead of failing the same way
again; the rules are `api.quarantine`'s (evidence from `min_nodes` distinct nodes, each
lapsing `expiry_seconds` after its latest failure).

A node class is what decides whether a restore can work: GPU model, GPU driver and CRIU
version. Records live beside the checkpoint in the store, so every node sharing the store
(the RWX volume on a cluster, the state directory locally) sees them; `warmstart
quarantine` lists and clears them through the control worker, which mounts that store
(`queries`):

    <root>/<checkpointID>/quarantine/<namespace>/<version>/<class key>/<node>.json
                                                  one node's evidence, in the namespace
                                                  whose restore failed
    <root>/<checkpointID>/quarantine/<version>/<class key>/<node>.json
                                                  recorded before namespaces
    <root>/<checkpointID>/quarantine/<class key>.json
                                                  recorded before versions (the whole
                                                  checkpoint)

Quarantines are per namespace: one checkpoint ID may be captured in several namespaces
(each owns its own versions), and one namespace's failed restores never refuse another's.
Records from before namespaces cannot say whose they are: they are listed, cleared and
swept, never enforced (decision 0023).

Each node writes only its own evidence file (atomically), so nodes sharing the store never
overwrite each other's. Lapsed records are ignored by every reader, and removed when a node
records evidence of that checkpoint and by retention's sweep (`sweep_lapsed`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from activities.host.files import write_atomically
from api.naming import require_path_element
from api.quarantine import (
    NodeClass,
    QuarantineEntry,
    QuarantineEvidence,
    QuarantinePolicy,
    judge,
    legacy_entry,
    node_class,
)

__all__ = [
    "QUARANTINE_DIR",
    "NodeClass",
    "Quarantine",
    "QuarantineEntry",
    "QuarantineEvidence",
    "QuarantinePolicy",
    "node_class",
]
QUARANTINE_DIR = "quarantine"
log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


class Quarantine:
    """The quarantine records of a checkpoint store, judged by `policy`."""

    def __init__(
        self,
        root: Path,
        *,
        policy: QuarantinePolicy | None = None,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.root = root
        self.policy = policy or QuarantinePolicy()
        self._clock = clock

    def _dir(self, checkpoint_id: str) -> Path:
        checked = require_path_element(checkpoint_id, what="checkpoint ID")
        return self.root / checked / QUARANTINE_DIR

    def _evidence_dir(
        self, checkpoint_id: str, version: str, cls: NodeClass, namespace: str
    ) -> Path:
        directory = self._dir(checkpoint_id)
        if namespace:  # empty: recorded before namespaces (read, never written by a restore)
            directory /= require_path_element(namespace, what="namespace")
        return directory / require_path_element(version, what="checkpoint version") / cls.key

    def find(
        self, checkpoint_id: str, version: str, cls: NodeClass, *, namespace: str
    ) -> QuarantineEntry | None:
        """The quarantine that refuses `namespace`'s restores of `version` of the checkpoint
        on `cls`, if any. Records from before namespaces refuse nothing (whose they were is
        unknown, and one namespace's failures must not refuse another's)."""
        if not namespace:
            return None
        directory = self._evidence_dir(checkpoint_id, version, cls, namespace)
        found = [e for p in _files(directory, "*.json") if (e := _evidence(p)) is not None]
        return next((e for e in judge(found, self.policy, now=self._clock()) if e.active), None)

    def record(self, evidence: QuarantineEvidence) -> QuarantineEntry:
        """Add a node's failure to its evidence (kept while it has not lapsed) and return
        where the version now stands on that class in its namespace (active, or pending)."""
        directory = self._evidence_dir(
            evidence.checkpoint_id, evidence.version, evidence.node_class, evidence.namespace
        )
        path = directory / f"{require_path_element(evidence.node, what='node name')}.json"
        held = _evidence(path)
        if held is not None and held.last + self.policy.expiry > evidence.last:
            evidence = evidence.model_copy(
                update={"since": held.since, "failures": held.failures + 1}
            )
        directory.mkdir(parents=True, exist_ok=True)
        write_atomically(path, evidence.model_dump_json(indent=2).encode())
        with contextlib.suppress(OSError):
            self.sweep_lapsed(evidence.checkpoint_id)
        found = [e for p in _files(directory, "*.json") if (e := _evidence(p)) is not None]
        judged = judge(found, self.policy, now=self._clock())
        # Evidence recorded as lapsed already (an old failure) stands as it stood then.
        return judged[0] if judged else judge([evidence], self.policy, now=evidence.last)[0]

    def entries(
        self, checkpoint_id: str = "", *, pending: bool = False, namespace: str | None = None
    ) -> list[QuarantineEntry]:
        """The quarantines of one checkpoint, or of all (with `pending`, the evidence that
        is not one yet too), not lapsed; oldest first. With `namespace`, only that
        namespace's and those recorded before namespaces."""
        now = self._clock()
        found: list[QuarantineEntry] = []
        for directory in self._dirs(checkpoint_id):
            for path in _files(directory, "*.json"):
                legacy = _legacy(path)
                entry = legacy_entry(legacy, self.policy, now=now) if legacy else None
                found += [entry] if entry is not None else []
            evidence = [e for p in _evidence_files(directory) if (e := _evidence(p))]
            found += [e for e in judge(evidence, self.policy, now=now) if pending or e.active]
        if namespace is not None:
            found = [entry for entry in found if entry.namespace in (namespace, "")]
        return sorted(found, key=lambda entry: entry.since)

    def clear(self, checkpoint_id: str) -> list[QuarantineEntry]:
        """Remove every record of `checkpoint_id` (quarantines, pending and lapsed
        evidence); returns the quarantines and pending evidence that were in effect."""
        removed = self.entries(checkpoint_id, pending=True)
        directory = self._dir(checkpoint_id)
        for path in _files(directory, "*.json"):
            path.unlink(missing_ok=True)
        for version in _files(directory, "*"):
            if version.is_dir():
                shutil.rmtree(version, ignore_errors=True)
        with contextlib.suppress(OSError):
            directory.rmdir()
        return removed

    def lapsed(self, checkpoint_id: str = "") -> list[Path]:
        """Record files (of one checkpoint, or of all) that no longer count."""
        now = self._clock()
        found = []
        for directory in self._dirs(checkpoint_id):
            for path in _files(directory, "*.json"):
                legacy = _legacy(path)
                if legacy is not None and legacy_entry(legacy, self.policy, now=now) is None:
                    found.append(path)
            for path in _evidence_files(directory):
                evidence = _evidence(path)
                if evidence is not None and evidence.last + self.policy.expiry <= now:
                    found.append(path)
        return found

    def sweep_lapsed(self, checkpoint_id: str = "") -> list[Path]:
        """Remove the lapsed record files (and directories left empty); returns them."""
        removed = self.lapsed(checkpoint_id)
        for path in removed:
            path.unlink(missing_ok=True)
            for parent in path.parents:
                if parent.name == QUARANTINE_DIR:
                    break
                with contextlib.suppress(OSError):
                    parent.rmdir()  # only when empty
        return removed

    def _dirs(self, checkpoint_id: str) -> list[Path]:
        if checkpoint_id:
            return [self._dir(checkpoint_id)]
        return sorted(self.root.glob(f"*/{QUARANTINE_DIR}"))


def _files(directory: Path, pattern: str) -> Iterator[Path]:
    try:
        yield from sorted(directory.glob(pattern))
    except OSError:
        return


def _evidence_files(directory: Path) -> list[Path]:
    """Evidence files: `<namespace>/<version>/<class key>/<node>.json`, and
    `<version>/<class key>/<node>.json` recorded before namespaces."""
    return [*_files(directory, "*/*/*/*.json"), *_files(directory, "*/*/*.json")]


def _legacy(path: Path) -> QuarantineEntry | None:
    """An entry file recorded before versions and evidence (`<class key>.json`)."""
    if path.is_dir():
        return None
    try:
        return QuarantineEntry.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("quarantine record %s ignored: %s", path, err)
        return None


def _evidence(path: Path) -> QuarantineEvidence | None:
    try:
        return QuarantineEvidence.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("quarantine evidence %s ignored: %s", path, err)
        return None
