"""The node side of a cluster capture against a real containerd and real CRIU: the tests
play the kubelet (tests/containers.py)."""

from __future__ import annotations

import json
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from temporalio.testing import ActivityEnvironment

from activities.contracts import (
    ContainerCommitInput,
    ContainerDumpInput,
    ContainerSentinelInput,
    ContainerTarget,
    GmsSavedInput,
)
from activities.criu.command import Criu
from activities.runtime.base import ContainerRuntime, Located, init_pid_of
from activities.runtime.containerd import Containerd
from activities.runtime.pods import PodActivities
from activities.runtime.registry import RUNTIMES, runtime_for
from activities.runtime.rootfs import freezer_cgroup, thaw
from activities.storage.store import CheckpointStore
from api.errors import InvalidSpecError, WorkloadExitedError, WorkloadNotReadyError
from api.identity import CheckpointIdentity, checkpoint_id
from api.reasons import Sentinel
from tests.containers import Kubelet, needs_containerd, running_containerd
from workers.settings import CriuSettings

pytestmark = [needs_containerd, pytest.mark.timeout(120)]

IDENTITY = CheckpointIdentity(model="m/containers", backend_framework="vllm")
CKPT = checkpoint_id(IDENTITY)
# Warms up (state in memory), says ready, serves until snapshot-complete, then exits 0.
WORKLOAD = (
    "import os, time\n"
    "control = os.environ['SNAPSHOT_CONTROL_DIR']\n"
    "state = bytearray(os.urandom(1 << 20))\n"
    "open(control + '/ready-for-snapshot', 'w').close()\n"
    "beat = 0\n"
    "while not os.path.exists(control + '/snapshot-complete'):\n"
    "    beat += 1\n"
    "    open(control + '/beat', 'w').write(str(beat))\n"
    "    time.sleep(0.05)\n"
)


@pytest.fixture
def kubelet() -> Iterator[Kubelet]:
    yield from running_containerd()


def wait_for(condition: object, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def node(kubelet: Kubelet, tmp_path: Path) -> tuple[PodActivities, CheckpointStore]:
    path = CriuSettings().resolve()
    assert path is not None
    store = CheckpointStore(tmp_path / "checkpoints")
    runtime = Containerd(address=kubelet.address)
    return PodActivities(runtime=runtime, criu=Criu(path), store=store, node="gpu-1"), store


def start(kubelet: Kubelet) -> tuple[ContainerTarget, str, Path]:
    pod_uid = str(uuid.uuid4())
    cid, control = kubelet.run(pod_uid, "main", ["python3", "-c", WORKLOAD])
    wait_for(lambda: (control / "ready-for-snapshot").exists(), "the workload to be ready")
    target = ContainerTarget(
        namespace="inference", pod_name="llama-x1", pod_uid=pod_uid, container="main"
    )
    return target, cid, control


async def test_a_container_is_dumped_committed_and_released(
    kubelet: Kubelet, tmp_path: Path
) -> None:
    activities, store = node(kubelet, tmp_path)
    target, cid, control = start(kubelet)
    env = ActivityEnvironment()
    version = "20261127T130000Z-abcdef"

    await env.run(
        activities.dump_container,
        ContainerDumpInput(checkpoint_id=CKPT, version=version, target=target),
    )
    assert kubelet.status(cid) == "RUNNING"  # left running: the workload ends itself
    commit = await env.run(
        activities.commit_container,
        ContainerCommitInput(
            checkpoint_id=CKPT,
            version=version,
            identity=IDENTITY,
            target=target,
            resource_name="llama",
        ),
    )
    final = store.version_dir(CKPT, version)
    assert commit.storage_uri == final.as_uri() and commit.size_bytes > 1 << 20
    manifest = json.loads((final / "manifest.json").read_text())
    source = manifest["source"]
    assert (source["pod"], source["container"], source["node"]) == ("llama-x1", "main", "gpu-1")
    assert source["command"][0] == "python3"
    assert "--leave-running" in manifest["criu"]["options"]
    assert [fd.startswith("pipe:[") for fd in source["stdio"]] == [True, True, True]
    assert any(f["path"].startswith("criu/pages-") for f in manifest["files"])
    assert store.staged() == []
    store.verify(final, checkpoint_id=CKPT)

    await env.run(
        activities.write_container_sentinel,
        ContainerSentinelInput(target=target, sentinel=Sentinel.SNAPSHOT_COMPLETE),
    )
    assert (control / "snapshot-complete").read_text() == "done\n"
    wait_for(
        lambda: kubelet.status(cid) == "STOPPED", "the workload to exit after snapshot-complete"
    )


async def test_a_pod_snapshot_keeps_the_source_serving(kubelet: Kubelet, tmp_path: Path) -> None:
    activities, _store = node(kubelet, tmp_path)
    target, cid, control = start(kubelet)
    await ActivityEnvironment().run(
        activities.dump_container,
        ContainerDumpInput(checkpoint_id=CKPT, version="v1", target=target, leave_running=True),
    )
    before = int((control / "beat").read_text() or 0)
    wait_for(lambda: int((control / "beat").read_text() or 0) > before + 5, "the source to go on")
    assert kubelet.status(cid) == "RUNNING"


async def test_a_planted_link_does_not_redirect_the_sentinel(
    kubelet: Kubelet, tmp_path: Path
) -> None:
    activities, _store = node(kubelet, tmp_path)
    target, _cid, control = start(kubelet)
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    (control / "snapshot-complete").symlink_to(victim)  # what a hostile workload could do
    await ActivityEnvironment().run(
        activities.write_container_sentinel,
        ContainerSentinelInput(target=target, sentinel=Sentinel.SNAPSHOT_COMPLETE),
    )
    assert victim.read_text() == "untouched\n"
    assert not (control / "snapshot-complete").is_symlink()


async def test_a_pod_not_on_this_node_is_named(kubelet: Kubelet, tmp_path: Path) -> None:
    activities, store = node(kubelet, tmp_path)
    target = ContainerTarget(
        namespace="inference", pod_name="elsewhere", pod_uid="no-such-uid", container="main"
    )
    with pytest.raises(
        WorkloadExitedError,
        match=r"pod inference/elsewhere \(pod UID no-such-uid\) is not on this node",
    ):
        await ActivityEnvironment().run(
            activities.dump_container,
            ContainerDumpInput(checkpoint_id=CKPT, version="v1", target=target),
        )
    assert store.staged() == []


async def test_the_gms_saver_sentinel_is_awaited(kubelet: Kubelet, tmp_path: Path) -> None:
    activities, _store = node(kubelet, tmp_path)
    target, _cid, control = start(kubelet)
    request = GmsSavedInput(target=target, timeout_seconds=0.5)
    with pytest.raises(WorkloadNotReadyError, match=f"no gms-save-complete-{target.pod_uid}"):
        await ActivityEnvironment().run(activities.await_gms_saved, request)
    (control / f"gms-save-complete-{target.pod_uid}").write_text("done\n")
    await ActivityEnvironment().run(activities.await_gms_saved, request)


async def test_a_container_from_an_image_has_its_rootfs_diff_captured(
    kubelet: Kubelet, tmp_path: Path
) -> None:
    activities, store = node(kubelet, tmp_path)
    image = kubelet.import_image("local/workload:1")
    changes = (
        "import os, time\n"
        "open('/tmp/state.txt', 'w').write('warm')\n"
        "os.remove('/etc/warmstart-image')\n"
        "os.makedirs('/var/lib/model')\n"
        "open('/snapshot-control/ready-for-snapshot', 'w').close()\n"
        "time.sleep(120)\n"
    )
    pod_uid = str(uuid.uuid4())
    _cid, control = kubelet.run(pod_uid, "main", ["python3", "-c", changes], image=image)
    wait_for(lambda: (control / "ready-for-snapshot").exists(), "the workload to be ready")
    target = ContainerTarget(
        namespace="inference", pod_name="llama-x1", pod_uid=pod_uid, container="main"
    )
    await ActivityEnvironment().run(
        activities.dump_container,
        ContainerDumpInput(checkpoint_id=CKPT, version="v1", target=target),
    )
    staging = store.staging_dir(CKPT, "v1")
    with tarfile.open(staging / "rootfs-diff.tar") as tar:
        names = tar.getnames()
        state = tar.extractfile("tmp/state.txt")
        assert state is not None and state.read() == b"warm"
    assert "snapshot-control" not in names and not any(n.startswith("usr") for n in names)
    # New directories travel; those the overlay only copied up (as in the image) do not.
    assert {"var", "var/lib", "var/lib/model", "tmp/state.txt"} <= set(names)
    assert "tmp" not in names and "etc" not in names
    assert json.loads((staging / "deleted-files.json").read_text()) == ["/etc/warmstart-image"]


def test_a_dump_that_fails_leaves_the_container_thawed(kubelet: Kubelet, tmp_path: Path) -> None:
    """The container is frozen through its cgroup during a dump; a dump that fails (here:
    the freezer is left FROZEN as a killed CRIU would leave it) ends with it thawed."""
    _activities, _store = node(kubelet, tmp_path)
    target, cid, control = start(kubelet)
    pid = kubelet.pid(cid)
    freezer = freezer_cgroup(pid)
    if freezer is None:
        pytest.skip("no freezer cgroup visible for the container on this host")
    state = freezer / ("freezer.state" if (freezer / "freezer.state").exists() else "cgroup.freeze")
    state.write_text("FROZEN" if state.name == "freezer.state" else "1")
    before = (control / "beat").read_text()
    time.sleep(0.3)
    assert (control / "beat").read_text() == before  # frozen: no progress
    thaw(pid, freezer)
    wait_for(lambda: (control / "beat").read_text() != before, "the container to run again")
    assert target.pod_uid


async def test_a_container_the_kubelet_named_is_found_without_asking_the_runtime(
    kubelet: Kubelet,
) -> None:
    target, cid, _control = start(kubelet)
    runtime = Containerd(address=kubelet.address, state=str(kubelet.base / "state"))
    asked = await runtime.locate(target)
    named = await runtime.locate(target.model_copy(update={"container_id": cid}))
    assert named.pid == asked.pid == kubelet.pid(cid) == runtime.init_pid(cid)
    assert init_pid_of(cid) == asked.pid
    assert init_pid_of("c000000000000") == 0
    assert init_pid_of("../etc") == 0


class CgroupOnly(ContainerRuntime):
    """A second runtime behind the seam, as a CRI-O module would be: it finds a container by
    its ID in the node's cgroups alone, with no call to containerd (the pods' container IDs
    given, as CRI-O's state would give them)."""

    def __init__(self, ids: dict[str, str]) -> None:
        self.ids = ids

    async def locate(self, target: ContainerTarget) -> Located:
        container_id = self.ids.get(target.pod_uid, "")
        pid = init_pid_of(container_id)
        if not pid:
            raise WorkloadExitedError(f"pod {target.pod_uid} is not on this node")
        return Located(container_id=container_id, pid=pid, command=("from-cgroups",))


async def test_a_second_runtime_is_one_class_and_its_registration(
    kubelet: Kubelet, tmp_path: Path
) -> None:
    target, cid, _control = start(kubelet)
    RUNTIMES["cgroup-only"] = lambda _endpoint, _state: CgroupOnly({target.pod_uid: cid})
    try:
        runtime = runtime_for("cgroup-only", endpoint="", state="")
    finally:
        del RUNTIMES["cgroup-only"]
    path = CriuSettings().resolve()
    assert path is not None
    store = CheckpointStore(tmp_path / "checkpoints")
    pods = PodActivities(runtime=runtime, criu=Criu(path), store=store, node="gpu-2")
    env, version = ActivityEnvironment(), "20261206T050000Z-abcdef"

    await env.run(
        pods.dump_container,
        ContainerDumpInput(checkpoint_id=CKPT, version=version, target=target, leave_running=True),
    )
    commit = ContainerCommitInput(
        checkpoint_id=CKPT, version=version, identity=IDENTITY, target=target, resource_name="x"
    )
    await env.run(pods.commit_container, commit)
    manifest = store.verify(store.version_dir(CKPT, version), checkpoint_id=CKPT)
    assert manifest.source.command == ("from-cgroups",)  # what this runtime said
    assert manifest.source.pid == kubelet.pid(cid)
    assert kubelet.status(cid) == "RUNNING"
    with pytest.raises(InvalidSpecError, match="'cri-x': not a known container runtime"):
        runtime_for("cri-x", endpoint="", state="")
