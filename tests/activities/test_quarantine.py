"""The quarantine is per namespace: one checkpoint ID may be captured in several namespaces
(each its own versions), and one namespace's failed restores never refuse another's."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from activities.pipeline import NodeGate
from activities.storage.quarantine import Quarantine
from api.errors import QuarantinedError, RestoreFailedError
from api.identity import CheckpointIdentity
from api.manifest import CriuInfo, HostInfo, Manifest, SourceInfo
from api.quarantine import NodeClass, QuarantineEntry

CKPT = "96429b2725761a09"
HOST = HostInfo(kernel="6.1.0", arch="x86_64")


def manifest(namespace: str) -> Manifest:
    return Manifest(
        checkpoint_id=CKPT,
        version="20261127T120000Z-abcdef",
        identity=CheckpointIdentity(model="m", backend_framework="vllm"),
        created_at=datetime.now(UTC),
        source=SourceInfo(node="n", namespace=namespace, name="llama"),
        criu=CriuInfo(version="4.2.1"),
        host=HOST,
        files=(),
    )


def test_one_namespaces_failures_do_not_quarantine_anothers(tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path)
    gate = NodeGate(criu_version="4.2.1", quarantine=quarantine, node="gpu-1")
    cls = gate.check(manifest("team-b"), HOST)
    gate.remember(CKPT, cls, RestoreFailedError("criu restore failed"), namespace="team-b")
    with pytest.raises(QuarantinedError, match=f"checkpoint {CKPT} is quarantined"):
        gate.check(manifest("team-b"), HOST)
    assert gate.check(manifest("inference"), HOST) == cls  # the same ID, another namespace
    [entry] = quarantine.entries(CKPT)
    assert entry.namespace == "team-b"
    assert (tmp_path / CKPT / "quarantine" / f"team-b.{cls.key}.json").is_file()


def test_an_entry_recorded_before_namespaces_is_listed_and_cleared_not_enforced(
    tmp_path: Path,
) -> None:
    quarantine = Quarantine(tmp_path)
    cls = NodeClass(gpu_model="", gpu_driver="", criu="4.2.1")
    old = QuarantineEntry(
        checkpoint_id=CKPT,
        node_class=cls,
        reason="RestoreFailed",
        message="…",
        node="gpu-1",
        since=datetime.now(UTC),
    )
    quarantine.record(old)
    assert (tmp_path / CKPT / "quarantine" / f"{cls.key}.json").is_file()
    assert quarantine.find(CKPT, cls, namespace="inference") is None
    assert quarantine.entries(CKPT) == [old]
    assert quarantine.clear(CKPT) == [old] and quarantine.entries() == []
