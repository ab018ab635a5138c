"""The container runtime seam: what warmstart needs from a node's container runtime, and
nothing more.

A runtime finds a pod's container on this node (`locate`: its ID, init PID and what its
spec says). Everything else is read from the kernel through the init PID, the same for
every runtime: the root and its overlay upper directory (`upper_dir`), mounts, stdio,
cgroups and namespaces. A runtime whose containers differ there overrides those methods.
Adding a runtime is one module with a `ContainerRuntime` subclass and its line in
`activities.runtime.registry`.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from activities.contracts import ContainerTarget
from activities.runtime import rootfs

POD_UID_LABEL = "io.kubernetes.pod.uid"  # set by the kubelet on every container, any runtime
CONTAINER_NAME_LABEL = "io.kubernetes.container.name"


@dataclass(frozen=True)
class Located:
    """A running container: its runtime's ID, init PID (on the node) and what its spec says
    (image, command, working directory; empty where the runtime was not asked)."""

    container_id: str
    pid: int
    image: str = ""
    command: tuple[str, ...] = ()
    cwd: str = "/"


class ContainerRuntime(ABC):
    """A node's container runtime, as the capture and restore steps use it."""

    @abstractmethod
    async def locate(self, target: ContainerTarget) -> Located:
        """The running container `target.container` of pod `target.pod_uid` on this node.
        With `target.container_id` set (a restore target, whose container the watcher
        named), a runtime should answer without a round trip where it can.

        Raises WorkloadExitedError when it is not here or not running."""

    def upper_dir(self, located: Located) -> tuple[Path | None, list[str]]:
        """The overlay upper directory of the container's root (None when the root is not
        an overlay) and its other mount points, as the container sees them."""
        return rootfs.container_mounts(located.pid)

    def stdio(self, located: Located) -> tuple[str, ...]:
        """What the container's fds 0-2 are (`pipe:[inode]` of the runtime's shim)."""
        return rootfs.stdio(located.pid)


def init_pid_of(container_id: str) -> int:
    """The init process of the running container `container_id`, found from the cgroups
    the runtime put it in (the last path element is the ID, or `…-<ID>.scope` under the
    systemd driver, as containerd and CRI-O both name them); 0 when none runs here."""
    if not re.fullmatch(r"[0-9a-zA-Z_.-]+", container_id):
        return 0
    members: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cgroups = Path(entry.path, "cgroup").read_text()
            parent = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        for line in cgroups.splitlines():
            leaf = line.rsplit("/", 1)[-1]
            if leaf == container_id or leaf.endswith(f"-{container_id}.scope"):
                members[int(entry.name)] = parent
                break
    inits = [pid for pid, parent in members.items() if parent not in members]
    return inits[0] if len(inits) == 1 else 0
