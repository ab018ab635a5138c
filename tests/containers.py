"""A real containerd for tests, started as root with its own root, state and socket (so a
containerd already on the machine is never touched), and a kubelet stand-in that runs pod
containers in it with the kubelet's labels (importable as `tests.containers`).

Containers run from a plain root directory holding the host's `/usr` read-only, so
python3 and a shell are there without an image or a registry.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import CRIU_SKIP


def _skip_reason() -> str | None:
    if CRIU_SKIP is not None:
        return CRIU_SKIP
    for tool in ("containerd", "ctr", "runc", "iptables-restore"):
        if shutil.which(tool) is None:
            return (
                f"{tool} is not installed: `make test` installs containerd, runc, iptables as root"
            )
    return None


CONTAINERD_SKIP = _skip_reason()
needs_containerd = pytest.mark.skipif(CONTAINERD_SKIP is not None, reason=CONTAINERD_SKIP or "")


@dataclass
class Kubelet:
    """Runs pod containers in the test's containerd like a kubelet would (labels, control
    directory mounted at /snapshot-control)."""

    base: Path
    address: str
    started: list[str] = field(default_factory=list)

    def ctr(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(
            ["ctr", "--address", self.address, "--namespace", "k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def run(self, pod_uid: str, container: str, command: list[str]) -> tuple[str, Path]:
        """Start `command` as container `container` of pod `pod_uid`; returns its ID and
        its control directory on the node (the pod's emptyDir)."""
        cid = f"c{uuid.uuid4().hex[:12]}"
        rootfs = self.base / "rootfs" / cid
        for name in ("proc", "sys", "dev", "tmp", "etc", "usr", "snapshot-control"):
            (rootfs / name).mkdir(parents=True)
        for name in ("bin", "lib", "lib64", "sbin"):
            (rootfs / name).symlink_to(f"usr/{name}")
        control = self.base / "controls" / cid
        control.mkdir(parents=True)
        self.ctr(
            "run",
            "--detach",
            "--rootfs",
            "--label",
            f"io.kubernetes.pod.uid={pod_uid}",
            "--label",
            f"io.kubernetes.container.name={container}",
            "--mount",
            "type=bind,src=/usr,dst=/usr,options=rbind:ro",
            "--mount",
            f"type=bind,src={control},dst=/snapshot-control,options=rbind:rw",
            "--env",
            "PATH=/usr/bin:/bin",
            "--env",
            "SNAPSHOT_CONTROL_DIR=/snapshot-control",
            str(rootfs),
            cid,
            *command,
        )
        self.started.append(cid)
        return cid, control

    def status(self, cid: str) -> str:
        for line in self.ctr("tasks", "list").splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == cid:
                return fields[2]
        return "GONE"

    def pid(self, cid: str) -> int:
        for line in self.ctr("tasks", "list").splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == cid:
                return int(fields[1])
        raise LookupError(cid)

    def remove_all(self) -> None:
        for cid in self.started:
            self.ctr("tasks", "kill", "--signal", "SIGKILL", cid, check=False)
            for _ in range(50):
                if self.status(cid) != "RUNNING":
                    break
                time.sleep(0.1)
            self.ctr("tasks", "delete", "--force", cid, check=False)
            self.ctr("containers", "delete", cid, check=False)


def running_containerd() -> Iterator[Kubelet]:
    """A containerd of the test's own (short paths: its sockets must fit sun_path); use it
    as a fixture with `yield from running_containerd()`."""
    base = Path(f"/run/ws-{uuid.uuid4().hex[:8]}")
    base.mkdir(mode=0o700)
    address = str(base / "containerd.sock")
    config = base / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{base}/root"\n'
        f'state = "{base}/state"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{address}"\n'
    )
    log = (base / "containerd.log").open("w")
    daemon = subprocess.Popen(
        ["containerd", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    kubelet = Kubelet(base=base, address=address)
    try:
        deadline = time.monotonic() + 20
        while kubelet.ctr("version", check=False) == "" or not os.path.exists(address):
            assert daemon.poll() is None, (base / "containerd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "containerd did not start"
            time.sleep(0.1)
        yield kubelet
    finally:
        kubelet.remove_all()
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
        subprocess.run(["pkill", "-KILL", "-f", f"containerd-shim.*{base}"], check=False)
        subprocess.run(["umount", "-R", "-l", str(base / "root")], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)
