"""Local workloads: launch a program detached in its own PID namespace, await readiness, stop it.

The program runs as init of a new PID namespace so a restore can give back its PIDs
without colliding with the host's; a shell outside the namespace records its exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from temporalio import activity

from activities.contracts import (
    AwaitReadyInput,
    Heartbeat,
    LaunchInput,
    LaunchResult,
    SentinelInput,
    StopInput,
)
from activities.host.files import tail, write_atomically
from activities.host.layout import LaunchRecord, NodeLayout, WorkloadPaths
from activities.host.processes import find_descendant, is_alive, start_ticks, terminate
from activities.host.sentinels import (
    STALE_SENTINELS,
    clear_sentinels,
    wait_for_file,
    write_sentinel_file,
)
from activities.steps import LocalProcessSteps, SentinelSteps
from api.dynamo import control_dir_env
from api.errors import (
    InvalidSpecError,
    RestoreFailedError,
    WorkloadExitedError,
    WorkloadNotReadyError,
)
from api.manifest import SourceInfo
from api.reasons import Sentinel
from api.workload import LocalWorkload, Readiness

# $1 log, $2 exit-status file, the rest is the command. `setsid` makes the namespace
# init a session leader so CRIU finds the whole session inside the dumped tree.
_LAUNCHER = (
    'log=$1; status=$2; shift 2; unshare --pid --fork setsid "$@" </dev/null >>"$log" 2>&1; '
    'echo $? >"$status"'
)
# What a workload inherits from the node worker: where programs are and how text is encoded.
# Nothing else: the worker's own environment may hold credentials, and whatever a workload
# has in its environment is dumped into the checkpoint with it.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")
_PROBE_INTERVAL = 0.2
_TAIL_LINES, _TAIL_BYTES = 8, 1024
_ANSWER_POLL_SECONDS = 0.005
_STOP_GRACE_SECONDS = 5.0


def inherited_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of the node worker's environment that workloads start from."""
    return {key: environ[key] for key in INHERITED_ENV if key in environ}


def resolve_secrets(
    workload: LocalWorkload, environ: Mapping[str, str], directory: Path
) -> dict[str, str]:
    """The values of `workload.secret_env`; a missing one is an error naming the reference."""
    values = {}
    for name, ref in workload.secret_env.items():
        if ref.env is not None:
            value = environ.get(ref.env)
        else:
            path = directory / str(ref.file)
            value = path.read_text().rstrip("\n") if path.is_file() else None
        if value is None and ref.env is not None:
            raise InvalidSpecError(
                f"workload {workload.name}: secret {name} ({ref}): the node worker offers no "
                f"variable {ref.env} to workloads (WARMSTART_NODE__SECRET_ENV names those it "
                "offers)"
            )
        if value is None:
            raise InvalidSpecError(
                f"workload {workload.name}: secret {name} ({ref}): no {directory}/{ref.file}"
            )
        values[name] = value
    return values


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


class LocalProcessActivities(LocalProcessSteps):
    """Node activities for workloads that run as local processes (the embedded default)."""

    def __init__(
        self,
        *,
        layout: NodeLayout,
        base_env: Mapping[str, str],
        secret_environ: Mapping[str, str] | None = None,
    ) -> None:
        """`base_env`: all a workload inherits (see `inherited_env`); it gets that, the
        environment its spec names, its secrets resolved here (from `secret_environ` or
        the layout's secrets directory), and its control directory in the variables of
        `api.dynamo.control_dir_env`."""
        self._layout = layout
        self._base_env = dict(base_env)
        self._secret_environ = dict(secret_environ or {})

    @activity.defn
    async def launch_workload(self, request: LaunchInput) -> LaunchResult:
        workload = request.workload
        paths = self._layout.workload(workload.name, request.checkpoint_id)
        info = activity.info()
        earlier = live_launch(paths)
        if earlier is not None:
            if (earlier.workflow_id, earlier.run_id) == (info.workflow_id, info.workflow_run_id):
                # An earlier attempt of this launch started it and its result was lost
                # (worker killed, timeout): adopt it rather than start a second one.
                activity.logger.info(
                    "workload %s already runs as pid %d: adopted", workload.name, earlier.pid
                )
                return LaunchResult(pid=earlier.pid, start_ticks=earlier.start_ticks)
            activity.logger.warning(
                "stopping pid %d, left running by %s", earlier.pid, earlier.workflow_id
            )
            await terminate(earlier.pid, grace_seconds=_STOP_GRACE_SECONDS)
        paths.control_dir.mkdir(parents=True, exist_ok=True)
        clear_sentinels(paths.control_dir, STALE_SENTINELS)
        if paths.output_log.exists():
            paths.output_log.replace(paths.root / "output.log.previous")
        paths.output_log.touch()
        paths.exit_status.unlink(missing_ok=True)
        secrets = resolve_secrets(workload, self._secret_environ, self._layout.secrets)
        env = {**self._base_env, **workload.env, **secrets}
        env.update(control_dir_env(str(paths.control_dir)))
        activity.logger.info("launching workload %s: %s", workload.name, " ".join(workload.command))
        launcher = ("sh", "-c", _LAUNCHER, "warmstart-launch", str(paths.output_log))
        try:
            shell = await asyncio.create_subprocess_exec(
                *launcher,
                str(paths.exit_status),
                *workload.command,
                cwd=workload.cwd,
                env=env,
                start_new_session=True,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except OSError as err:
            raise InvalidSpecError(f"workload {workload.name}: cannot start: {err}") from err
        # sh -> unshare -> namespace init (the workload)
        pid = await find_descendant(shell.pid, 2, timeout=10.0)
        if pid is None:
            raise await _exited_error(workload.name, paths, secrets)
        record = LaunchRecord(
            workload=workload,
            pid=pid,
            start_ticks=start_ticks(pid),
            workflow_id=info.workflow_id,
            run_id=info.workflow_run_id,
        )
        write_atomically(paths.launch_record, record.model_dump_json().encode(), durable=False)
        activity.logger.info("workload %s runs as pid %d", workload.name, pid)
        return LaunchResult(pid=pid, start_ticks=record.start_ticks)

    @activity.defn
    async def await_workload_ready(self, request: AwaitReadyInput) -> None:
        workload = request.workload
        paths = self._layout.workload(workload.name, request.checkpoint_id)
        secrets = self._secrets_or_none(workload)
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def check() -> None:
            activity.heartbeat(Heartbeat(waited_seconds=round(loop.time() - started, 1)))
            if not is_alive(request.pid):
                raise await _exited_error(workload.name, paths, secrets)

        if workload.readiness.kind == "sentinel":
            found = await wait_for_file(
                paths.control_dir,
                [Sentinel.READY_FOR_SNAPSHOT.value],
                timeout=workload.ready_timeout_seconds,
                check=check,
            )
            ready = found is not None
        else:
            ready = await _probe_until_ready(workload, check)
        if not ready:
            raise WorkloadNotReadyError(
                f"workload {workload.name} not ready after {workload.ready_timeout_seconds:g} s "
                f"({workload.readiness.kind}); last output:\n{output_tail(paths, secrets)}"
            )
        if not is_alive(request.pid):
            raise await _exited_error(workload.name, paths, secrets)

    def _secrets_or_none(self, workload: LocalWorkload) -> dict[str, str]:
        """The workload's secret values, to keep them out of messages (none if unresolvable)."""
        try:
            return resolve_secrets(workload, self._secret_environ, self._layout.secrets)
        except InvalidSpecError:
            return {}

    @activity.defn
    async def stop_workload(self, request: StopInput) -> None:
        """Stop a launched or restored workload, unless its PID now belongs to another process."""
        pid, ticks = request.pid, request.start_ticks
        if not pid:
            try:
                launched = self._layout.read_launch(request.name, request.checkpoint_id)
            except FileNotFoundError:
                return  # the launch never got as far as starting anything
            pid, ticks = launched.pid, launched.start_ticks
        if start_ticks(pid) != ticks:
            return  # ours is gone; the PID now belongs to someone else, or no one
        activity.logger.info("stopping pid %d", pid)
        await terminate(pid, grace_seconds=_STOP_GRACE_SECONDS)


def live_launch(paths: WorkloadPaths) -> LaunchRecord | None:
    """The launch record of `paths` if the process it names still runs (same start time)."""
    try:
        record = LaunchRecord.model_validate_json(paths.launch_record.read_bytes())
    except (OSError, ValueError):
        return None
    alive = record.start_ticks and start_ticks(record.pid) == record.start_ticks
    return record if alive else None


async def _probe_until_ready(workload: LocalWorkload, check: Callable[[], Awaitable[None]]) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + workload.ready_timeout_seconds
    while loop.time() < deadline:
        await check()
        if await probe_ready(workload.readiness):
            return True
        await asyncio.sleep(_PROBE_INTERVAL)
    return False


def output_tail(paths: WorkloadPaths, secrets: Mapping[str, str]) -> str:
    """The end of the workload's output for a failure message: a few lines, at most 1 KiB,
    with the values of its secrets masked (the message goes into the workflow history)."""
    text = tail(paths.output_log, lines=_TAIL_LINES, max_bytes=_TAIL_BYTES)
    for value in sorted(secrets.values(), key=len, reverse=True):
        if value:
            text = text.replace(value, "***")
    return text


async def _exited_error(
    name: str, paths: WorkloadPaths, secrets: Mapping[str, str]
) -> WorkloadExitedError:
    """WorkloadExited with the exit status and the tail of the workload's output."""
    # The launcher shell writes the status right after the namespace ends.
    for _ in range(100):
        if paths.exit_status.exists() and paths.exit_status.read_text().strip():
            break
        await asyncio.sleep(0.02)
    status = paths.exit_status.read_text().strip() if paths.exit_status.exists() else "unknown"
    return WorkloadExitedError(
        f"workload {name} exited with status {status} before it was ready; "
        f"last output:\n{output_tail(paths, secrets)}"
    )


def prepare_restore_target(source: SourceInfo, saved_output: Path, *, state: Path) -> None:
    """Put back what CRIU finds by path: the output file at its dumped size, a clean control dir.

    Both must lie under `state` (this node's workload state): a manifest, whoever wrote it,
    makes the node create and replace files there and nowhere else. The working directory
    is not created; CRIU says so if it is missing.
    """
    control_dir = confined(source.control_dir, state, what="control_dir")
    log_path = confined(source.log_path, state, what="log_path")
    control_dir.mkdir(parents=True, exist_ok=True)
    clear_sentinels(control_dir, STALE_SENTINELS)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # The path never goes missing: restores of one checkpoint running at once (a storm,
    # decision 0040) each have CRIU open it, while another may be replacing it.
    fresh = log_path.with_name(f".{log_path.name}.{uuid.uuid4().hex}")
    shutil.copyfile(saved_output, fresh)
    with contextlib.suppress(FileNotFoundError):
        kept = log_path.with_name(f".{log_path.name}.{uuid.uuid4().hex}")
        os.link(log_path, kept)
        os.replace(kept, log_path.with_name(log_path.name + ".previous"))
    os.replace(fresh, log_path)


def confined(path: str, root: Path, *, what: str) -> Path:
    """`path` resolved, if it lies under `root`; else InvalidSpecError naming the field."""
    resolved = Path(path).resolve()
    if not path or not resolved.is_relative_to(root.resolve()):
        raise InvalidSpecError(f"manifest {what} {path!r} is outside {root}: refused")
    return resolved


async def await_answer(pid: int, url: str | None, *, timeout: float) -> None:
    """The restored process is alive and, where it has an HTTP endpoint, answering."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if not is_alive(pid):
            raise RestoreFailedError(f"restored process {pid} exited")
        if url is None or await asyncio.to_thread(http_ok, url, 1.0):
            return
        if loop.time() > deadline:
            raise RestoreFailedError(
                f"restored process {pid} did not answer {url} within {timeout:g} s"
            )
        await asyncio.sleep(_ANSWER_POLL_SECONDS)


class SentinelActivities(SentinelSteps):
    """Node activities of the sentinel protocol."""

    def __init__(self, *, layout: NodeLayout) -> None:
        self._layout = layout

    @activity.defn
    async def write_sentinel(self, request: SentinelInput) -> None:
        control_dir = self._layout.workload(request.name, request.checkpoint_id).control_dir
        activity.logger.info("writing %s in %s", request.sentinel, control_dir)
        await asyncio.to_thread(write_sentinel_file, control_dir, request.sentinel)
