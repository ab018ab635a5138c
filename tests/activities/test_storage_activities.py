"""The commit activity on a real filesystem: a full disk fails the capture with its reason;
a version committed held back is offered by its release."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.testing import ActivityEnvironment

from activities.contracts import CommitInput, ReleaseInput
from activities.host.layout import LaunchRecord, NodeLayout
from activities.storage.store import WORKLOAD_LOG, CheckpointStore, StorageActivities
from api.errors import CheckpointNotFoundError, DumpFailedError
from api.identity import CheckpointIdentity
from api.manifest import CriuInfo
from api.naming import MANIFEST_FILE
from api.workload import LocalWorkload

CKPT = "96429b2725761a09"
VERSION = "20261124T000000Z-aaaaaa"


def _staged(tmp_path: Path) -> tuple[StorageActivities, CheckpointStore, Path]:
    layout = NodeLayout(tmp_path / "home")
    store = CheckpointStore(layout.checkpoints)
    paths = layout.workload("llama", CKPT)
    paths.root.mkdir(parents=True)
    paths.output_log.write_text("warm\n")
    workload = LocalWorkload(name="llama", command=("serve",), cwd="/")
    paths.launch_record.write_text(
        LaunchRecord(workload=workload, pid=4242, start_ticks=7).model_dump_json()
    )
    staging = store.fresh_staging(CKPT, VERSION)
    (staging / "criu").mkdir()
    (staging / "criu" / "pages-1.img").write_bytes(b"p" * 4096)
    activities = StorageActivities(
        store=store, layout=layout, node="n", criu=CriuInfo(version="4.2.1")
    )
    return activities, store, staging


def _commit() -> CommitInput:
    identity = CheckpointIdentity(model="m", backend_framework="vllm")
    return CommitInput(
        checkpoint_id=CKPT, version=VERSION, identity=identity, namespace="local", name="llama"
    )


async def test_commit_writes_the_manifest_last_and_reports_the_size(tmp_path: Path) -> None:
    activities, store, _staging = _staged(tmp_path)
    result = await ActivityEnvironment().run(activities.commit_checkpoint, _commit())
    version_dir = store.version_dir(CKPT, VERSION)
    assert result.storage_uri == version_dir.as_uri()
    assert result.size_bytes == 4096 + len("warm\n")
    assert (version_dir / MANIFEST_FILE).is_file()
    manifest = store.verify(version_dir, checkpoint_id=CKPT)
    assert (manifest.source.pid, manifest.source.node) == (4242, "n")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="/dev/full is not available")
async def test_a_full_disk_fails_the_commit_with_its_reason(tmp_path: Path) -> None:
    activities, store, staging = _staged(tmp_path)
    # Writing the output file into the version hits a device that is always full (ENOSPC).
    (staging / WORKLOAD_LOG).symlink_to("/dev/full")
    with pytest.raises(DumpFailedError, match="cannot commit: No space left on device"):
        await ActivityEnvironment().run(activities.commit_checkpoint, _commit())
    assert not store.version_dir(CKPT, VERSION).exists()  # nothing marked complete


async def test_a_version_committed_held_back_is_offered_by_its_release(tmp_path: Path) -> None:
    """A verified cluster capture's version (decision 0045): committed held back, found by
    nothing but its verification pod's restore, offered by `release_version`; a release of
    a version deleted meanwhile says so."""
    activities, store, _staging = _staged(tmp_path)
    held = _commit().model_copy(update={"unverified": True})
    await ActivityEnvironment().run(activities.commit_checkpoint, held)
    with pytest.raises(CheckpointNotFoundError, match="is held back"):
        store.find(CKPT, VERSION)
    release = ReleaseInput(checkpoint_id=CKPT, version=VERSION)
    await ActivityEnvironment().run(activities.release_version, release)
    assert store.find(CKPT, VERSION) == store.version_dir(CKPT, VERSION)
    assert store.versions(CKPT) == [store.version_dir(CKPT, VERSION)]
    gone = ReleaseInput(checkpoint_id=CKPT, version="20261124T000000Z-bbbbbb")
    with pytest.raises(CheckpointNotFoundError, match="was deleted before its test restore"):
        await ActivityEnvironment().run(activities.release_version, gone)
