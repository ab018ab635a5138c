"""The node activity of a cluster restore, stage by stage (reported by heartbeat): verify
(the manifest its Checkpoint recorded, of a version captured in the pod's own namespace
only, then the gate: compatibility with the standby's GPUs, quarantine; then digests) → await
the GMS loader's sentinel → prepare the container and CRIU-restore into it
(`activities.runtime.restore`) → CUDA restore onto the device map, then unlock →
`restore-complete`. Any failure writes `restore-failed` so the standby starts cold, and a
failure that counts against the version on this node class adds this node's evidence to the
quarantine (`NodeGate.remember`); one whose standby vanished meanwhile (its pod deleted
mid-restore) is WorkloadExited and counts for nothing.

A restore started when its pod was scheduled (a standby that announces itself) fetches and
verifies the version first, then awaits the standby (`await-standby`: its `standby-waiting`,
`activities.runtime.announce`), then checks the gate against it and restores: from the
standby's announcement to CRIU only the gate and the preparation are left. Failing before
the standby runs, it writes `restore-failed` through the pod's control directory on the node.

A verified capture's verification pod (decision 0045; `unverified`) restores the version its
capture holds back on this node, and its failure records no quarantine evidence.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

from temporalio import activity

from activities.contracts import (
    ContainerRestoreInput,
    ContainerTarget,
    Heartbeat,
    RestoredContainer,
)
from activities.criu.command import IMAGES_DIR, Criu
from activities.criu.lazy import LazyOutcome, LazyPages, LazyPagesDaemon
from activities.criu.slots import RestoreSlots
from activities.gpu.cuda import CUDA_FILE, CudaApi, resume, tree_pids
from activities.gpu.nvml import (
    GpuFacts,
    NodeGpus,
    device_map,
    format_device_map,
    gpus_of_process,
    process_environment,
)
from activities.host.processes import is_alive, start_ticks
from activities.host.sentinels import write_restore_failed
from activities.pipeline import (
    QUARANTINED_REASONS,
    NodeGate,
    Stages,
    as_restore_failure,
    failure_note,
    open_version,
    queue_reporter,
    require_manifest,
    require_namespace,
)
from activities.runtime import control
from activities.runtime.announce import KUBELET_ROOT, Announcements
from activities.runtime.base import ContainerRuntime, Located
from activities.runtime.restore import RestoredProcess, join_cgroups, restore_into_container
from activities.storage.catalog import load_manifest
from activities.storage.sources import CheckpointSource
from activities.storage.store import CheckpointStore, host_info
from api.errors import (
    GpuError,
    RestoreFailedError,
    WarmstartError,
    WorkloadExitedError,
    WorkloadNotReadyError,
)
from api.manifest import Manifest

ANNOUNCE_SECONDS = 1800.0  # where the activity has no timeout of its own (tests)
FAILED_ON_NODE_SECONDS = 30.0
# How long a restore waits for a CRIU slot (decision 0040) before it gives up and its standby
# starts cold; the default bound where the worker names none.
SLOT_WAIT_SECONDS = 600.0
DEFAULT_SLOTS = 8


class StandbyRestorer:
    """Restores checkpoints into the standby containers of this node's restore targets."""

    def __init__(
        self,
        *,
        runtime: ContainerRuntime,
        criu: Criu,
        store: CheckpointStore,
        gate: NodeGate,
        gpus: NodeGpus,
        work_root: Path,
        cuda: CudaApi | None = None,
        source: CheckpointSource | None = None,
        announcements: Announcements | None = None,
        lazy_pages: LazyPages | None = None,
        slots: RestoreSlots | None = None,
    ) -> None:
        """`announcements`: where standbys announce themselves (default: the kubelet's
        default root); `lazy_pages`: whether restores serve memory lazily (default: not)."""
        self._runtime = runtime
        self._criu = criu
        self._store = store
        self._source = source or CheckpointSource(store=store)
        self._gate = gate
        self._gpus = gpus
        self._work_root = work_root
        self._cuda = cuda
        self._lazy = lazy_pages or LazyPages(criu=criu, enabled=False)
        self._slots = slots or RestoreSlots(DEFAULT_SLOTS)
        self._announcements = announcements or Announcements(
            kubelet_root=Path(KUBELET_ROOT), runtime=runtime
        )

    @property
    def announcements(self) -> Announcements:
        return self._announcements

    async def restore(self, request: ContainerRestoreInput) -> RestoredContainer:
        stages = Stages()
        target = request.target
        early = target.announces and not target.container_id
        # Started when the pod was scheduled: the standby is found once it announces itself,
        # after everything that does not need it (the version fetched and verified).
        standby = None if early else await self._runtime.locate(target)
        where = (
            f"restore of checkpoint {request.checkpoint_id} into container {target.container} "
            f"of pod {target.namespace}/{target.pod_name}"
        )
        born = start_ticks(standby.pid) if standby else 0  # tells its end from PID reuse
        cls, version = None, request.version
        held = AsyncExitStack()
        work_dir = self._work_root / target.pod_uid
        daemon: LazyPagesDaemon | None = None
        lazy_why = ""
        try:
            if standby is not None:
                await asyncio.to_thread(control.reset_for_restore, standby.pid)
            stages.start("verify")
            version_dir = await open_version(
                held,
                self._source,
                stages,
                request.checkpoint_id,
                request.version,
                request.storage,
                accept=lambda fetched: require_namespace(fetched, target.namespace),
                unverified=request.unverified,
            )
            # A version changed where it is stored, or another namespace's, is refused
            # before anything else of it is read.
            require_manifest(
                version_dir, request.manifest_sha256, checkpoint_id=request.checkpoint_id
            )
            claimed = load_manifest(version_dir)
            require_namespace(claimed, target.namespace)
            if standby is None:
                manifest = await asyncio.to_thread(
                    self._store.verify, version_dir, checkpoint_id=request.checkpoint_id
                )
                await asyncio.to_thread(self._gpus.facts)  # NVML read once, not after
                daemon, lazy_why = await self._lazy_daemon(version_dir, work_dir, stages)
                stages.start("await-standby")
                standby = await self._announced(target, stages)
                born = start_ticks(standby.pid)
                stages.start("gate")  # (stale sentinels are cleared in `prepare`)
                # Verified while it waited: checked again against that record (sizes and
                # ctimes, no hashing), so a file changed meanwhile is still refused.
                manifest = await asyncio.to_thread(
                    self._store.verify, version_dir, checkpoint_id=request.checkpoint_id
                )
            environ = process_environment(standby.pid)
            gpus = gpus_of_process(environ, self._gpus.facts())
            cls, version = self._gate.check(claimed, host_info(gpus)), claimed.version
            if not early:
                manifest = await asyncio.to_thread(
                    self._store.verify, version_dir, checkpoint_id=request.checkpoint_id
                )
            if request.gms_sentinel:
                stages.start("await-gms-load")
                sentinel, timeout = request.gms_sentinel, request.gms_timeout_seconds
                if not await control.await_file(standby.pid, sentinel, timeout=timeout):
                    raise WorkloadNotReadyError(
                        f"pod {target.namespace}/{target.pod_name}: no {sentinel} from the "
                        f"GMS loader within {timeout:g} s"
                    )
            if not early:
                daemon, lazy_why = await self._lazy_daemon(version_dir, work_dir, stages)

            def into(work: Path, *, lazy: bool) -> Awaitable[RestoredProcess]:
                assert standby is not None
                return restore_into_container(
                    criu=self._criu,
                    target=target,
                    standby=standby,
                    version_dir=version_dir,
                    manifest=manifest,
                    work_dir=work,
                    stages=stages,
                    before_complete=self._cuda_resume(manifest, version_dir, gpus),
                    environ=environ,
                    lazy=lazy,
                )

            # At most the node's bound in CRIU at once (decision 0040), first come first
            # served; the standby waits meanwhile (it was going to wait for CRIU anyway).
            async with self._slots.slot(
                timeout=SLOT_WAIT_SECONDS, what=where, waiting=queue_reporter(stages)
            ):
                try:
                    restored = await into(work_dir, lazy=daemon is not None)
                except RestoreFailedError as err:
                    if daemon is None:
                        raise
                    # Never fail what an eager restore would do: told, then done eagerly.
                    await self._lazy.stop(daemon)
                    daemon, lazy_why = None, f"lazy restore failed: {err}"
                    stages.start("lazy-unavailable")
                    activity.logger.warning("%s: restoring eagerly: %s", where, lazy_why)
                    eager_dir = work_dir.with_name(f"{work_dir.name}-eager")
                    restored = await into(eager_dir, lazy=False)
            if daemon is not None:  # the version stays held until every page is delivered
                # (after CRIU: ~10 ms of cgroup writes, off the path to the first answer)
                await self._daemon_joins(daemon, standby.pid)
                self._lazy.hand_over(
                    daemon, restored_pid=restored.host_pid, done=_released(held.pop_all())
                )
                daemon = None
            stages.finish()
        except BaseException as err:
            # The one failure path: `restore-failed` once, the node's evidence recorded.
            if daemon is not None:
                await self._lazy.stop(daemon)
            failure = as_restore_failure(err, where)
            if standby is None:
                # Failed before its standby ran: told through its pod's control directory on
                # the node, which it reads whenever it starts (then it starts cold).
                if not isinstance(err, asyncio.CancelledError):
                    await self._failed_on_node(target, failure_note(failure))
            elif _vanished(failure, standby.pid, born):
                failure = WorkloadExitedError(
                    f"{where}: the standby container is gone (its pod deleted mid-restore?), "
                    f"so the restore failed: {failure}"
                )
            if standby is not None:
                await asyncio.to_thread(control.restore_failed, standby.pid, failure_note(failure))
            # A verification pod's failure is evidence against its version (which its capture
            # deletes), not against this node class.
            if cls is not None and isinstance(failure, WarmstartError) and not request.unverified:
                self._gate.remember(
                    request.checkpoint_id, version, cls, failure, namespace=target.namespace
                )
            if failure is err:
                raise
            raise failure from err
        finally:
            await held.aclose()  # the cache may evict the version again
        activity.logger.info(
            "restored %s into pod %s/%s: %s",
            request.checkpoint_id,
            target.namespace,
            target.pod_name,
            stages.seconds,
        )
        return RestoredContainer(
            pid=restored.host_pid,
            namespace_pid=restored.pid,
            version=manifest.version,
            stage_seconds=stages.seconds,
            lazy_unavailable=lazy_why[-2000:],
        )

    async def _daemon_joins(self, daemon: LazyPagesDaemon, standby: int) -> None:
        """The lazy-pages daemon into the standby's cgroups: it serves that pod's memory, so
        it must outlive a node worker pod deleted meanwhile (whose cgroups the kubelet kills)
        and go with the pod it serves."""
        try:
            await asyncio.to_thread(join_cgroups, daemon.pid, of=standby)
        except OSError as err:
            activity.logger.warning(
                "lazy-pages daemon %d stays in the node worker's cgroups: %s", daemon.pid, err
            )

    async def _lazy_daemon(
        self, version_dir: Path, work_dir: Path, stages: Stages
    ) -> tuple[LazyPagesDaemon | None, str]:
        """With lazy restores on (decision 0034): the lazy-pages daemon of this restore,
        listening in `work_dir`, or None and why not (the restore is then eager)."""
        if not self._lazy.enabled:
            return None, ""
        stages.start("lazy-pages")
        why = await asyncio.to_thread(self._lazy.unavailable)
        if not why:
            try:
                daemon = await self._lazy.start(
                    images_dir=version_dir / IMAGES_DIR, work_dir=work_dir
                )
            except RestoreFailedError as err:
                why = str(err)
            else:
                return daemon, ""
        stages.start("lazy-unavailable")
        activity.logger.warning("restoring eagerly: %s", why)
        return None, why

    async def _failed_on_node(self, target: ContainerTarget, note: str) -> None:
        """`restore-failed` in the standby's control directory on the node, once the pod's
        volume is there (waiting at most FAILED_ON_NODE_SECONDS; the workflow's fallback
        writes it again later)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FAILED_ON_NODE_SECONDS
        while (directory := self._announcements.open_control_dir(target, create=True)) is None:
            if loop.time() >= deadline:
                return
            await asyncio.sleep(0.1)
        try:
            await asyncio.to_thread(write_restore_failed, directory, note)
        finally:
            os.close(directory)

    async def _announced(self, target: ContainerTarget, stages: Stages) -> Located:
        """The standby of `target` once it announces itself, heartbeating while it waits (at
        most what is left of this activity's own time, the node's restore deadline)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        info = activity.info()
        budget = info.start_to_close_timeout or timedelta(seconds=ANNOUNCE_SECONDS)
        elapsed = (datetime.now(UTC) - info.started_time).total_seconds()
        timeout = max(1.0, budget.total_seconds() - elapsed)

        async def check() -> None:
            activity.heartbeat(Heartbeat(waited_seconds=round(loop.time() - started, 1)))

        return await self._announcements.standby(
            target, timeout=timeout, check=check, fallback=lambda: stages.start("locate")
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
            try:
                await asyncio.to_thread(resume, cuda, pids, pairs=remap)
            except GpuError as err:
                raise RestoreFailedError(f"CUDA restore of pids {pids}: {err}") from err

        return resume_cuda


def _released(held: AsyncExitStack) -> Callable[[LazyOutcome], Awaitable[None]]:
    """What ends a lazy restore's hold once its daemon has: the version may be evicted."""

    async def done(_outcome: LazyOutcome) -> None:
        await held.aclose()

    return done


def _vanished(failure: BaseException, pid: int, born: int) -> bool:
    """Whether `failure`, one that would count against the node class, came with the
    standby's end (its process gone, a zombie, or its PID taken by another): then it says
    nothing about the checkpoint on this class."""
    if not isinstance(failure, WarmstartError) or failure.reason not in QUARANTINED_REASONS:
        return False
    return not is_alive(pid) or start_ticks(pid) != born


def _host_pid(root: int, container_pid: int) -> int:
    """The node's PID of the restored process that is `container_pid` in the tree's own
    PID namespace."""
    for host, inner in tree_pids(root):
        if inner == container_pid:
            return host
    raise RestoreFailedError(f"CUDA process {container_pid} of the checkpoint was not restored")
