"""A verified capture's test restore puts the workload's state back as the capture left it
(the restore itself is tested with real CRIU in tests/test_verified_capture.py)."""

from __future__ import annotations

import os
from pathlib import Path

from activities.host.layout import NodeLayout
from activities.local.verify import _WorkloadState


def _tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
    }


def test_the_workload_state_is_put_back_as_the_capture_left_it(tmp_path: Path) -> None:
    layout = NodeLayout(tmp_path)
    paths = layout.workload("llama", "96429b2725761a09")
    paths.control_dir.mkdir(parents=True)
    (paths.control_dir / "snapshot-complete").write_bytes(b"")
    paths.output_log.write_bytes(b"loading weights\n")
    (paths.root / "output.log.previous").write_bytes(b"an earlier run\n")
    paths.launch_record.write_bytes(b'{"pid": 7}')
    restores = tmp_path / "restores" / "llama"
    restores.parent.mkdir()  # the node's, there since its first restore
    before = _tree(tmp_path)

    state = _WorkloadState(paths, restores)
    # What a restore does: the output file and its previous copy replaced by new files (the
    # restored process then appends to the new one), sentinels cleared and written, a
    # record, a lock, its work directory's parent.
    fresh = paths.root / ".fresh"
    fresh.write_bytes(b"loading weights\n")
    os.replace(paths.output_log, paths.root / "output.log.previous")
    os.replace(fresh, paths.output_log)
    with paths.output_log.open("ab") as out:
        out.write(b"serving\n")
    (paths.control_dir / "snapshot-complete").unlink()
    (paths.control_dir / "restore-complete").write_bytes(b"4242")
    (paths.control_dir / "restore-context.json").write_bytes(b"{}")
    paths.restored_record.write_bytes(b'{"pid": 4242}')
    paths.restore_lock.write_bytes(b"")
    (restores / "0123").mkdir(parents=True)
    (restores / "0123").rmdir()  # the restore's work directory, removed by the restore

    state.put_back()
    assert _tree(tmp_path) == before


def test_a_restores_directory_that_was_there_stays(tmp_path: Path) -> None:
    paths = NodeLayout(tmp_path).workload("llama", "96429b2725761a09")
    paths.control_dir.mkdir(parents=True)
    restores = tmp_path / "restores" / "llama"
    (restores / "another-restore").mkdir(parents=True)
    state = _WorkloadState(paths, restores)
    state.put_back()
    assert (restores / "another-restore").is_dir()
    assert not (paths.root / _WorkloadState.KEPT).exists()
