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
from api.quarantine import NodeClass, QuarantineEvidence, QuarantinePolicy

CKPT = "96429b2725761a09"
VERSION = "20261127T120000Z-abcdef"
HOST = HostInfo(kernel="6.1.0", arch="x86_64")


def manifest(namespace: str) -> Manifest:
    return Manifest(
        checkpoint_id=CKPT,
        version=VERSION,
        identity=CheckpointIdentity(model="m", backend_framework="vllm"),
        created_at=datetime.now(UTC),
        source=SourceInfo(node="n", namespace=namespace, name="llama"),
        criu=CriuInfo(version="4.2.1"),
        host=HOST,
        files=(),
    )


def test_one_namespaces_failures_do_not_quarantine_anothers(tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path, policy=QuarantinePolicy(min_nodes=1))
    gate = NodeGate(criu_version="4.2.1", quarantine=quarantine, node="gpu-1")
    cls = gate.check(manifest("team-b"), HOST)
    err = RestoreFailedError("criu restore failed")
    gate.remember(CKPT, VERSION, cls, err, namespace="team-b")
    with pytest.raises(QuarantinedError, match=f"checkpoint {CKPT} version {VERSION} is"):
        gate.check(manifest("team-b"), HOST)
    assert gate.check(manifest("inference"), HOST) == cls  # the same ID and version elsewhere
    [entry] = quarantine.entries(CKPT)
    assert entry.namespace == "team-b"
    assert quarantine.entries(CKPT, namespace="inference") == []
    evidence = tmp_path / CKPT / "quarantine" / "team-b" / VERSION / cls.key / "gpu-1.json"
    assert evidence.is_file()


def test_records_from_before_namespaces_are_listed_and_cleared_not_enforced(
    tmp_path: Path,
) -> None:
    quarantine = Quarantine(tmp_path, policy=QuarantinePolicy(min_nodes=1))
    cls = NodeClass(gpu_model="", gpu_driver="", criu="4.2.1")
    now = datetime.now(UTC)
    old = QuarantineEvidence(
        checkpoint_id=CKPT,
        version=VERSION,
        node_class=cls,
        node="gpu-1",
        reason="RestoreFailed",
        message="…",
        since=now,
        last=now,
    )
    quarantine.record(old)  # as a node recorded it before evidence had a namespace
    assert (tmp_path / CKPT / "quarantine" / VERSION / cls.key / "gpu-1.json").is_file()
    assert quarantine.find(CKPT, VERSION, cls, namespace="inference") is None
    gate = NodeGate(criu_version="4.2.1", quarantine=quarantine, node="gpu-2")
    assert gate.check(manifest("inference"), HOST) == cls
    [entry] = quarantine.entries(CKPT)
    assert (entry.namespace, entry.nodes) == ("", ("gpu-1",))
    assert quarantine.entries(CKPT, namespace="inference") == [entry]  # shown to each
    assert quarantine.clear(CKPT) == [entry] and quarantine.entries() == []
