"""Local workloads: launch a program detached in its own PID namespace, await readiness, stop it.

The program runs as init of a new PID namespace so a restore can give back its PIDs
without colliding with the host's; a shell outside the namespace records its exit status.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from temporalio import activity

from activities.contracts import (
    AwaitReadyInput,
    AwaitReadyResult,
    LaunchInput,
    LaunchResult,
    StopInput,
)
from activities.errors import fatal
from activities.files import tail
from activities.processes import find_descendant, is_alive, start_ticks, terminate
from activities.sentinels import STALE_SENTINELS, clear_sentinels, wait_for_file
from api.reasons import Reason, Sentinel
from api.workload import LocalWorkload, Readiness

# $1 log, $2 exit-status file, the rest is the command. `setsid` makes the namespace
# init a session leader so CRIU finds the whole session inside the dumped tree.
_LAUNCHER = (
    'log=$1; status=$2; shift 2; unshare --pid --fork setsid "$@" </dev/null >>"$log" 2>&1; '
    'echo $? >"$status"'
)
_PROBE_INTERVAL = 0.2


def workload_dir(state_dir: Path, name: str) -> Path:
    return state_dir / "workloads" / name


async def probe_ready(readiness: Readiness) -> bool:
    """One readiness probe: a TCP connect or an HTTP 2xx, never raising."""
    if readiness.kind == "tcp" and readiness.tcp_port is not None:
        return await asyncio.to_thread(_tcp_open, readiness.tcp_port)
    if readiness.kind == "http" and readiness.http_url is not None:
        return await asyncio.to_thread(http_ok, readiness.http_url)
    return False


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= int(response.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


class LocalProcessActivities:
    """Node activities for workloads that run as local processes (the embedded default)."""

    def __init__(self, *, state_dir: Path, base_env: Mapping[str, str]) -> None:
        self._state_dir = state_dir
        self._base_env = dict(base_env)

    @activity.defn(name="launch_workload")
    async def launch_workload(self, request: LaunchInput) -> LaunchResult:
        workload = request.workload
        home = workload_dir(self._state_dir, workload.name)
        control_dir = home / "control"
        control_dir.mkdir(parents=True, exist_ok=True)
        clear_sentinels(control_dir, STALE_SENTINELS)
        log_path, status_path = home / "output.log", home / "exit-status"
        if log_path.exists():
            log_path.replace(home / "output.log.previous")
        log_path.touch()
        status_path.unlink(missing_ok=True)
        env = {**self._base_env, **workload.env, "SNAPSHOT_CONTROL_DIR": str(control_dir)}
        activity.logger.info("launching workload %s: %s", workload.name, " ".join(workload.command))
        try:
            shell = await asyncio.create_subprocess_exec(
                "sh", "-c", _LAUNCHER, "warmstart-launch", str(log_path), str(status_path),
                *workload.command,
                cwd=workload.cwd, env=env, start_new_session=True,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
        except OSError as err:
            raise fatal(
                Reason.INVALID_SPEC, f"workload {workload.name}: cannot start: {err}"
            ) from err
        # sh -> unshare -> namespace init (the workload)
        pid = await find_descendant(shell.pid, 2, timeout=10.0)
        if pid is None:
            raise await _exited_error(workload, status_path, log_path)
        activity.logger.info("workload %s runs as pid %d", workload.name, pid)
        return LaunchResult(
            pid=pid, start_ticks=start_ticks(pid), control_dir=str(control_dir),
            log_path=str(log_path), exit_status_path=str(status_path),
        )  # fmt: skip

    @activity.defn(name="await_workload_ready")
    async def await_workload_ready(self, request: AwaitReadyInput) -> AwaitReadyResult:
        workload, launch = request.workload, request.launch
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def check() -> None:
            activity.heartbeat({"waited_seconds": round(loop.time() - started, 1)})
            if not is_alive(launch.pid):
                raise await _exited_error(
                    workload, Path(launch.exit_status_path), Path(launch.log_path)
                )

        if workload.readiness.kind == "sentinel":
            found = await wait_for_file(
                Path(launch.control_dir), [Sentinel.READY_FOR_SNAPSHOT.value],
                timeout=workload.ready_timeout_seconds, check=check,
            )  # fmt: skip
            ready = found is not None
        else:
            ready = await self._probe_until_ready(workload, check, started)
        if not ready:
            raise fatal(
                Reason.WORKLOAD_NOT_READY,
                f"workload {workload.name} not ready after {workload.ready_timeout_seconds:g} s "
                f"({workload.readiness.kind}); last output:\n{tail(Path(launch.log_path))}",
            )
        if not is_alive(launch.pid):
            raise await _exited_error(
                workload, Path(launch.exit_status_path), Path(launch.log_path)
            )
        return AwaitReadyResult(waited_seconds=loop.time() - started)

    async def _probe_until_ready(
        self, workload: LocalWorkload, check: object, started: float
    ) -> bool:
        loop = asyncio.get_running_loop()
        while loop.time() - started < workload.ready_timeout_seconds:
            await check()  # type: ignore[operator]
            if await probe_ready(workload.readiness):
                return True
            await asyncio.sleep(_PROBE_INTERVAL)
        return False

    @activity.defn(name="stop_workload")
    async def stop_workload(self, request: StopInput) -> bool:
        """Stop a launched or restored workload; True if it is gone."""
        if request.start_ticks and start_ticks(request.pid) != request.start_ticks:
            return True  # ours is gone; the PID now belongs to someone else, or no one
        activity.logger.info("stopping pid %d", request.pid)
        return await terminate(request.pid, grace_seconds=request.grace_seconds)


async def _exited_error(workload: LocalWorkload, status_path: Path, log_path: Path) -> Exception:
    """WorkloadExited with the exit status and the tail of the workload's output."""
    # The launcher shell writes the status right after the namespace ends.
    for _ in range(100):
        if status_path.exists() and status_path.read_text().strip():
            break
        await asyncio.sleep(0.02)
    status = status_path.read_text().strip() if status_path.exists() else "unknown"
    return fatal(
        Reason.WORKLOAD_EXITED,
        f"workload {workload.name} exited with status {status} before it was ready; "
        f"last output:\n{tail(log_path)}",
    )
