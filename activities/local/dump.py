"""Local mode's dump: CRIU straight into the staging directory of a checkpoint version,
the workload's output file copied in while the tree is frozen."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from temporalio import activity

from activities.contracts import DumpInput
from activities.criu.command import IMAGES_DIR, OUTPUT_COPY_SCRIPT, Criu
from activities.criu.predump import PreDumps
from activities.host.files import write_atomically
from activities.host.layout import NodeLayout
from activities.steps import DumpSteps
from activities.storage.store import WORKLOAD_LOG, CheckpointStore


class CriuActivities(DumpSteps):
    """Node activity: CRIU dump straight into the staging directory of a checkpoint version."""

    def __init__(
        self,
        *,
        criu: Criu,
        store: CheckpointStore,
        layout: NodeLayout | None = None,
        pre_dumps: PreDumps | None = None,
    ) -> None:
        """`layout`: where the node keeps workload state; with it the workload's output file
        is copied into the dump while the tree is frozen (OUTPUT_COPY_SCRIPT). `pre_dumps`:
        the pre-dump rounds before each dump (decision 0037; none by default)."""
        self._criu = criu
        self._pre_dumps = pre_dumps or PreDumps(criu=criu, rounds=0)
        self._store = store
        self._layout = layout
        self._in_cwd: dict[str, asyncio.Lock] = {}

    @activity.defn
    async def dump_checkpoint(self, request: DumpInput) -> None:
        """Dump `request.pid` into fresh staging; on any failure the staging is removed."""
        staging = self._store.fresh_staging(request.checkpoint_id, request.version)
        images = staging / IMAGES_DIR
        images.mkdir()
        activity.logger.info(
            "checkpoint %s (%s): dumping pid %d", request.name, request.checkpoint_id, request.pid
        )
        try:
            await self._run_dump(request, images)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, staging, True)
            raise

    async def _run_dump(self, request: DumpInput, images: Path) -> None:
        script, env = None, None
        if self._layout is not None:
            script = self._output_copy_script()
            output = self._layout.workload(request.name, request.checkpoint_id).output_log
            env = {
                **os.environ,
                "WARMSTART_OUTPUT": str(output),
                "WARMSTART_OUTPUT_COPY": str(images.parent / WORKLOAD_LOG),
            }
        command = self._criu.dump_command(
            pid=request.pid,
            images_dir=images,
            leave_running=request.leave_running,
            action_script=script,
        )
        what = (
            f"checkpoint {request.name} ({request.checkpoint_id}): criu dump of pid {request.pid}"
        )
        # One dump at a time per working directory: a workload runs in a PID namespace of
        # its own, so CRIU's parasite mounts a /proc for it at `proc.crtools` in its working
        # directory, and two dumps of workloads started from one directory (two captures at
        # once) would collide there (EEXIST, "Can't get /proc fd").
        lock = self._in_cwd.setdefault(_cwd(request.pid), asyncio.Lock())
        async with lock:
            await self._pre_dumps.dump(command, images, what=what, env=env)

    def _output_copy_script(self) -> Path:
        assert self._layout is not None
        script = self._layout.home / "bin" / "criu-post-dump"
        if not script.is_file() or script.read_text() != OUTPUT_COPY_SCRIPT:
            script.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(script, OUTPUT_COPY_SCRIPT.encode(), durable=False)
            script.chmod(0o700)
        return script


def _cwd(pid: int) -> str:
    """The working directory of `pid` as the node sees it ("" if it cannot be read: the
    dump then reports what is wrong with the process)."""
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""
