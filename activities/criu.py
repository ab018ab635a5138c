"""CRIU, the external system that dumps and restores process trees.

`Criu` builds and runs the commands; `CriuActivities` is the node activity that dumps
into a staging directory, heartbeating progress, and maps failures to DumpFailed.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from temporalio import activity

from activities.contracts import DumpInput, DumpResult
from activities.errors import fatal
from activities.files import tail, tree_size
from activities.storage import CheckpointStore
from api.reasons import Reason

DUMP_LOG = "dump.log"
RESTORE_LOG = "restore.log"
IMAGES_DIR = "criu"
# A dumped pid-namespace init keeps its tree's PIDs; the session is inside the tree.
DUMP_OPTIONS = ("-v4",)
# Default verbosity: -v4 logging costs tens of milliseconds on the latency-bound restore path.
RESTORE_OPTIONS = ("--restore-detached",)
_ERROR_LINE = re.compile(r"\b(Error|error|Fail|fail|Can't|can't|Unable|unable)\b")


class CriuError(Exception):
    """A CRIU command failed; the message carries the relevant log lines."""


def log_errors(log_path: Path, *, limit: int = 12) -> str:
    """The lines of a CRIU log that explain a failure (falls back to its tail)."""
    text = tail(log_path, lines=4000, max_bytes=1 << 20)
    errors = [line for line in text.splitlines() if _ERROR_LINE.search(line)]
    return "\n".join(errors[-limit:]) if errors else "\n".join(text.splitlines()[-limit:])


@dataclass(frozen=True)
class Criu:
    """The criu binary and the commands we run with it."""

    path: str

    def dump_command(self, *, pid: int, images_dir: Path) -> list[str]:
        return [
            self.path, "dump", "--tree", str(pid), "--images-dir", str(images_dir),
            "--log-file", DUMP_LOG, *DUMP_OPTIONS,
        ]  # fmt: skip

    def restore_command(self, *, images_dir: Path, work_dir: Path, pidfile: Path) -> list[str]:
        return [
            self.path, "restore", "--images-dir", str(images_dir), "--work-dir", str(work_dir),
            "--log-file", RESTORE_LOG, "--pidfile", str(pidfile), *RESTORE_OPTIONS,
        ]  # fmt: skip

    def version(self) -> str:
        import subprocess

        out = subprocess.run(
            [self.path, "--version"], capture_output=True, text=True, check=False, timeout=10
        ).stdout
        match = re.search(r"Version:\s*(\S+)", out)
        return match.group(1) if match else "unknown"

    async def restore(self, *, images_dir: Path, work_dir: Path) -> int:
        """Restore detached; return the PID of the restored tree's root."""
        work_dir.mkdir(parents=True, exist_ok=True)
        pidfile = work_dir / "restored.pid"
        cmd = self.restore_command(images_dir=images_dir, work_dir=work_dir, pidfile=pidfile)
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await proc.communicate()
        if proc.returncode != 0:
            detail = log_errors(work_dir / RESTORE_LOG) or stderr.decode(errors="replace")
            raise CriuError(f"criu restore exited with {proc.returncode}:\n{detail}")
        return int(pidfile.read_text().strip())


class CriuActivities:
    """Node activity: CRIU dump straight into a staging directory of the checkpoint store."""

    def __init__(self, *, criu: Criu, store: CheckpointStore) -> None:
        self._criu = criu
        self._store = store

    @activity.defn(name="dump_checkpoint")
    async def dump_checkpoint(self, request: DumpInput) -> DumpResult:
        staging = self._store.new_staging(request.checkpoint_id)
        images = staging / IMAGES_DIR
        images.mkdir(parents=True)
        started = time.monotonic()
        activity.logger.info(
            "checkpoint %s (%s): dumping pid %d", request.name, request.checkpoint_id, request.pid
        )
        try:
            await self._run_dump(request, images)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, staging, True)
            raise
        return DumpResult(
            staging_dir=str(staging),
            size_bytes=tree_size(staging),
            seconds=time.monotonic() - started,
        )

    async def _run_dump(self, request: DumpInput, images: Path) -> None:
        proc = await asyncio.create_subprocess_exec(
            *self._criu.dump_command(pid=request.pid, images_dir=images),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            while True:
                try:
                    await asyncio.wait_for(asyncio.shield(proc.wait()), timeout=1.0)
                    break
                except TimeoutError:
                    activity.heartbeat({"phase": "dumping", "bytes": tree_size(images)})
        except asyncio.CancelledError:
            proc.kill()
            await proc.wait()
            raise
        stderr = (await proc.stderr.read()).decode(errors="replace") if proc.stderr else ""
        if proc.returncode != 0:
            detail = log_errors(images / DUMP_LOG) or stderr.strip()
            raise fatal(
                Reason.DUMP_FAILED,
                f"checkpoint {request.name} ({request.checkpoint_id}): criu dump of pid "
                f"{request.pid} failed with exit code {proc.returncode}; dump.log:\n{detail}",
            )
