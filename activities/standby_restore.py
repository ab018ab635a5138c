"""The node activity of a cluster restore, stage by stage (reported by heartbeat): verify
(the gate first: compatibility with the standby's GPUs, quarantine; then digests) → await
the GMS loader's sentinel → prepare the container and CRIU-restore into it
(`activities.container_restore`) → CUDA restore onto the device map, then unlock →
`restore-complete`. Any failure writes `restore-failed` so the standby starts cold, and a
failure of this node class is quarantined.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

from temporalio import activity

from activities.catalog import load_manifest
from activities.container_restore import RestoredProcess, restore_into_container
from activities.containerd import (
    CONTROL_DIR,
    CUDA_FILE,
    Containerd,
    Located,
    open_control_dir,
    write_sentinel_at,
)
from activities.contracts import ContainerRestoreInput, Heartbeat, RestoredContainer
from activities.criu import Criu
from activities.cuda import CudaApi, resume, tree_pids
from activities.gpu import (
    GpuFacts,
    NodeGpus,
    device_map,
    format_device_map,
    gpus_of_process,
    process_environment,
)
from activities.restore import NodeGate, Stages, open_version
from activities.sentinels import wait_for_file
from activities.sources import CheckpointSource
from activities.storage import CheckpointStore, host_info
from api.errors import RestoreFailedError, WarmstartError, WorkloadNotReadyError
from api.manifest import Manifest
from api.reasons import Sentinel


class StandbyRestorer:
    """Restores checkpoints into the standby containers of this node's restore targets."""

    def __init__(
        self,
        *,
        runtime: Containerd,
        criu: Criu,
        store: CheckpointStore,
        gate: NodeGate,
        gpus: NodeGpus,
        work_root: Path,
        cuda: CudaApi | None = None,
        source: CheckpointSource | None = None,
    ) -> None:
        self._runtime = runtime
        self._criu = criu
        self._store = store
        self._source = source or CheckpointSource(store=store)
        self._gate = gate
        self._gpus = gpus
        self._work_root = work_root
        self._cuda = cuda

    async def restore(self, request: ContainerRestoreInput) -> RestoredContainer:
        stages = Stages()
        placeholder = await self._runtime.locate(request.target)
        cls = None
        held = AsyncExitStack()
        try:
            stages.start("verify")
            version_dir = await open_version(
                held, self._source, stages, request.checkpoint_id, request.version, request.storage
            )
            claimed = load_manifest(version_dir)
            environ = process_environment(placeholder.pid)
            gpus = gpus_of_process(environ, self._gpus.facts())
            cls = self._gate.check(claimed, host_info(gpus))
            manifest = await asyncio.to_thread(
                self._store.verify, version_dir, checkpoint_id=request.checkpoint_id
            )
            if request.gms_sentinel:
                stages.start("await-gms-load")
                await self._await_gms(placeholder, request)
            stages.start("restore")  # prepare, criu-restore, cuda-restore inside
            restored = await restore_into_container(
                criu=self._criu,
                target=request.target,
                placeholder=placeholder,
                version_dir=version_dir,
                manifest=manifest,
                work_dir=self._work_root / request.target.pod_uid,
                before_complete=self._cuda_resume(manifest, version_dir, gpus),
                environ=environ,
            )
            stages.finish()
            del stages.seconds["restore"]
            stages.seconds.update(restored.stage_seconds)
        except WarmstartError as err:
            await asyncio.to_thread(_restore_failed, placeholder.pid, f"{err.reason}: {err}")
            if cls is not None:
                self._gate.remember(request.checkpoint_id, cls, err)
            raise
        finally:
            await held.aclose()  # the cache may evict the version again
        activity.logger.info(
            "restored %s into pod %s/%s: %s",
            request.checkpoint_id,
            request.target.namespace,
            request.target.pod_name,
            stages.seconds,
        )
        return RestoredContainer(
            pid=restored.host_pid,
            namespace_pid=restored.pid,
            version=manifest.version,
            stage_seconds=stages.seconds,
        )

    async def _await_gms(self, placeholder: Located, request: ContainerRestoreInput) -> None:
        control = Path(f"/proc/{placeholder.pid}/root") / CONTROL_DIR
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def check() -> None:
            activity.heartbeat(Heartbeat(waited_seconds=round(loop.time() - started, 1)))

        sentinel, timeout = request.gms_sentinel, request.gms_timeout_seconds
        if not await wait_for_file(control, [sentinel], timeout=timeout, check=check):
            target = request.target
            raise WorkloadNotReadyError(
                f"pod {target.namespace}/{target.pod_name}: no {sentinel} from the GMS "
                f"loader within {timeout:g} s"
            )

    def _cuda_resume(
        self, manifest: Manifest, version_dir: Path, gpus: GpuFacts
    ) -> Callable[[RestoredProcess], Awaitable[None]] | None:
        """What runs between CRIU and `restore-complete` for a GPU checkpoint: its CUDA
        processes' memory back onto the device map, then unlocked; None for a CPU one."""
        dumped = version_dir / CUDA_FILE
        if not manifest.host.gpus or not dumped.is_file():
            return None
        container_pids = json.loads(dumped.read_text())["pids"]
        source = tuple(gpu.uuid for gpu in manifest.host.gpus)
        pairs = device_map(source, gpus.uuids)
        remap = pairs if format_device_map(pairs) else ()
        cuda = self._cuda

        async def resume_cuda(restored: RestoredProcess) -> None:
            if cuda is None:
                raise RestoreFailedError("a GPU checkpoint, and no CUDA driver on this node")
            pids = [_host_pid(restored.host_pid, pid) for pid in container_pids]
            activity.heartbeat(Heartbeat(stage="cuda-restore"))
            await asyncio.to_thread(resume, cuda, pids, pairs=remap)

        return resume_cuda


def _host_pid(root: int, container_pid: int) -> int:
    """The node's PID of the restored process that is `container_pid` in the tree's own
    PID namespace."""
    for host, inner in tree_pids(root):
        if inner == container_pid:
            return host
    raise RestoreFailedError(f"CUDA process {container_pid} of the checkpoint was not restored")


def _restore_failed(pid: int, reason: str) -> None:
    """`restore-failed` with the reason, through the container's own root."""
    try:
        directory = open_control_dir(pid)
    except OSError:
        return  # the standby is gone: nobody waits
    try:
        write_sentinel_at(directory, Sentinel.RESTORE_FAILED.value, reason.encode()[-4096:] + b"\n")
    finally:
        os.close(directory)
