"""Restoring a container's checkpoint into the standby container of another pod, against
a real containerd and real CRIU (the tests play the kubelet, tests/containers.py), and the
safe application of a root filesystem diff."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import ActivityEnvironment

from activities.contracts import (
    ContainerCommitInput,
    ContainerDumpInput,
    ContainerRestoreInput,
    ContainerTarget,
    Heartbeat,
)
from activities.criu.command import Criu
from activities.criu.lazy import LazyPages
from activities.criu.slots import RestoreSlots
from activities.gpu.nvml import GpuFacts, NodeGpus
from activities.host.processes import is_alive
from activities.pipeline import NodeGate, Stages, as_restore_failure, failure_note
from activities.runtime import chrooted, control
from activities.runtime.base import Located
from activities.runtime.containerd import Containerd
from activities.runtime.pods import PodActivities
from activities.runtime.restore import (
    RestoredProcess,
    cgroup_procs_files,
    join_cgroups,
    restore_into_container,
)
from activities.runtime.rootfs import apply_rootfs_diff, rootfs_diff
from activities.storage.quarantine import Quarantine, QuarantinePolicy
from activities.storage.store import CheckpointStore
from activities.storage.verified import VerifiedFiles
from api.errors import (
    DigestMismatchError,
    RestoreFailedError,
    WorkloadExitedError,
    WorkloadNotReadyError,
)
from api.identity import CheckpointIdentity, checkpoint_id
from api.manifest import Manifest
from api.restore_pods import STANDBY_NAME, STANDBY_SCRIPT
from tests.containers import Kubelet, needs_containerd, running_containerd
from workers.settings import CriuSettings

IDENTITY = CheckpointIdentity(model="m/restore-into", backend_framework="vllm")
CKPT = checkpoint_id(IDENTITY)
PORT = 8080
SERVER = (Path(__file__).parents[1] / "programs" / "container_token_server.py").read_text()
ARGV = ["python3", "-c", SERVER, str(PORT)]
# The standby's standby (a local equivalent of the restore pods' entrypoint): waits for
# restore-complete (then stays, as the restored process's reaper) or restore-failed (then
# starts the original command cold).
STANDBY = (
    'd="$SNAPSHOT_CONTROL_DIR"\n'
    "echo standby waiting\n"
    "while :; do\n"
    '  if [ -e "$d/restore-failed" ]; then echo standby cold; exec "$@"; fi\n'
    '  if [ -e "$d/restore-complete" ]; then echo standby restored; exec sleep 100000; fi\n'
    "  sleep 0.05\n"
    "done\n"
)
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason=f"chroot needs root (running as uid {os.geteuid()})"
)


@dataclass(frozen=True)
class Pod:
    target: ContainerTarget
    cid: str
    control: Path
    log: Path


@dataclass(frozen=True)
class Captured:
    source: Pod
    token: str
    version_dir: Path
    manifest: Manifest


@pytest.fixture
def kubelet() -> Iterator[Kubelet]:
    yield from running_containerd()


def wait_for(condition: Callable[[], object], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def run_pod(
    kubelet: Kubelet,
    tmp_path: Path,
    name: str,
    command: list[str],
    image: str,
    binds: dict[str, Path] | None = None,
) -> Pod:
    uid = str(uuid.uuid4())
    log = tmp_path / f"{name}.log"
    cid, control = kubelet.run(uid, "main", command, image=image, log=log, binds=binds)
    target = ContainerTarget(namespace="inference", pod_name=name, pod_uid=uid, container="main")
    return Pod(target=target, cid=cid, control=control, log=log)


def criu() -> Criu:
    path = CriuSettings().resolve()
    assert path is not None
    return Criu(path)


async def capture(
    kubelet: Kubelet, tmp_path: Path, image: str, binds: dict[str, Path] | None = None
) -> Captured:
    """The source pod serving its token, dumped leave-running and committed."""
    source = run_pod(kubelet, tmp_path, "llama-source", ARGV, image, binds)
    wait_for(lambda: (source.control / "ready-for-snapshot").exists(), "the source to be ready")
    # Its log line goes through the runtime's log copier: it may land after the sentinel.
    wait_for(lambda: len(source.log.read_text().split()) > 1, "the source's token in its log")
    token = source.log.read_text().split()[1]
    store = CheckpointStore(tmp_path / "checkpoints")
    runtime = Containerd(address=kubelet.address)
    node = PodActivities(runtime=runtime, criu=criu(), store=store, node="gpu-1")
    env, version = ActivityEnvironment(), "20261127T130000Z-abcdef"
    await env.run(
        node.dump_container,
        ContainerDumpInput(checkpoint_id=CKPT, version=version, target=source.target),
    )
    commit = ContainerCommitInput(
        checkpoint_id=CKPT,
        version=version,
        identity=IDENTITY,
        target=source.target,
        resource_name="llama",
    )
    await env.run(node.commit_container, commit)
    final = store.version_dir(CKPT, version)
    manifest = Manifest.model_validate_json((final / "manifest.json").read_bytes())
    return Captured(source=source, token=token, version_dir=final, manifest=manifest)


async def standby(
    kubelet: Kubelet, tmp_path: Path, image: str, binds: dict[str, Path] | None = None
) -> tuple[Pod, Located]:
    command = ["/bin/sh", "-c", STANDBY, "warmstart-standby", *ARGV]
    pod = run_pod(kubelet, tmp_path, "llama-restored", command, image, binds)
    wait_for(lambda: "standby waiting" in pod.log.read_text(), "the standby to wait")
    return pod, await Containerd(address=kubelet.address).locate(pod.target)


def get_in_netns(pid: int) -> str:
    """GET / on 127.0.0.1 from inside the network namespace of `pid`."""
    fetch = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{PORT}').read().decode())"
    done = subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", "python3", "-c", fetch],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def ns(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def ns_pids(pid: int) -> list[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return [int(v) for v in status.split("NSpid:")[1].splitlines()[0].split()]


def set_hostname(pid: int, name: str) -> None:
    subprocess.run(["nsenter", f"--uts=/proc/{pid}/ns/uts", "hostname", name], check=True)


def hostname(pid: int) -> str:
    return subprocess.run(
        ["nsenter", f"--uts=/proc/{pid}/ns/uts", "cat", "/proc/sys/kernel/hostname"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


async def restore(
    captured: Captured,
    pod: Pod,
    located: Located,
    tmp_path: Path,
    before_complete: Callable[[RestoredProcess], Awaitable[None]] | None = None,
    *,
    stages: Stages | None = None,
    timeout_seconds: float = 300.0,
) -> RestoredProcess:
    """`restore_into_container`, and on failure the restore's one failure path (as the
    node activity takes it): `restore-failed` with the reason."""
    try:
        return await restore_into_container(
            criu=criu(),
            target=pod.target,
            standby=located,
            version_dir=captured.version_dir,
            manifest=captured.manifest,
            work_dir=tmp_path / "restore-work",
            stages=stages or Stages(),
            before_complete=before_complete,
            timeout_seconds=timeout_seconds,
        )
    except BaseException as err:
        failure = as_restore_failure(err, "restore")
        control.restore_failed(located.pid, failure_note(failure))
        raise


@needs_containerd
@pytest.mark.timeout(120)
async def test_a_checkpoint_is_restored_into_the_standby_container(
    kubelet: Kubelet, tmp_path: Path
) -> None:
    image = kubelet.import_image("local/workload:1")
    captured = await capture(kubelet, tmp_path, image)
    pod, located = await standby(kubelet, tmp_path, image)
    set_hostname(located.pid, "llama-restored")  # as the kubelet names a pod's host

    seen_before_complete: list[bool] = []

    async def before_complete(restored: RestoredProcess) -> None:  # where CUDA resumes
        seen_before_complete.append(not (pod.control / "restore-complete").exists())

    stages = Stages()
    restored = await restore(captured, pod, located, tmp_path, before_complete, stages=stages)

    host, holder = restored.host_pid, located.pid
    assert [ns(host, kind) for kind in ("net", "uts", "ipc")] == [
        ns(holder, kind) for kind in ("net", "uts", "ipc")
    ]
    levels = ns_pids(host)  # a PID namespace nested under the standby's
    assert len(levels) == len(ns_pids(holder)) + 1 and levels[-2] == restored.pid
    assert Path(f"/proc/{holder}/root/proc/{restored.pid}").is_dir()
    assert Path(f"/proc/{host}/cgroup").read_text() == Path(f"/proc/{holder}/cgroup").read_text()
    assert cgroup_procs_files(host) == cgroup_procs_files(holder)
    assert hostname(holder) == "llama-restored"  # CRIU's dumped hostname did not stay
    assert (pod.control / "restore-complete").read_text() == f"{restored.pid}\n"
    wait_for(lambda: "standby restored" in pod.log.read_text(), "the standby to see it")
    # The restored process binds the standby's control directory, not the source's.
    control = os.stat(f"/proc/{host}/root/snapshot-control")
    assert (control.st_dev, control.st_ino) == (
        pod.control.stat().st_dev,
        pod.control.stat().st_ino,
    )
    # The root filesystem changes of the source are in the standby's root.
    root = Path(f"/proc/{holder}/root")
    assert (root / "var/lib/token").read_text() == f"{captured.token}\n"
    assert not (root / "etc/warmstart-image").exists()

    # It serves the source's token inside the pod's network, while the source serves on.
    assert get_in_netns(holder) == captured.token
    assert kubelet.status(captured.source.cid) == "RUNNING"
    assert get_in_netns(kubelet.pid(captured.source.cid)) == captured.token
    # Its output reaches the standby container's log (what `kubectl logs` reads).
    wait_for(lambda: f"served 1 {captured.token}" in pod.log.read_text(), "the restored output")
    stages.finish()
    assert stages.seconds.keys() == {"prepare", "criu-restore", "cuda-restore"}
    assert seen_before_complete == [True]


@needs_containerd
@pytest.mark.timeout(120)
async def test_a_failed_restore_makes_the_standby_start_cold(
    kubelet: Kubelet, tmp_path: Path
) -> None:
    image = kubelet.import_image("local/workload:1")
    captured = await capture(kubelet, tmp_path, image)
    (captured.version_dir / "criu" / "core-1.img").unlink()  # an image missing
    pod, located = await standby(kubelet, tmp_path, image)

    with pytest.raises(RestoreFailedError, match="criu restore exited with") as failed:
        await restore(captured, pod, located, tmp_path)

    assert "into container main of pod inference/llama-restored" in str(failed.value)
    assert "Restoring FAILED" in str(failed.value)  # the lines of restore.log that say why
    note = f"RestoreFailed: {failed.value}\n"
    assert (pod.control / "restore-failed").read_text() == note
    assert_started_cold(pod, located, captured)


@needs_containerd
@pytest.mark.timeout(120)
async def test_a_restore_that_hangs_is_killed_at_its_deadline(
    kubelet: Kubelet, tmp_path: Path
) -> None:
    image = kubelet.import_image("local/workload:1")
    captured = await capture(kubelet, tmp_path, image)
    for pages in (captured.version_dir / "criu").glob("pages-*.img"):
        pages.write_bytes(b"")  # CRIU 4.2's restored task then spins for ever
    pod, located = await standby(kubelet, tmp_path, image)

    with pytest.raises(RestoreFailedError, match="did not finish within 3 s"):
        await restore(captured, pod, located, tmp_path, timeout_seconds=3)

    assert "did not finish" in (pod.control / "restore-failed").read_text()
    assert_started_cold(pod, located, captured)


def standby_restorer(
    kubelet: Kubelet,
    captured: Captured,
    quarantine: Quarantine,
    lazy: LazyPages | None = None,
    slots: RestoreSlots | None = None,
) -> Any:
    """The node activity's restorer, as a cluster node composes it, over the capture's store."""
    from activities.runtime.announce import Announcements
    from activities.runtime.standby import StandbyRestorer

    store = CheckpointStore(captured.version_dir.parents[2], verified=verified_of(captured))
    runtime = Containerd(address=kubelet.address, state=str(kubelet.base / "state"))
    return StandbyRestorer(
        runtime=runtime,
        criu=criu(),
        store=store,
        gate=NodeGate(criu_version=criu().version(), quarantine=quarantine, node="gpu-2"),
        gpus=NodeGpus(known=GpuFacts()),
        work_root=store.root.parent / "restores",
        announcements=Announcements(kubelet_root=kubelet.kubelet_root, runtime=runtime),
        lazy_pages=lazy,
        slots=slots,
    )


def verified_of(captured: Captured) -> VerifiedFiles:
    """The node's record of verified files (as a node keeps it beside its store)."""
    return VerifiedFiles(captured.version_dir.parents[3] / "verified")


@needs_containerd
@pytest.mark.timeout(120)
async def test_a_version_changed_while_its_restore_waits_for_the_standby_is_refused(
    kubelet: Kubelet, tmp_path: Path
) -> None:
    """Started when its pod was scheduled, the restore verified the version before the
    standby ran; a byte changed meanwhile (same size) is found before CRIU reads it: the
    restore fails with DigestMismatch and the standby, announcing itself after, starts cold."""
    image = kubelet.import_image("local/workload:1")
    captured = await capture(kubelet, tmp_path, image)
    quarantine = Quarantine(captured.version_dir.parents[2])
    restorer = standby_restorer(kubelet, captured, quarantine)
    uid = str(uuid.uuid4())
    target = ContainerTarget(
        namespace="inference", pod_name="llama-early", pod_uid=uid, container="main", announces=True
    )
    log = tmp_path / "llama-early.log"
    started: list[str] = []

    def tamper_then_start_the_standby(beat: Heartbeat) -> None:
        if beat.stage != "await-standby" or started:
            return
        [pages] = sorted((captured.version_dir / "criu").glob("pages-*.img"))[:1]
        data = bytearray(pages.read_bytes())
        data[len(data) // 2] ^= 0xFF
        pages.write_bytes(bytes(data))
        command = ["/bin/sh", "-c", STANDBY_SCRIPT, STANDBY_NAME, *ARGV]
        cid, _control = kubelet.run(uid, "main", command, image=image, log=log)
        started.append(cid)

    env = ActivityEnvironment()
    env.on_heartbeat = tamper_then_start_the_standby
    request = ContainerRestoreInput(
        target=target, checkpoint_id=CKPT, version=captured.manifest.version
    )
    with pytest.raises(DigestMismatchError, match="does not match its SHA-256 digest"):
        await env.run(restorer.restore, request)
    assert started, "the restore waited for its standby"
    wait_for(lambda: "token " in log.read_text(), "the standby to start cold")
    assert captured.token not in log.read_text()


@needs_containerd
@pytest.mark.timeout(120)
async def test_a_pod_deleted_mid_restore_is_no_evidence_against_the_checkpoint(
    kubelet: Kubelet, tmp_path: Path
) -> None:
    image = kubelet.import_image("local/workload:1")
    captured = await capture(kubelet, tmp_path, image)
    pod, located = await standby(kubelet, tmp_path, image)
    # Any failure that counts quarantines at once here: so nothing may count.
    quarantine = Quarantine(captured.version_dir.parents[2], policy=QuarantinePolicy(min_nodes=1))
    restorer = standby_restorer(kubelet, captured, quarantine)

    def delete_the_pod(beat: Heartbeat) -> None:
        if beat.stage == "prepare":  # the gate passed: a failure from here on is judged
            kubelet.ctr("tasks", "kill", "--signal", "SIGKILL", pod.cid)
            wait_for(lambda: not is_alive(located.pid), "the standby to be gone")

    env = ActivityEnvironment()
    env.on_heartbeat = delete_the_pod
    request = ContainerRestoreInput(
        target=pod.target, checkpoint_id=CKPT, version=captured.manifest.version
    )
    with pytest.raises(WorkloadExitedError, match="the standby container is gone"):
        await env.run(restorer.restore, request)
    assert quarantine.entries(pending=True) == []


@needs_containerd
@pytest.mark.timeout(120)
async def test_a_slow_gms_loader_is_no_evidence_against_the_checkpoint(
    kubelet: Kubelet, tmp_path: Path
) -> None:
    image = kubelet.import_image("local/workload:1")
    captured = await capture(kubelet, tmp_path, image)
    pod, _ = await standby(kubelet, tmp_path, image)
    quarantine = Quarantine(captured.version_dir.parents[2], policy=QuarantinePolicy(min_nodes=1))
    restorer = standby_restorer(kubelet, captured, quarantine)
    request = ContainerRestoreInput(
        target=pod.target,
        checkpoint_id=CKPT,
        version=captured.manifest.version,
        gms_sentinel=f"gms-load-complete-{pod.target.pod_uid}",
        gms_timeout_seconds=0.5,
    )
    with pytest.raises(WorkloadNotReadyError, match=r"from the GMS loader within 0\.5 s"):
        await ActivityEnvironment().run(restorer.restore, request)
    assert (pod.control / "restore-failed").read_text().startswith("WorkloadNotReady: ")
    assert quarantine.entries(pending=True) == []


def assert_started_cold(pod: Pod, located: Located, captured: Captured) -> None:
    """The standby ran the original command: a fresh token served, nothing restored left."""
    assert not (pod.control / "restore-complete").exists()
    wait_for(lambda: "standby cold" in pod.log.read_text(), "the standby to start cold")
    wait_for(lambda: "token " in pod.log.read_text(), "the cold start to serve")
    cold = pod.log.read_text().split("token ")[1].split()[0]
    assert cold != captured.token  # a fresh start, not the checkpoint
    assert get_in_netns(located.pid) == cold
    assert _nested_children(located.pid) == []


def _nested_children(pid: int) -> list[int]:
    depth = len(ns_pids(pid))
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                levels = ns_pids(int(entry.name))
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and len(levels) > depth:
                out.append(int(entry.name))
    return out


def _diff(path: Path, entries: dict[str, bytes], deleted: list[str]) -> Path:
    with tarfile.open(path / "rootfs-diff.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (path / "deleted-files.json").write_text(json.dumps(deleted))
    return path


@needs_root
async def test_links_planted_in_the_container_root_cannot_send_the_diff_onto_the_node(
    tmp_path: Path,
) -> None:
    """The container links /var and /etc to absolute node paths: the diff's file and its
    deletion resolve inside the container's root, and the node's files stay as they were."""
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    (node_dir / "victim").write_text("node file\n")
    root = tmp_path / "root"
    inside = root / node_dir.relative_to("/")  # the same path, within the container's root
    inside.mkdir(parents=True)
    (inside / "victim").write_text("container file\n")
    (root / "var").symlink_to(node_dir)
    (root / "etc").symlink_to(node_dir)
    version = _diff(tmp_path, {"var/token": b"restored\n"}, ["/etc/victim"])

    await apply_rootfs_diff(root=root, version_dir=version, where="test")

    assert sorted(p.name for p in node_dir.iterdir()) == ["victim"]
    assert (node_dir / "victim").read_text() == "node file\n"
    assert (inside / "token").read_text() == "restored\n"
    assert not (inside / "victim").exists()


@needs_root
def test_mount_points_are_made_inside_the_root_whatever_links_it_holds(tmp_path: Path) -> None:
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    root = tmp_path / "root"
    inside = root / node_dir.relative_to("/")  # the same path, within the container's root
    inside.mkdir(parents=True)
    (root / "usr").symlink_to(node_dir)  # an absolute link to a node path
    points = {"/usr/bin/hook": False, "/run/hook.d": True}
    done = subprocess.run(
        chrooted.command("mount-points", str(root), json.dumps(points)),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert list(node_dir.iterdir()) == []
    assert (inside / "bin" / "hook").is_file() and (root / "run" / "hook.d").is_dir()
    usage = subprocess.run(chrooted.command("nothing"), capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: activities.runtime.chrooted" in usage.stderr


@needs_root
async def test_a_diff_that_cannot_be_applied_names_the_restore(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "var").mkdir(parents=True)
    (root / "var" / "token").mkdir()  # a directory where the diff has a file
    (root / "var" / "token" / "keep").write_text("x")
    version = _diff(tmp_path, {"var/token": b"restored\n"}, [])
    with pytest.raises(RestoreFailedError, match=r"^pod x: applying rootfs-diff.tar failed"):
        await apply_rootfs_diff(root=root, version_dir=version, where="pod x")


@needs_containerd
@pytest.mark.timeout(120)
async def test_a_hook_mount_at_another_random_path_is_remapped(
    kubelet: Kubelet, tmp_path: Path
) -> None:
    """As the NVIDIA container toolkit mounts its hook: a per-container random path."""
    image = kubelet.import_image("local/workload:1")
    (tmp_path / "hook-a").write_text("hook of the source\n")
    (tmp_path / "hook-b").write_text("hook of the target\n")
    old, new = "/opt/nvidia-ctk-hook-3f9a2c1b", "/opt/nvidia-ctk-hook-77e01d5a"
    captured = await capture(kubelet, tmp_path, image, {old: tmp_path / "hook-a"})
    assert json.loads((captured.version_dir / "mounts.json").read_text())["bind_mounts"]
    pod, located = await standby(kubelet, tmp_path, image, {new: tmp_path / "hook-b"})

    restored = await restore(captured, pod, located, tmp_path)

    assert get_in_netns(located.pid) == captured.token
    # The dumped mount point now binds the target's hook.
    root = Path(f"/proc/{restored.host_pid}/root")
    assert (root / old.lstrip("/")).read_text() == "hook of the target\n"


@needs_containerd
@pytest.mark.timeout(120)
async def test_a_node_worker_killed_mid_restore_leaves_nothing_half_done(
    kubelet: Kubelet, tmp_path: Path
) -> None:
    """The worker is SIGKILLed while its CRIU restores into the standby (warmstart's own
    standby script): CRIU dies with it, and when the standby is told to fall back (the
    workflow's fallback, through the next worker) it kills what was half restored before
    it starts cold: one copy of the workload, cold."""
    image = kubelet.import_image("local/workload:1")
    captured = await capture(kubelet, tmp_path, image)
    command = ["/bin/sh", "-c", STANDBY_SCRIPT, STANDBY_NAME, *ARGV]
    pod = run_pod(kubelet, tmp_path, "llama-restored", command, image)
    located = await Containerd(address=kubelet.address).locate(pod.target)
    work_dir = tmp_path / "killed-restore"
    worker = restore_worker(captured.version_dir, located.pid, work_dir)
    try:
        restoring = criu_of(work_dir, timeout=30)
        os.kill(restoring, signal.SIGSTOP)  # held mid-restore, so the kill lands there
        worker.kill()
    finally:
        worker.wait(timeout=10)
        assert worker.stdout is not None
        out = worker.stdout.read()
        worker.stdout.close()
    assert "restored" not in out
    wait_for(lambda: not Path(f"/proc/{restoring}").exists(), "CRIU to die with its worker", 10)

    control.restore_failed(located.pid, "NodeLost: the node worker died mid-restore")
    wait_for(lambda: "token " in pod.log.read_text(), "the cold start to serve")
    cold = pod.log.read_text().split("token ")[1].split()[0]
    assert cold != captured.token
    assert get_in_netns(located.pid) == cold
    assert _nested_children(located.pid) == []  # no half-restored tree beside it


def restore_worker(version_dir: Path, standby_pid: int, work_dir: Path) -> subprocess.Popen[str]:
    """A node worker process restoring `version_dir` into the standby (its own process, to
    be killed)."""
    argv = [str(version_dir), str(standby_pid), str(work_dir)]
    return subprocess.Popen(
        [sys.executable, "-m", "tests.programs.restore_worker", criu().path, *argv],
        cwd=Path(__file__).parents[2],
        stdout=subprocess.PIPE,
        text=True,
    )


def criu_of(work_dir: Path, *, timeout: float) -> int:
    """The CRIU process restoring with `work_dir` (looked for every millisecond)."""
    deadline = time.monotonic() + timeout
    marker = str(work_dir).encode()
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if (entry / "comm").read_text().strip() == "criu" and marker in (
                    entry / "cmdline"
                ).read_bytes():
                    return int(entry.name)
            except OSError:
                continue
        time.sleep(0.001)
    raise AssertionError(f"no CRIU restoring into {work_dir} within {timeout:g} s")


def test_the_diff_leaves_out_what_the_runtime_made_for_its_mounts(tmp_path: Path) -> None:
    """Mount points and the directories the runtime made above them (a target with the same
    mounts gets them again) are not carried: a diff of only those is empty, and its restore
    starts no chrooted child. What the workload wrote beside them is carried."""
    upper = tmp_path / "upper"
    for directory in ("etc/podinfo", "snapshot-control", "var/run/secrets/token"):
        (upper / directory).mkdir(parents=True)
    (upper / "etc" / "hosts").write_text("")
    staging = tmp_path / "staging"
    staging.mkdir()
    points = ["/etc/hosts", "/etc/podinfo", "/snapshot-control", "/var/run/secrets/token"]
    assert rootfs_diff(upper, staging, mount_points=points) == 0
    (upper / "etc" / "motd").write_text("written by the workload\n")
    assert rootfs_diff(upper, staging, mount_points=points) == 1
    with tarfile.open(staging / "rootfs-diff.tar") as tar:
        assert tar.getnames() == ["etc/motd"]


@needs_containerd
@pytest.mark.timeout(120)
async def test_a_lazy_restore_into_the_standby_serves_its_memory_on_fault(
    kubelet: Kubelet, tmp_path: Path
) -> None:
    """A node set for lazy restores (decision 0034): the daemon listens before CRIU, the
    restored process answers with the captured state, and the daemon exits on its own once
    every page is delivered."""
    image = kubelet.import_image("local/workload:1")
    captured = await capture(kubelet, tmp_path, image)
    pod, located = await standby(kubelet, tmp_path, image)
    lazy = LazyPages(criu=criu(), enabled=True)
    restorer = standby_restorer(kubelet, captured, Quarantine(tmp_path / "q"), lazy)
    request = ContainerRestoreInput(
        target=pod.target, checkpoint_id=CKPT, version=captured.manifest.version
    )
    result = await ActivityEnvironment().run(restorer.restore, request)

    assert list(result.stage_seconds)[-3:] == ["lazy-pages", "prepare", "criu-restore"]
    assert result.lazy_unavailable == ""
    wait_for(lambda: "standby restored" in pod.log.read_text(), "the standby to see it")
    assert get_in_netns(located.pid) == captured.token
    await lazy.wait_idle(timeout=60)  # the daemon exits once every page is delivered
    assert lazy.running == {}
    [outcome] = lazy.outcomes.values()
    assert outcome.complete and outcome.total > 0, outcome


@needs_containerd
@pytest.mark.timeout(120)
async def test_where_lazy_restores_cannot_run_the_standby_is_restored_eagerly(
    kubelet: Kubelet, tmp_path: Path
) -> None:
    image = kubelet.import_image("local/workload:1")
    captured = await capture(kubelet, tmp_path, image)
    pod, located = await standby(kubelet, tmp_path, image)
    lazy = LazyPages(criu=criu(), enabled=True, probe=lambda: "no userfaultfd here")
    restorer = standby_restorer(kubelet, captured, Quarantine(tmp_path / "q"), lazy)
    request = ContainerRestoreInput(
        target=pod.target, checkpoint_id=CKPT, version=captured.manifest.version
    )
    result = await ActivityEnvironment().run(restorer.restore, request)

    assert "lazy-unavailable" in result.stage_seconds
    assert result.lazy_unavailable == "no userfaultfd here"
    assert lazy.running == {}
    wait_for(lambda: "standby restored" in pod.log.read_text(), "the standby to see it")
    assert get_in_netns(located.pid) == captured.token


@needs_containerd
@pytest.mark.timeout(120)
async def test_a_restore_into_a_standby_waits_for_a_slot_of_the_nodes_bound(
    kubelet: Kubelet, tmp_path: Path
) -> None:
    """The node's bound on restores in CRIU at once (decision 0040) holds on the cluster
    path too: with the one slot taken, the restore waits (stage `criu-queue`), then goes."""
    image = kubelet.import_image("local/workload:1")
    captured = await capture(kubelet, tmp_path, image)
    pod, located = await standby(kubelet, tmp_path, image)
    slots = RestoreSlots(1)
    restorer = standby_restorer(kubelet, captured, Quarantine(tmp_path / "q"), slots=slots)
    request = ContainerRestoreInput(
        target=pod.target, checkpoint_id=CKPT, version=captured.manifest.version
    )
    async with slots.slot(timeout=10, what="another restore"):
        restoring = asyncio.ensure_future(ActivityEnvironment().run(restorer.restore, request))
        await wait_until_async(lambda: slots.stats().waiting == 1, "the restore to queue")
        assert not (pod.control / "restore-complete").exists()  # CRIU has not started
    result = await restoring
    assert list(result.stage_seconds)[-3:] == ["criu-queue", "prepare", "criu-restore"]
    assert slots.stats().granted == 2 and slots.stats().peak == 1
    wait_for(lambda: "standby restored" in pod.log.read_text(), "the standby to see it")
    assert get_in_netns(located.pid) == captured.token


async def wait_until_async(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@needs_containerd
@pytest.mark.timeout(60)
def test_a_process_joins_the_cgroups_of_a_container(kubelet: Kubelet, tmp_path: Path) -> None:
    """What a lazy restore's daemon does: it leaves the node worker's cgroups for the
    standby's, so it lives and dies with the pod it serves."""
    pod = run_pod(
        kubelet, tmp_path, "llama-cg", ["sleep", "60"], kubelet.import_image("local/workload:1")
    )
    standby_pid = kubelet.pid(pod.cid)
    helper = subprocess.Popen(["sleep", "60"])
    try:
        join_cgroups(helper.pid, of=standby_pid)
        theirs = Path(f"/proc/{standby_pid}/cgroup").read_text()
        assert Path(f"/proc/{helper.pid}/cgroup").read_text() == theirs
        assert pod.cid in theirs
    finally:
        helper.kill()
        helper.wait()
