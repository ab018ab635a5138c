"""The node steps of pods' containers, written once for every container runtime: find the
container (through the runtime seam, `activities.runtime.base`), await the GMS saver,
dump it with CRIU (CUDA suspended around the dump on a GPU node, with its root filesystem
diff), commit the version, write sentinels through its own root, stop a standby, and
restore into a standby (`activities.runtime.standby`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
from datetime import UTC, datetime
from pathlib import Path

from temporalio import activity

from activities.contracts import (
    CommitResult,
    ContainerCommitInput,
    ContainerDumpInput,
    ContainerRestoreInput,
    ContainerSentinelInput,
    ContainerTarget,
    GmsSavedInput,
    RestoredContainer,
)
from activities.criu.command import CONTAINER_DUMP_OPTIONS, DUMP_OPTIONS, IMAGES_DIR, Criu
from activities.criu.predump import PreDumps, captured_criu_info
from activities.gpu.cuda import CUDA_FILE, CudaApi, cuda_processes, resume, suspend, tree_pids
from activities.gpu.nvml import NodeGpus
from activities.host.sentinels import write_restore_failed, write_sentinel_at
from activities.runtime import control, rootfs
from activities.runtime.base import ContainerRuntime, Located
from activities.runtime.hook_mounts import MOUNTS_FILE
from activities.runtime.standby import StandbyRestorer
from activities.steps import ContainerSteps
from activities.storage.store import (
    CheckpointStore,
    committed_result,
    digest_tree,
    make_private,
    process_host_info,
)
from api.errors import (
    DumpFailedError,
    GpuError,
    InvalidSpecError,
    UnavailableError,
    WorkloadExitedError,
    WorkloadNotReadyError,
)
from api.manifest import CriuInfo, Manifest, SourceInfo
from api.reasons import Sentinel

CUDA_LOCK_TIMEOUT_MS = 10_000


class PodActivities(ContainerSteps):
    """`ContainerSteps` on a node whose pods run in `runtime`."""

    def __init__(
        self,
        *,
        runtime: ContainerRuntime,
        criu: Criu,
        store: CheckpointStore,
        node: str,
        gpus: NodeGpus | None = None,
        cuda: CudaApi | None = None,
        restorer: StandbyRestorer | None = None,
        pre_dumps: PreDumps | None = None,
    ) -> None:
        """`cuda`: the driver's checkpoint API on a GPU node (None elsewhere); `restorer`:
        restores into standby containers (a node that only captures has none);
        `pre_dumps`: the pre-dump rounds before each dump (decision 0037; none by default)."""
        self._pre_dumps = pre_dumps or PreDumps(criu=criu, rounds=0)
        self._runtime = runtime
        self._gpus = gpus or NodeGpus()
        self._cuda = cuda
        self._restorer = restorer
        self._criu = criu
        self._store = store
        self._node = node
        # Asked once: what every manifest of this node records about its CRIU.
        self._criu_info = CriuInfo(
            version=criu.version(), options=(*DUMP_OPTIONS, *CONTAINER_DUMP_OPTIONS)
        )

    @activity.defn
    async def await_gms_saved(self, request: GmsSavedInput) -> None:
        target = request.target
        located = await self._runtime.locate(target)
        sentinel = f"gms-save-complete-{target.pod_uid}"
        if await control.await_file(located.pid, sentinel, timeout=request.timeout_seconds):
            return
        raise WorkloadNotReadyError(
            f"pod {target.namespace}/{target.pod_name}: no {sentinel} from the GMS saver "
            f"within {request.timeout_seconds:g} s"
        )

    @activity.defn
    async def dump_container(self, request: ContainerDumpInput) -> None:
        target = request.target
        located = await self._runtime.locate(target)
        netns = os.stat(f"/proc/{located.pid}/ns/net").st_ino
        where = (
            f"checkpoint {request.checkpoint_id}: criu dump of container {target.container} "
            f"of pod {target.namespace}/{target.pod_name} (pid {located.pid})"
        )
        activity.logger.info("%s", where)
        if missing := rootfs.unreachable_mounts(located.pid):
            listed = ", ".join(f"{point} (from {path})" for point, path in sorted(missing.items()))
            raise DumpFailedError(
                f"{where}: the container binds node files this node worker cannot reach: "
                f"{listed}; mount the node's root into the node worker's pod (the "
                "DaemonSet's volume host-root)"
            )
        staging = self._store.fresh_staging(request.checkpoint_id, request.version)
        images = staging / IMAGES_DIR
        images.mkdir()
        freezer = rootfs.freezer_cgroup(located.pid)
        binds = [point for point in rootfs.node_mounts(located.pid) if point != "/"]
        command = self._criu.container_dump_command(
            pid=located.pid,
            images_dir=images,
            netns_inode=netns,
            freezer=freezer,
            bind_mounts=binds,
        )
        suspended: list[int] = []
        try:
            try:
                suspended = await asyncio.to_thread(self._suspend_cuda, located.pid, staging)
            except GpuError as err:
                raise DumpFailedError(f"{where}: CUDA checkpoint: {err}") from err
            await self._pre_dumps.dump(command, images, what=where)
            (staging / MOUNTS_FILE).write_text(json.dumps({"bind_mounts": binds}) + "\n")
            upper, mount_points = self._runtime.upper_dir(located)
            if upper is not None:
                count = await asyncio.to_thread(
                    rootfs.rootfs_diff,
                    rootfs.host_path(upper, located.pid),
                    staging,
                    mount_points=mount_points,
                    lowers=rootfs.overlay_lowers(located.pid),
                )
                activity.logger.info("%s: rootfs diff of %d entries", where, count)
        except BaseException:
            rootfs.thaw(located.pid, freezer)
            await asyncio.to_thread(shutil.rmtree, staging, True)
            raise
        finally:
            if suspended and self._cuda is not None:  # the source goes on serving
                await asyncio.to_thread(resume, self._cuda, suspended, pairs=(), quiet=True)

    def _suspend_cuda(self, pid: int, staging: Path) -> list[int]:
        """On a GPU node: lock and checkpoint the container's CUDA processes, so their GPU
        memory is in host memory when CRIU dumps it, and record them (`cuda.json`, by
        their PIDs in the container) for the restore. Returns their node PIDs."""
        if self._cuda is None or not self._gpus.facts().devices:
            return []
        tree = tree_pids(pid)
        using = set(cuda_processes(self._cuda, [host for host, _ in tree]))
        if not using:
            return []
        pids = [host for host, _ in tree if host in using]
        suspend(self._cuda, pids, timeout_ms=CUDA_LOCK_TIMEOUT_MS)
        inner = [inner for host, inner in tree if host in using]
        (staging / CUDA_FILE).write_text(json.dumps({"pids": inner}) + "\n")
        return pids

    @activity.defn
    async def restore_container(self, request: ContainerRestoreInput) -> RestoredContainer:
        if self._restorer is None:
            raise UnavailableError(f"node {self._node} does not restore into containers")
        return await self._restorer.restore(request)

    @activity.defn
    async def commit_container(self, request: ContainerCommitInput) -> CommitResult:
        target = request.target
        located = await self._runtime.locate(target)
        return await asyncio.to_thread(self._commit, request, located)

    def _commit(self, request: ContainerCommitInput, located: Located) -> CommitResult:
        staging = self._store.staging_dir(request.checkpoint_id, request.version)
        final = self._store.version_dir(request.checkpoint_id, request.version)
        if not staging.is_dir():
            if (final / "manifest.json").is_file():
                manifest = Manifest.model_validate_json((final / "manifest.json").read_bytes())
                return committed_result(final, manifest)
            raise DumpFailedError(f"checkpoint {request.checkpoint_id}: staging is gone")
        make_private(staging)
        target = request.target
        manifest = Manifest(
            checkpoint_id=request.checkpoint_id,
            version=request.version,
            identity=request.identity,
            created_at=datetime.now(UTC),
            source=SourceInfo(
                node=self._node,
                namespace=target.namespace,
                name=request.resource_name,
                pod=target.pod_name,
                container=target.container,
                image=located.image,
                command=located.command,
                cwd=located.cwd,
                pid=located.pid,
                control_dir=f"/{control.CONTROL_DIR}",
                stdio=self._runtime.stdio(located),
            ),
            criu=captured_criu_info(self._criu_info, staging),
            host=process_host_info(located.pid, self._gpus),
            files=digest_tree(staging),
        )
        committed = self._store.commit(staging, manifest, unverified=request.unverified)
        return committed_result(committed, manifest)

    @activity.defn
    async def stop_standby(self, request: ContainerTarget) -> None:
        try:
            located = await self._runtime.locate(request)
        except WorkloadExitedError:
            return  # stopped or gone already: the kubelet restarts or replaces it
        activity.logger.info(
            "stopping the standby of pod %s/%s (pid %d): it restarts cold",
            request.namespace,
            request.pod_name,
            located.pid,
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(located.pid, signal.SIGKILL)

    @activity.defn
    async def write_container_sentinel(self, request: ContainerSentinelInput) -> None:
        target = request.target
        directory = None
        if target.announces and not target.container_id and self._restorer is not None:
            # A restore started before its standby ran: its control directory on the node
            # (the standby, whenever it starts, reads what is written there), made if the
            # kubelet has not yet; retried while the pod's volumes are not set up.
            directory = self._restorer.announcements.open_control_dir(target, create=True)
            if directory is None:
                raise UnavailableError(
                    f"pod {target.namespace}/{target.pod_name}: its volumes are not set up "
                    "on this node yet"
                )
        if directory is None:
            located = await self._runtime.locate(target)
            try:
                directory = control.open_control_dir(located.pid)
            except OSError as err:
                raise InvalidSpecError(
                    f"pod {target.namespace}/{target.pod_name}: no control directory "
                    f"/{control.CONTROL_DIR} in container {target.container}: {err}"
                ) from err
        try:
            if request.sentinel == Sentinel.RESTORE_FAILED:
                write_restore_failed(directory, request.content)
            else:
                content = f"{request.content}\n".encode() if request.content else b"done\n"
                write_sentinel_at(directory, request.sentinel.value, content)
        finally:
            os.close(directory)
