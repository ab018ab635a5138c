"""A standby announcing itself (`standby-waiting` in its pod's emptyDir on the node), found
by the writer's PID through fanotify, against real containerd containers started as the
kubelet starts them (tests/containers.py); the trust checks on who wrote it and where."""

from __future__ import annotations

import asyncio
import os
import stat
import uuid

import pytest

from activities.contracts import ContainerTarget
from activities.host.sentinels import write_restore_failed
from activities.runtime.announce import (
    WAITING,
    Announcements,
    control_volume_on_node,
    open_control_dir_on_node,
)
from activities.runtime.containerd import Containerd
from api.errors import InvalidSpecError, WorkloadNotReadyError
from api.restore_pods import STANDBY_NAME, STANDBY_SCRIPT
from tests.containers import Kubelet, needs_containerd

pytestmark = [needs_containerd, pytest.mark.timeout(120)]

# The standby's moment, as warmstart's standby script has it: after a pause (the container
# starts after its waiter), `standby-waiting` written by the container's init itself.
ANNOUNCING = ["/bin/sh", "-c", f"sleep 0.5; : > /snapshot-control/{WAITING}; exec sleep 60"]


def target_of(pod_uid: str) -> ContainerTarget:
    return ContainerTarget(
        namespace="inference", pod_name="llama-0", pod_uid=pod_uid, container="main", announces=True
    )


def announcements(kubelet: Kubelet) -> Announcements:
    runtime = Containerd(address=kubelet.address, state=str(kubelet.base / "state"))
    return Announcements(kubelet_root=kubelet.kubelet_root, runtime=runtime)


async def nothing() -> None:
    return None


async def test_the_standby_is_named_by_its_write_without_asking_the_runtime(
    kubelet: Kubelet,
) -> None:
    uid = str(uuid.uuid4())
    fallbacks: list[str] = []
    waiting = asyncio.create_task(
        announcements(kubelet).standby(
            target_of(uid), timeout=60, check=nothing, fallback=lambda: fallbacks.append("ctr")
        )
    )
    cid, _control = await asyncio.to_thread(kubelet.run, uid, "main", ANNOUNCING)
    located = await waiting
    assert located.pid == kubelet.pid(cid)
    assert fallbacks == []


async def test_a_write_by_another_process_than_the_init_is_not_taken_for_the_standby(
    kubelet: Kubelet,
) -> None:
    """A child of the container's init writes the file: not the standby by fanotify's
    word, so the runtime finds the container's init instead."""
    uid = str(uuid.uuid4())
    child = ["/bin/sh", "-c", f"sleep 0.5; sh -c ': > /snapshot-control/{WAITING}'; sleep 60"]
    fallbacks: list[str] = []
    waiting = asyncio.create_task(
        announcements(kubelet).standby(
            target_of(uid), timeout=60, check=nothing, fallback=lambda: fallbacks.append("ctr")
        )
    )
    cid, _control = await asyncio.to_thread(kubelet.run, uid, "main", child)
    located = await waiting
    assert fallbacks == ["ctr"]
    assert located.pid == kubelet.pid(cid)


async def test_a_link_planted_for_the_control_directory_is_refused(kubelet: Kubelet) -> None:
    """A container given the whole volume could point the standby's directory at another
    pod's: the node never follows it."""
    uid = str(uuid.uuid4())
    target = target_of(uid)
    volume = control_volume_on_node(kubelet.kubelet_root, target)
    volume.mkdir(parents=True)
    elsewhere = kubelet.base / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, volume / "main")
    with pytest.raises(InvalidSpecError, match="is not a directory of its own"):
        await announcements(kubelet).standby(target, timeout=5, check=nothing)


async def test_a_standby_that_never_announces_itself_times_out_naming_the_pod(
    kubelet: Kubelet,
) -> None:
    checks: list[int] = []

    async def check() -> None:
        checks.append(1)

    with pytest.raises(WorkloadNotReadyError, match="pod inference/llama-0: its standby main"):
        await announcements(kubelet).standby(target_of(str(uuid.uuid4())), timeout=1.5, check=check)
    assert checks  # heartbeats while it waited


async def test_a_failure_left_before_the_standby_ran_starts_it_cold(kubelet: Kubelet) -> None:
    """A restore refused or failed before its pod's container started: `restore-failed` is
    left in the control directory on the node (made there, as the kubelet would, while only
    the pod's volume exists); the standby, once it starts, starts its command cold."""
    uid = str(uuid.uuid4())
    target = target_of(uid)
    assert open_control_dir_on_node(kubelet.kubelet_root, target, create=True) is None
    control_volume_on_node(kubelet.kubelet_root, target).mkdir(parents=True)
    directory = open_control_dir_on_node(kubelet.kubelet_root, target, create=True)
    assert directory is not None
    try:
        assert write_restore_failed(directory, "Forbidden: the pod names no Checkpoint")
        assert stat.S_IMODE(os.fstat(directory).st_mode) == 0o777  # as an emptyDir's
    finally:
        os.close(directory)
    log = kubelet.base / f"{uid}.log"
    command = ["/bin/sh", "-c", STANDBY_SCRIPT, STANDBY_NAME, "sh", "-c", "echo cold start"]
    await asyncio.to_thread(kubelet.run, uid, "main", command, log=log)
    deadline = asyncio.get_running_loop().time() + 30
    while "cold start" not in (log.read_text() if log.exists() else ""):
        assert asyncio.get_running_loop().time() < deadline, "the standby did not start cold"
        await asyncio.sleep(0.05)
