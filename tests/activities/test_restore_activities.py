"""The restore activity against a fake criu: stages, hand-over, and the cold-start fall-back."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import signal
import socket
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import ActivityEnvironment

from activities.contracts import Heartbeat, RestoredWorkload, RestoreInput
from activities.criu.command import Criu
from activities.gpu.nvml import Gpu, GpuFacts, NodeGpus
from activities.host.layout import NodeLayout
from activities.host.processes import is_alive, terminate
from activities.local.restore import RestoreActivities
from activities.storage.quarantine import (
    NodeClass,
    Quarantine,
    QuarantineEvidence,
    QuarantinePolicy,
)
from activities.storage.store import WORKLOAD_LOG, CheckpointStore, digest_tree
from api.errors import (
    AlreadyRunningError,
    CheckpointNotFoundError,
    DigestMismatchError,
    IncompatibleError,
    InvalidSpecError,
    QuarantinedError,
    RestoreFailedError,
)
from api.identity import CheckpointIdentity
from api.manifest import CriuInfo, GpuDevice, HostInfo, Manifest, SourceInfo
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(30)

CKPT = "96429b2725761a09"
VERSION = "20261124T000000Z-aaaaaa"
OUTPUT = "loading weights\nwarm: 50 rounds\n"
RESTORE_ERROR = "(00.012) Error (criu/cr-restore.c:1481): Can't fork for 4242: File exists"
OTHER_ARCH = "s390x" if platform.machine() != "s390x" else "aarch64"


@dataclass
class Node:
    """A node's state directory with one committed checkpoint, and the restored pid files."""

    tmp: Path
    layout: NodeLayout
    store: CheckpointStore
    version_dir: Path
    source: SourceInfo

    @property
    def control_dir(self) -> Path:
        return Path(self.source.control_dir)

    @property
    def criu_calls(self) -> Path:
        return self.tmp / "criu-calls"

    def criu(self, restore_body: str) -> Criu:
        """A fake criu; `restore_body` runs with $images, $work, $log and $pidfile from the argv.

        Parsed by flag, as `Criu.restore_command` builds it: `criu restore --images-dir DIR
        --work-dir DIR --log-file restore.log --pidfile FILE --restore-detached`.
        """
        script = self.tmp / "fake-criu"
        script.write_text(
            textwrap.dedent(
                f"""\
                #!/bin/sh
                [ "$1" = --version ] && echo "Version: 4.2.1" && exit 0
                [ "$1" = restore ] || exit 64
                shift
                while [ $# -gt 0 ]; do
                    case $1 in
                        --images-dir) images=$2; shift 2 ;;
                        --work-dir) work=$2; shift 2 ;;
                        --log-file) log=$2; shift 2 ;;
                        --pidfile) pidfile=$2; shift 2 ;;
                        --restore-detached) detached=1; shift ;;
                        *) shift ;;
                    esac
                done
                [ -d "$images" ] && [ -d "$work" ] && [ -n "$pidfile" ] || exit 65
                [ "$log" = restore.log ] && [ "$detached" = 1 ] || exit 66
                echo "$images" >>{self.criu_calls}
                """
            )
            + textwrap.dedent(restore_body)
        )
        script.chmod(0o755)
        return Criu(str(script))

    def activities(
        self,
        criu: Criu,
        gpus: GpuFacts | None = None,
        *,
        node: str = "local",
        quarantine: Quarantine | None = None,
    ) -> RestoreActivities:
        """The restore activities of node `node` sharing this node's store (the RWX volume
        a cluster's nodes share), judging the quarantine by `quarantine`'s policy."""
        node_gpus = NodeGpus(known=gpus or GpuFacts())
        return RestoreActivities(
            criu=criu,
            store=self.store,
            layout=self.layout,
            gpus=node_gpus,
            node=node,
            quarantine=quarantine,
        )


def commit_checkpoint(
    tmp: Path,
    *,
    version: str = VERSION,
    arch: str = platform.machine(),
    health_url: str | None = None,
    host: dict[str, Any] | None = None,
    **source_paths: str,
) -> Node:
    layout = NodeLayout(tmp / "home")
    store = CheckpointStore(layout.checkpoints)
    staging = store.fresh_staging(CKPT, version)
    (staging / "criu").mkdir()
    (staging / "criu" / "pages-1.img").write_bytes(bytes(range(256)) * 64)
    (staging / "criu" / "core-1.img").write_bytes(b"core")
    (staging / WORKLOAD_LOG).write_text(OUTPUT)
    workload = layout.workload("llama", CKPT)
    source = SourceInfo(
        node="n",
        namespace="local",
        name="llama",
        command=("python3", "worker.py"),
        cwd=str(tmp / "cwd"),
        pid=4242,
        health_url=health_url,
        **(
            {"control_dir": str(workload.control_dir), "log_path": str(workload.output_log)}
            | source_paths
        ),
    )
    manifest = Manifest(
        checkpoint_id=CKPT,
        version=version,
        identity=CheckpointIdentity(model="m", backend_framework="vllm"),
        created_at=datetime.now(UTC),
        source=source,
        criu=CriuInfo(version="4.2.1"),
        host=HostInfo(kernel=platform.release(), arch=arch, **(host or {})),
        files=digest_tree(staging),
    )
    return Node(tmp, layout, store, store.commit(staging, manifest), source)


def request(*, version: str = VERSION, timeout: float = 5.0) -> RestoreInput:
    return RestoreInput(
        checkpoint_id=CKPT, version=version, name="llama", answer_timeout_seconds=timeout
    )


def stages(beats: list[tuple[object, ...]]) -> list[str]:
    found = []
    for details in beats:
        assert len(details) == 1
        beat = details[0]
        assert isinstance(beat, Heartbeat)
        found.append(beat.stage)
    return found


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return commit_checkpoint(tmp_path)


@pytest.fixture
def restored_pids(tmp_path: Path) -> Iterator[Path]:
    """Where the fake criu records the pid it 'restored'; that process is killed afterwards."""
    record = tmp_path / "restored-pid"
    yield record
    if record.is_file() and is_alive(pid := int(record.read_text())):
        os.kill(pid, signal.SIGKILL)


def restoring_a_sleeper(record: Path) -> str:
    """A criu restore that leaves a live process behind, detached, as criu's would be."""
    return f"""\
        sleep 300 </dev/null >/dev/null 2>&1 &
        echo $! >{record}
        echo $! >"$pidfile"
        echo "(00.020) Restore finished successfully" >"$work/$log"
        """


async def test_restore_hands_over_a_live_process_and_reports_its_stages(
    node: Node, restored_pids: Path
) -> None:
    (node.control_dir).mkdir(parents=True)
    (node.control_dir / "restore-failed").write_text("stale\n")  # from an earlier attempt
    env = ActivityEnvironment()
    beats: list[tuple[object, ...]] = []
    env.on_heartbeat = lambda *details: beats.append(details)
    activities = node.activities(node.criu(restoring_a_sleeper(restored_pids)))

    result = await env.run(activities.restore_checkpoint, request(version=""))

    pid = int(restored_pids.read_text())
    assert isinstance(result, RestoredWorkload)
    assert result.pid == pid
    assert is_alive(pid)
    assert result.version == VERSION
    assert list(result.stage_seconds) == ["verify", "prepare", "criu-restore", "await-answer"]
    assert all(seconds >= 0 for seconds in result.stage_seconds.values())
    assert stages(beats) == ["verify", "prepare", "criu-restore", "await-answer"]
    assert sorted(os.listdir(node.control_dir)) == ["restore-complete", "restore-context.json"]
    assert Path(node.source.log_path).read_text() == OUTPUT  # CRIU finds it at its dumped size
    assert not Path(node.source.cwd).exists()  # a manifest's cwd is never created
    assert node.criu_calls.read_text() == f"{node.version_dir / 'criu'}\n"


async def test_failing_criu_restore_falls_back_to_a_cold_start(node: Node) -> None:
    (node.control_dir).mkdir(parents=True)
    (node.control_dir / "restore-complete").write_text("done\n")  # from an earlier restore
    env = ActivityEnvironment()
    beats: list[tuple[object, ...]] = []
    env.on_heartbeat = lambda *details: beats.append(details)
    criu = node.criu(
        f"""\
        {{
            echo "(00.010) Restoring task 4242"
            echo "{RESTORE_ERROR}"
        }} >"$work/$log"
        exit 1
        """
    )

    with pytest.raises(RestoreFailedError) as caught:
        await env.run(node.activities(criu).restore_checkpoint, request())

    message = str(caught.value)
    assert message.startswith(
        f"restore of llama from checkpoint {CKPT} version {VERSION} failed: "
        "criu restore exited with 1:"
    )
    assert RESTORE_ERROR in message
    assert caught.value.reason == "RestoreFailed"
    assert stages(beats) == ["verify", "prepare", "criu-restore"]
    assert sorted(os.listdir(node.control_dir)) == ["restore-context.json", "restore-failed"]
    reason = (node.control_dir / "restore-failed").read_text()
    assert reason.startswith("RestoreFailed: criu restore exited with 1:")
    assert RESTORE_ERROR in reason


async def test_a_restored_process_that_exits_is_not_handed_over(node: Node) -> None:
    criu = node.criu(
        """\
        true </dev/null >/dev/null 2>&1 &
        echo $! >"$pidfile"
        wait
        """
    )

    with pytest.raises(RestoreFailedError, match=r"restored process \d+ exited$"):
        await ActivityEnvironment().run(node.activities(criu).restore_checkpoint, request())

    # restore-complete was written after criu restored; the fall-back takes it back.
    assert sorted(os.listdir(node.control_dir)) == ["restore-context.json", "restore-failed"]
    assert (node.control_dir / "restore-failed").read_text().startswith("RestoreFailed: ")


async def test_a_restored_process_that_does_not_answer_is_stopped(
    tmp_path: Path, restored_pids: Path
) -> None:
    url = f"http://127.0.0.1:{closed_port()}/healthz"
    node = commit_checkpoint(tmp_path, health_url=url)
    criu = node.criu(restoring_a_sleeper(restored_pids))

    with pytest.raises(RestoreFailedError, match=re.escape(f"did not answer {url} within 0.3 s")):
        await ActivityEnvironment().run(
            node.activities(criu).restore_checkpoint, request(timeout=0.3)
        )

    assert not is_alive(int(restored_pids.read_text()))
    assert sorted(os.listdir(node.control_dir)) == ["restore-context.json", "restore-failed"]


async def test_a_damaged_image_is_refused_by_name_and_falls_back_to_a_cold_start(
    node: Node,
) -> None:
    node.control_dir.mkdir(parents=True)
    (node.control_dir / "restore-complete").write_text("done\n")  # from an earlier restore
    pages = node.version_dir / "criu" / "pages-1.img"
    data = bytearray(pages.read_bytes())
    data[100:104] = bytes(b ^ 0xFF for b in data[100:104])
    pages.write_bytes(bytes(data))

    with pytest.raises(DigestMismatchError) as caught:
        await ActivityEnvironment().run(
            node.activities(node.criu("exit 0\n")).restore_checkpoint, request()
        )

    problem = f"checkpoint {CKPT} version {VERSION}: criu/pages-1.img does not match its SHA-256"
    assert problem in str(caught.value)
    assert caught.value.reason == "DigestMismatch"
    assert not node.criu_calls.exists()
    assert sorted(os.listdir(node.control_dir)) == ["restore-failed"]
    assert problem in (node.control_dir / "restore-failed").read_text()


async def test_a_failure_names_the_version_when_restoring_the_newest(node: Node) -> None:
    with pytest.raises(RestoreFailedError) as caught:
        await ActivityEnvironment().run(
            node.activities(node.criu("exit 1\n")).restore_checkpoint, request(version="")
        )
    assert f"from checkpoint {CKPT} version {VERSION} failed" in str(caught.value)


async def test_a_checkpoint_from_another_architecture_is_incompatible(tmp_path: Path) -> None:
    node = commit_checkpoint(tmp_path, arch=OTHER_ARCH)
    env = ActivityEnvironment()
    beats: list[tuple[object, ...]] = []
    env.on_heartbeat = lambda *details: beats.append(details)

    with pytest.raises(IncompatibleError) as caught:
        await env.run(node.activities(node.criu("exit 0\n")).restore_checkpoint, request())

    problem = (
        f"checkpoint {CKPT} needs CPU architecture {OTHER_ARCH} (this node: {platform.machine()})"
    )
    assert str(caught.value) == (
        f"restore of llama from checkpoint {CKPT} version {VERSION} failed: {problem}"
    )
    assert caught.value.reason == "Incompatible"
    assert stages(beats) == ["verify"]
    assert not node.criu_calls.exists()
    assert sorted(os.listdir(node.control_dir)) == ["restore-failed"]
    assert (node.control_dir / "restore-failed").read_text() == f"Incompatible: {problem}\n"


async def test_an_unknown_version_is_not_found(node: Node) -> None:
    with pytest.raises(CheckpointNotFoundError, match=f"checkpoint {CKPT} has no version v9"):
        await ActivityEnvironment().run(
            node.activities(node.criu("exit 0\n")).restore_checkpoint, request(version="v9")
        )
    assert not node.criu_calls.exists()
    # The manifest was never read: the node's own layout says where the workload waits.
    control_dir = node.layout.workload("llama", CKPT).control_dir
    assert control_dir == node.control_dir
    assert os.listdir(control_dir) == ["restore-failed"]
    assert (control_dir / "restore-failed").read_text().startswith("CheckpointNotFound: ")


@pytest.mark.parametrize("field", ["control_dir", "log_path"])
async def test_a_manifest_cannot_point_the_node_outside_its_state(
    tmp_path: Path, field: str
) -> None:
    outside = tmp_path / "elsewhere" / "target"
    node = commit_checkpoint(tmp_path, **{field: str(outside)})

    with pytest.raises(InvalidSpecError, match=f"manifest {field} '{outside}' is outside"):
        await ActivityEnvironment().run(
            node.activities(node.criu("exit 1")).restore_checkpoint, request()
        )

    assert not (tmp_path / "elsewhere").exists()
    standby = node.layout.workload("llama", CKPT).control_dir  # told by the node's own layout
    assert (standby / "restore-failed").read_text().startswith("InvalidSpec: ")


async def test_two_restores_of_one_workload_started_together_run_one(
    node: Node, restored_pids: Path
) -> None:
    slow = "sleep 0.5\n" + restoring_a_sleeper(restored_pids)
    activities = node.activities(node.criu(slow))
    outcomes = await asyncio.gather(
        ActivityEnvironment().run(activities.restore_checkpoint, request()),
        ActivityEnvironment().run(activities.restore_checkpoint, request()),
        return_exceptions=True,
    )
    [restored] = [o for o in outcomes if isinstance(o, RestoredWorkload)]
    [refused] = [o for o in outcomes if not isinstance(o, RestoredWorkload)]
    assert isinstance(refused, AlreadyRunningError)
    assert "another restore of it is in progress" in str(refused)
    assert restored.pid == int(restored_pids.read_text())
    # The refused one left the live instance's control directory alone.
    assert sorted(os.listdir(node.control_dir)) == ["restore-complete", "restore-context.json"]


async def test_a_live_restored_instance_refuses_another_until_it_stops(
    node: Node, restored_pids: Path
) -> None:
    activities = node.activities(node.criu(restoring_a_sleeper(restored_pids)))
    first = await ActivityEnvironment().run(activities.restore_checkpoint, request())

    with pytest.raises(
        AlreadyRunningError, match=f"already runs as pid {first.pid} \\(restored\\)"
    ):
        await ActivityEnvironment().run(activities.restore_checkpoint, request())
    assert sorted(os.listdir(node.control_dir)) == ["restore-complete", "restore-context.json"]

    assert await terminate(first.pid, grace_seconds=0.1)
    second = await ActivityEnvironment().run(activities.restore_checkpoint, request())
    assert second.pid != first.pid


H100 = {
    "gpu_driver": "570.86.15",
    "cuda_version": "12.8",
    "gpus": (
        GpuDevice(index=0, uuid="GPU-11111111-1111-1111-1111-111111111111", name="NVIDIA H100"),
        GpuDevice(index=1, uuid="GPU-22222222-2222-2222-2222-222222222222", name="NVIDIA H100"),
    ),
}


def gpus(count: int, *, name: str = "NVIDIA H100", driver: str = "570.86.15") -> GpuFacts:
    devices = tuple(Gpu(i, f"GPU-{i:08d}-0000-0000-0000-000000000000", name) for i in range(count))
    return GpuFacts(driver=driver, cuda="12.8", devices=devices, source="NVML")


@pytest.mark.parametrize(
    ("here", "problem"),
    [
        (GpuFacts(), "2 GPU(s) NVIDIA H100 (this node: no GPU information)"),
        (gpus(1), "2 GPU(s) (this target: 1)"),
        (gpus(2, name="NVIDIA A100"), "GPU model NVIDIA H100 (this node: NVIDIA A100)"),
        (
            gpus(2, driver="580.1"),
            "GPU driver 570.86.15 / CUDA 12.8 (this node: 580.1 / CUDA 12.8)",
        ),
    ],
)
async def test_a_gpu_checkpoint_is_refused_on_a_mismatched_node_before_any_byte_is_read(
    tmp_path: Path, here: GpuFacts, problem: str
) -> None:
    node = commit_checkpoint(tmp_path, host=H100)
    (node.version_dir / "criu" / "pages-1.img").write_bytes(b"damaged")  # never read

    with pytest.raises(IncompatibleError) as caught:
        await ActivityEnvironment().run(
            node.activities(node.criu("exit 0\n"), here).restore_checkpoint, request()
        )

    assert str(caught.value).endswith(f": checkpoint {CKPT} needs {problem}")
    assert not node.criu_calls.exists()
    assert (node.control_dir / "restore-failed").read_text().startswith("Incompatible: ")


async def test_a_gpu_checkpoint_restores_where_its_gpus_match(
    tmp_path: Path, restored_pids: Path
) -> None:
    node = commit_checkpoint(tmp_path, host=H100)
    run = node.activities(node.criu(restoring_a_sleeper(restored_pids)), gpus(8))

    restored = await ActivityEnvironment().run(run.restore_checkpoint, request())

    assert restored.pid == int(restored_pids.read_text())


def calls(node: Node) -> int:
    """How many times the fake criu was run to restore."""
    return len(node.criu_calls.read_text().splitlines()) if node.criu_calls.exists() else 0


async def fail_on(node: Node, name: str) -> None:
    """A restore of VERSION on node `name` that CRIU fails (it runs: not refused)."""
    before = calls(node)
    with pytest.raises(RestoreFailedError):
        await ActivityEnvironment().run(
            node.activities(node.criu("exit 1\n"), node=name).restore_checkpoint, request()
        )
    assert calls(node) == before + 1
    (node.control_dir / "restore-failed").unlink()


async def test_failures_on_two_nodes_quarantine_the_version_on_their_class_until_cleared(
    node: Node, restored_pids: Path
) -> None:
    quarantine = Quarantine(node.store.root)
    # One node failing, again and again, is pending evidence: it refuses nothing.
    await fail_on(node, "gpu-1")
    await fail_on(node, "gpu-1")
    assert quarantine.entries(CKPT) == []
    [pending] = quarantine.entries(CKPT, pending=True)
    assert (pending.active, pending.version, pending.nodes) == (False, VERSION, ("gpu-1",))
    assert "pending on node class [no GPU, CRIU 4.2.1]" in pending.describe()
    assert "(1 of the 2 nodes a quarantine needs)" in pending.describe()

    # A second node failing the same version on the same class: quarantined there.
    await fail_on(node, "gpu-2")
    [entry] = quarantine.entries(CKPT)
    assert (entry.active, entry.version, entry.nodes) == (True, VERSION, ("gpu-1", "gpu-2"))
    assert (entry.reason, entry.node_class.describe()) == ("RestoreFailed", "no GPU, CRIU 4.2.1")
    # It lapses a day after the older of the two nodes' latest failures (gpu-1's second).
    [first] = (node.store.root / CKPT / "quarantine" / "local" / VERSION).glob("*/gpu-1.json")
    held = QuarantineEvidence.model_validate_json(first.read_bytes())
    assert held.failures == 2
    assert entry.expires == held.last + timedelta(hours=24)

    # The next restore of this version on this class starts cold at once, on any node.
    working = node.activities(node.criu(restoring_a_sleeper(restored_pids)), node="gpu-3")
    with pytest.raises(QuarantinedError) as caught:
        await ActivityEnvironment().run(working.restore_checkpoint, request())
    assert (
        f"checkpoint {CKPT} version {VERSION} is quarantined on node class "
        "[no GPU, CRIU 4.2.1]" in str(caught.value)
    )
    assert "after RestoreFailed on node(s) gpu-1, gpu-2 until " in str(caught.value)
    assert f"`warmstart quarantine clear {CKPT}`" in str(caught.value)
    assert calls(node) == 3  # CRIU was not run
    assert (node.control_dir / "restore-failed").read_text().startswith("Quarantined: ")

    # Cleared, it restores again.
    assert [e.nodes for e in quarantine.clear(CKPT)] == [("gpu-1", "gpu-2")]
    restored = await ActivityEnvironment().run(working.restore_checkpoint, request())
    assert restored.pid == int(restored_pids.read_text())
    assert quarantine.entries(pending=True) == []
    assert not (node.store.root / CKPT / "quarantine").exists()


def evidence(node: str, *, version: str = VERSION, hours_ago: float = 0) -> QuarantineEvidence:
    """What node `node` records after a restore of `version` failed there."""
    at = datetime.now(UTC) - timedelta(hours=hours_ago)
    return QuarantineEvidence(
        checkpoint_id=CKPT,
        version=version,
        node_class=NodeClass(gpu_model="", gpu_driver="", criu="4.2.1"),
        node=node,
        reason="RestoreFailed",
        message="criu restore exited with 1",
        since=at,
        last=at,
        namespace="local",  # where the checkpoint was captured (its manifest's)
    )


async def test_a_quarantine_refuses_its_version_only(tmp_path: Path, restored_pids: Path) -> None:
    node = commit_checkpoint(tmp_path)
    other = "20261125T000000Z-bbbbbb"
    commit_checkpoint(tmp_path, version=other)
    quarantine = Quarantine(node.store.root)
    for name in ("gpu-1", "gpu-2"):
        quarantine.record(evidence(name))
    working = node.activities(node.criu(restoring_a_sleeper(restored_pids)))
    with pytest.raises(QuarantinedError):
        await ActivityEnvironment().run(working.restore_checkpoint, request())

    restored = await ActivityEnvironment().run(working.restore_checkpoint, request(version=other))
    assert restored.version == other


async def test_evidence_lapses_a_day_after_its_nodes_latest_failure(node: Node) -> None:
    quarantine = Quarantine(node.store.root)
    then = datetime.now(UTC) - timedelta(hours=25)
    Quarantine(node.store.root, clock=lambda: then).record(evidence("gpu-2", hours_ago=25))
    assert len(quarantine.lapsed()) == 1  # recorded a day ago and more: it counts for nothing
    await fail_on(node, "gpu-1")
    [pending] = quarantine.entries(CKPT, pending=True)
    assert (pending.active, pending.nodes) == (False, ("gpu-1",))
    # Recording swept the lapsed evidence.
    assert [p.name for p in (node.store.root / CKPT / "quarantine").rglob("*.json")] == [
        "gpu-1.json"
    ]


async def test_how_many_nodes_a_quarantine_needs_is_a_setting(node: Node) -> None:
    one = Quarantine(node.store.root, policy=QuarantinePolicy(min_nodes=1))
    with pytest.raises(RestoreFailedError):
        await ActivityEnvironment().run(
            node.activities(node.criu("exit 1\n"), quarantine=one).restore_checkpoint, request()
        )
    working = node.activities(node.criu("exit 0\n"), quarantine=one)
    with pytest.raises(QuarantinedError):
        await ActivityEnvironment().run(working.restore_checkpoint, request())
    assert calls(node) == 1


def legacy_file(node: Node, *, hours_ago: float) -> Path:
    """A quarantine entry as it was recorded before versions and evidence: one failure, one
    node, the whole checkpoint on its class (`<class key>.json`)."""
    cls = NodeClass(gpu_model="", gpu_driver="", criu="4.2.1")
    since = (datetime.now(UTC) - timedelta(hours=hours_ago)).isoformat().replace("+00:00", "Z")
    recorded = {
        "checkpoint_id": CKPT,
        "node_class": {"gpu_model": "", "gpu_driver": "", "criu": "4.2.1"},
        "reason": "RestoreFailed",
        "message": "criu restore exited with 1",
        "node": "local",
        "since": since,
    }
    path = node.store.root / CKPT / "quarantine" / f"{cls.key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recorded, indent=2))
    return path


async def test_an_entry_recorded_before_versions_is_listed_until_it_lapses_not_enforced(
    node: Node, restored_pids: Path
) -> None:
    """It cannot say whose namespace's restores failed (decision 0023): listed and swept as
    decision 0027 says, it refuses nothing."""
    path = legacy_file(node, hours_ago=23)
    quarantine = Quarantine(node.store.root)
    [entry] = quarantine.entries(CKPT)
    assert (entry.version, entry.nodes, entry.active) == ("", ("local",), True)
    assert f"checkpoint {CKPT} (every version) is quarantined" in entry.describe()
    working = node.activities(node.criu(restoring_a_sleeper(restored_pids)))
    restored = await ActivityEnvironment().run(working.restore_checkpoint, request())
    assert restored.pid == int(restored_pids.read_text())

    path.unlink()
    lapsed = legacy_file(node, hours_ago=25)
    assert quarantine.entries(CKPT) == []
    assert quarantine.lapsed() == [lapsed]
    assert quarantine.sweep_lapsed() == [lapsed] and not lapsed.exists()


async def test_damaged_quarantine_records_are_ignored(node: Node, restored_pids: Path) -> None:
    cls = NodeClass(gpu_model="", gpu_driver="", criu="4.2.1")
    records = node.store.root / CKPT / "quarantine"
    (records / VERSION / cls.key).mkdir(parents=True)
    (records / VERSION / cls.key / "gpu-1.json").write_text('{"node": "gpu-1", "last": ')
    (records / f"{cls.key}.json").write_bytes(b"\x00not json")
    working = node.activities(node.criu(restoring_a_sleeper(restored_pids)))
    restored = await ActivityEnvironment().run(working.restore_checkpoint, request())
    assert restored.pid == int(restored_pids.read_text())
    assert Quarantine(node.store.root).entries(pending=True) == []


async def test_a_cancelled_restore_is_no_evidence(node: Node, tmp_path: Path) -> None:
    started = tmp_path / "criu-started"
    criu = node.criu(f"touch {started}\nexec sleep 300\n")
    env = ActivityEnvironment()
    task = asyncio.create_task(env.run(node.activities(criu).restore_checkpoint, request()))
    await wait_until(started.exists, "criu to run")
    env.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert Quarantine(node.store.root).entries(pending=True) == []


async def test_a_damaged_checkpoint_is_not_blamed_on_the_node(node: Node) -> None:
    (node.version_dir / "criu" / "core-1.img").write_bytes(b"CORE")
    with pytest.raises(DigestMismatchError):
        await ActivityEnvironment().run(
            node.activities(node.criu("exit 0\n")).restore_checkpoint, request()
        )
    assert Quarantine(node.store.root).entries() == []
