"""Putting back what a real node (`tests/realnode.py`) changed on the host, after its
processes stopped: mounts below its directory, its cgroups, bridges and shims, and what
the kubelet and libcni wrote outside its directory (importable as `tests.node_cleanup`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.host_state import cgroup_hierarchies, mount_points


def remove_cgroups(root: str) -> None:
    for hierarchy in cgroup_hierarchies():
        top = hierarchy / root.lstrip("/")
        if not top.is_dir():
            continue
        for directory, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
            for _ in range(50):  # a task that is exiting still holds its cgroup briefly
                try:
                    os.rmdir(directory)
                    break
                except OSError:
                    time.sleep(0.1)


def remove_pod_logs(uids: set[str]) -> None:
    """What the kubelet wrote for these pods in /var/log/pods and /var/log/containers
    (paths it does not let be moved)."""
    logs, links = Path("/var/log/pods"), Path("/var/log/containers")
    for entry in logs.iterdir() if logs.is_dir() else ():
        if entry.name.rsplit("_", 1)[-1] in uids:
            shutil.rmtree(entry, ignore_errors=True)
    for link in links.iterdir() if links.is_dir() else ():
        if link.is_symlink() and any(uid in os.readlink(link) for uid in uids):
            link.unlink()


def unmount_under(base: Path) -> None:
    """Every mount at or below `base` (the kubelet's own bind mount of its root, volumes,
    sandboxes' network namespaces and shm, container roots), deepest first."""
    prefix = f"{base}/"
    for _ in range(5):
        points = [p for p, _ in mount_points() if p.startswith(prefix)]
        if not points:
            return
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", point], capture_output=True, check=False)
    for point in [p for p, _ in mount_points() if p.startswith(prefix)]:
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def unmount_base(base: Path) -> None:
    """The cluster directory's own bind mount (made shared for the pods' propagation)."""
    if any(point == str(base) for point, _ in mount_points()):
        done = subprocess.run(["umount", str(base)], capture_output=True, check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(base)], capture_output=True, check=False)


def remove_base(base: Path) -> None:
    """The cluster's directory, unless something is still mounted below it (the host check
    then names it; removing would reach into what is mounted)."""
    if not any(point.startswith(f"{base}/") for point, _ in mount_points()):
        shutil.rmtree(base, ignore_errors=True)


def remove_cni_results(network: str) -> None:
    """libcni's cache of this network's attachments (it keeps them in /var/lib/cni/results
    whatever the configuration says)."""
    results = Path("/var/lib/cni/results")
    for entry in results.iterdir() if results.is_dir() else ():
        if entry.name.startswith(f"{network}-"):
            entry.unlink()


def remove_created(absent: list[Path]) -> None:
    """The paths outside the base that did not exist before the start, once more."""
    for path in absent:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()


def delete_links(names: tuple[str, ...]) -> None:
    for name in names:
        if Path(f"/sys/class/net/{name}").exists():
            subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)


def stop_shims(state: Path, address: str) -> None:
    """Each shim of the containerd at `address` still there (shims outlive containerd by
    design), killed by the PID it recorded in `state`, once that PID is checked to still be
    a shim of this containerd (not a PID reused since)."""
    for record in state.glob("io.containerd.runtime.v2.task/*/*/shim.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(record.read_text())
            if address.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
