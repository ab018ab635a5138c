"""The restore critical path as one node activity: verify, prepare, CRIU restore, hand over.

One activity (not several) because every matching hop costs tens of milliseconds on a
path where each 100 ms shows up in time-to-serve; phases are reported by heartbeat.
"""

from __future__ import annotations

import asyncio
import platform
import shutil
import time
import uuid
from pathlib import Path

from temporalio import activity

from activities.contracts import RestoreInput, RestoreResult
from activities.criu import IMAGES_DIR, Criu, CriuError
from activities.errors import fatal
from activities.local import http_ok
from activities.processes import is_alive, terminate
from activities.sentinels import STALE_SENTINELS, clear_sentinels, write_sentinel_file
from activities.storage import (
    WORKLOAD_LOG,
    CheckpointNotFoundError,
    CheckpointStore,
    DigestMismatchError,
)
from api.manifest import Manifest
from api.reasons import Reason, Sentinel

_ANSWER_POLL_SECONDS = 0.005


class _Phases:
    """Wall time per phase, reported by heartbeat as each one starts."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._name = ""
        self._started = time.monotonic()

    def start(self, name: str) -> None:
        self.finish()
        self._name, self._started = name, time.monotonic()
        activity.heartbeat({"phase": name})

    def finish(self) -> None:
        if self._name:
            self.seconds[self._name] = round(time.monotonic() - self._started, 4)
            self._name = ""


class RestoreActivities:
    def __init__(self, *, criu: Criu, store: CheckpointStore, state_dir: Path) -> None:
        self._criu = criu
        self._store = store
        self._state_dir = state_dir

    @activity.defn(name="restore_checkpoint")
    async def restore_checkpoint(self, request: RestoreInput) -> RestoreResult:
        phases = _Phases()
        phases.start("verify")
        version_dir, manifest = await asyncio.to_thread(self._verified, request)
        control_dir = Path(manifest.source.control_dir)
        pid = 0
        try:
            phases.start("prepare")
            await asyncio.to_thread(_prepare_target, version_dir, manifest)
            phases.start("criu-restore")
            work_dir = self._state_dir / "restores" / request.name / uuid.uuid4().hex
            pid = await self._criu.restore(images_dir=version_dir / IMAGES_DIR, work_dir=work_dir)
            write_sentinel_file(control_dir, Sentinel.RESTORE_COMPLETE.value)
            phases.start("await-answer")
            await _await_answer(pid, manifest, request)
            phases.finish()
        except (CriuError, _NotAnswering) as err:
            await self._fall_back(pid, control_dir, str(err))
            raise fatal(
                Reason.RESTORE_FAILED,
                f"restore of {request.name} from checkpoint {manifest.checkpoint_id} "
                f"version {manifest.version} failed: {err}",
            ) from err
        except BaseException:
            await self._fall_back(pid, control_dir, "restore interrupted")
            raise
        activity.logger.info("restored %s as pid %d: %s", request.name, pid, phases.seconds)
        return RestoreResult(
            pid=pid, manifest=manifest, version_dir=str(version_dir), phase_seconds=phases.seconds
        )

    def _verified(self, request: RestoreInput) -> tuple[Path, Manifest]:
        try:
            version_dir = self._store.find(request.checkpoint_id, request.version)
            manifest = self._store.verify(version_dir, checkpoint_id=request.checkpoint_id)
        except CheckpointNotFoundError as err:
            raise fatal(Reason.CHECKPOINT_NOT_FOUND, str(err)) from err
        except DigestMismatchError as err:
            raise fatal(Reason.DIGEST_MISMATCH, f"refusing to restore: {err}") from err
        if manifest.host.arch != platform.machine():
            raise fatal(
                Reason.INCOMPATIBLE,
                f"checkpoint {manifest.checkpoint_id} was made on {manifest.host.arch}, "
                f"this node is {platform.machine()}",
            )
        return version_dir, manifest

    async def _fall_back(self, pid: int, control_dir: Path, reason: str) -> None:
        """Leave nothing half-restored; tell a standby entrypoint to start cold."""
        if pid and is_alive(pid):
            await terminate(pid, grace_seconds=1.0)
        clear_sentinels(control_dir, [Sentinel.RESTORE_COMPLETE.value])
        write_sentinel_file(control_dir, Sentinel.RESTORE_FAILED.value, reason + "\n")


class _NotAnswering(Exception):
    pass


def _prepare_target(version_dir: Path, manifest: Manifest) -> None:
    """Put back what CRIU finds by path: the output file at its dumped size, a clean control dir."""
    source = manifest.source
    control_dir = Path(source.control_dir)
    control_dir.mkdir(parents=True, exist_ok=True)
    clear_sentinels(control_dir, STALE_SENTINELS)
    Path(source.cwd).mkdir(parents=True, exist_ok=True)
    if source.log_path:
        log_path = Path(source.log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if log_path.exists():
            log_path.replace(log_path.with_name(log_path.name + ".previous"))
        shutil.copyfile(version_dir / WORKLOAD_LOG, log_path)


async def _await_answer(pid: int, manifest: Manifest, request: RestoreInput) -> None:
    """The restored process is alive and, where it has an HTTP endpoint, answering."""
    url = manifest.source.health_url or manifest.source.readiness.http_url
    loop = asyncio.get_running_loop()
    deadline = loop.time() + request.answer_timeout_seconds
    while True:
        if not is_alive(pid):
            raise _NotAnswering(f"restored process {pid} exited")
        if url is None or await asyncio.to_thread(http_ok, url, 1.0):
            return
        if loop.time() > deadline:
            raise _NotAnswering(
                f"restored process {pid} did not answer {url} "
                f"within {request.answer_timeout_seconds:g} s"
            )
        await asyncio.sleep(_ANSWER_POLL_SECONDS)
