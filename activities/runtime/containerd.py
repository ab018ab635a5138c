"""containerd: the container runtime implemented today.

Containers are found in containerd's namespace `k8s.io` (the kubelet's) by the labels the
kubelet sets, with the `ctr` client against the node's containerd socket; a restore
target's init PID is read from the shim's `init.pid` without a round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from activities.contracts import ContainerTarget
from activities.runtime.base import (
    CONTAINER_NAME_LABEL,
    POD_UID_LABEL,
    ContainerRuntime,
    Located,
    init_pid_of,
)
from api.errors import DumpFailedError, WorkloadExitedError


@dataclass(frozen=True)
class Containerd(ContainerRuntime):
    """containerd through its `ctr` client (namespace `k8s.io`, as under the kubelet)."""

    address: str
    ctr: str = "ctr"
    namespace: str = "k8s.io"
    # containerd's state directory: its shims keep each task's `init.pid` there.
    state: str = "/run/containerd"

    def init_pid(self, container_id: str) -> int:
        """The init PID of running container `container_id`, from the shim's `init.pid`
        (checked against the process's cgroups), else from the cgroups alone; 0 if none."""
        if not re.fullmatch(r"[0-9a-zA-Z_.-]+", container_id):
            return 0
        bundle = Path(self.state, "io.containerd.runtime.v2.task", self.namespace, container_id)
        with contextlib.suppress(OSError, ValueError):
            pid = int((bundle / "init.pid").read_text().strip())
            if container_id in Path(f"/proc/{pid}/cgroup").read_text():
                return pid
        return init_pid_of(container_id)

    async def _ctr(self, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            self.ctr,
            "--address",
            self.address,
            "--namespace",
            self.namespace,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise DumpFailedError(
                f"containerd at {self.address}: ctr {' '.join(args)}: {err.decode().strip()}"
            )
        return out.decode()

    async def locate(self, target: ContainerTarget) -> Located:
        if target.container_id:
            pid = self.init_pid(target.container_id)
            if pid:  # the restore path: no runtime round trips (each `ctr` costs ~25 ms)
                return Located(
                    container_id=target.container_id, pid=pid, image="", command=(), cwd="/"
                )
        where = f"container {target.container} of pod {target.namespace}/{target.pod_name}"
        selector = (
            f'labels."{POD_UID_LABEL}"=={target.pod_uid},'
            f'labels."{CONTAINER_NAME_LABEL}"=={target.container}'
        )
        ids = (await self._ctr("containers", "list", "--quiet", selector)).split()
        if not ids:
            raise WorkloadExitedError(f"{where} (pod UID {target.pod_uid}) is not on this node")
        tasks = _tasks(await self._ctr("tasks", "list"))
        running = [(cid, tasks[cid]) for cid in ids if tasks.get(cid, (0, ""))[1] == "RUNNING"]
        if not running:
            raise WorkloadExitedError(f"{where} is not running")
        container_id, (pid, _status) = running[-1]
        info: dict[str, Any] = json.loads(await self._ctr("containers", "info", container_id))
        process = (info.get("Spec") or {}).get("process") or {}
        return Located(
            container_id=container_id,
            pid=pid,
            image=info.get("Image") or "",
            command=tuple(process.get("args") or ()),
            cwd=process.get("cwd") or "/",
        )


def _tasks(listing: str) -> dict[str, tuple[int, str]]:
    """`ctr tasks list` → container ID: (PID, status)."""
    found = {}
    for line in listing.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3 and fields[1].isdigit():
            found[fields[0]] = (int(fields[1]), fields[2])
    return found
