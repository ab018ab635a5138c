"""CRIU, the external system that dumps and restores process trees.

`Criu` builds the commands, `run_dump` runs a dump (heartbeating the bytes written, killed
with what it started on cancel), and the log helpers pick the lines that explain a failure.
Used by both modes: local (`activities.local.dump`) and containers (`activities.runtime`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import resource
import shutil
import signal
import subprocess
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from temporalio import activity

from activities.contracts import Heartbeat
from activities.host.files import tail, tree_size
from api.errors import DumpFailedError, RestoreFailedError

DUMP_LOG = "dump.log"
RESTORE_LOG = "restore.log"
LAZY_PAGES_LOG = "lazy-pages.log"
RESTORED_PIDFILE = "restored.pid"  # in a restore's work directory: the restored root
IMAGES_DIR = "criu"
# A dumped pid-namespace init keeps its tree's PIDs; the session is inside the tree.
DUMP_OPTIONS = ("-v4",)
CONTAINER_DUMP_OPTIONS = (
    "--leave-running",
    "--ext-mount-map",
    "auto",
    "--enable-external-sharing",
    "--enable-external-masters",
    "--manage-cgroups=ignore",
    "--tcp-established",
    "--file-locks",
    "--ext-unix-sk",
    "--link-remap",
    "--ghost-limit",
    "512M",
)
# A CRIU action script: at post-dump the dumped tree is still frozen, so the workload's
# output file is copied at exactly the size CRIU recorded (restore checks that size), even
# when the workload goes on writing after a leave-running dump.
OUTPUT_COPY_SCRIPT = """#!/bin/sh
[ "$CRTOOLS_SCRIPT_ACTION" = post-dump ] || exit 0
[ -n "$WARMSTART_OUTPUT" ] || exit 0
exec cp -- "$WARMSTART_OUTPUT" "$WARMSTART_OUTPUT_COPY"
"""
# Default verbosity: -v4 logging costs tens of milliseconds on the latency-bound restore path.
RESTORE_OPTIONS = ("--restore-detached",)
# The lazy-pages daemon logs at debug level: each page fault it serves (`#PF at`) and the
# count it transferred, a line per chunk (about 1500 lines for 256 MiB), off the path that
# answers (the restored process already runs).
LAZY_PAGES_OPTIONS = ("-v4",)
# Into a standby container: cgroups are the standby's (CRIU runs in them), TCP
# connections are closed (the pod's address differs), every bind mount is mapped explicitly
# (no `--ext-mount-map auto`: a dump's autodetected mount names the source pod's directory,
# so CRIU refuses it rather than bind that).
CONTAINER_RESTORE_OPTIONS = (
    *RESTORE_OPTIONS,
    "--manage-cgroups=ignore",
    "--tcp-close",
    "--file-locks",
    "--ext-unix-sk",
    "--enable-external-sharing",
    "--enable-external-masters",
    # CRIU's first mount engine: the second (mount-v2) copies each external mount's sharing
    # group from its source, which fails (EINVAL) when the node worker runs in a pod, whose
    # copies of the node's mounts are slaves (decision 0033).
    "--mntns-compat-mode",
)
_ERROR_LINE = re.compile(r"\b(Error|error|Fail|fail|Can't|can't|Unable|unable)\b")
_HEARTBEAT_SECONDS = 1.0


# Error lines CRIU logs on runs that succeed, and why they are harmless: after a successful
# run the explanation is appended to the log, and a failure's message leaves them out.
_RLIMIT = "Can't setup RLIMIT_NOFILE for self"
_UNLOCK = "tables-restore: line 3 failed: Bad rule"
_EXITED = "exited, status=1"
HARMLESS_LINES = {
    _RLIMIT: (
        "CRIU tries to raise its own open-files limit to fs.nr_open and this node does not "
        "let it (no CAP_SYS_RESOURCE beyond the hard limit); it goes on with the limit it "
        "has, which only a process tree holding more open files would exceed (CRIU would "
        "then fail naming the file)"
    ),
    _UNLOCK: (
        "at the end of a restore CRIU unlocks the network with the method the dump recorded "
        "(iptables): it deletes the jumps to its CRIU chain that the dump added in the source "
        "pod's network namespace, but the restored tree lives in the new pod's namespace "
        "(external: CRIU neither restored nor locked it), which never had them; there is "
        "nothing to unlock (TCP connections are closed, not repaired), and CRIU allows this "
        "helper to fail (`--network-lock` cannot be changed at restore)"
    ),
    _EXITED: "the exit of the iptables-restore (or ip6tables-restore) helper above",
}


def log_errors(log_path: Path, *, limit: int = 12) -> str:
    """The lines of a CRIU log that explain a failure (falls back to its tail); the
    harmless ones left out."""
    text = tail(log_path, lines=4000, max_bytes=1 << 20)
    errors = [
        line
        for line in text.splitlines()
        if _ERROR_LINE.search(line) and _RLIMIT not in line and _UNLOCK not in line
    ]
    return "\n".join(errors[-limit:]) if errors else "\n".join(text.splitlines()[-limit:])


def explain_log(log_path: Path) -> None:
    """After a successful run: a line appended to its CRIU log for each harmless error line
    in it, saying why (with this process's open-files limits, which CRIU inherited)."""
    try:
        text = tail(log_path, lines=4000, max_bytes=1 << 20)
    except OSError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limits = {_RLIMIT: f" (here: soft {soft}, hard {hard}, fs.nr_open {_nr_open()})"}
    notes = [
        f"warmstart: harmless, the run succeeded: {known!r} above: {why}{limits.get(known, '')}\n"
        for known, why in HARMLESS_LINES.items()
        # a helper's exit is explained only beside the unlock that explains it
        if known in text and (known != _EXITED or _UNLOCK in text)
    ]
    if notes:
        with log_path.open("a") as log:
            log.writelines(notes)


def _nr_open() -> str:
    try:
        return Path("/proc/sys/fs/nr_open").read_text().strip()
    except OSError:
        return "unknown"


@dataclass(frozen=True)
class ContainerRestoreTarget:
    """Where a container dump is restored to: the target container's root as mounted on the
    node, its bind mounts by mount point (the keys the dump recorded) → node path, and the
    descriptors CRIU is handed (external keys such as `extNetNs` or `pipe:[inode]`, and
    namespaces to join: `uts`, `ipc`)."""

    images_dir: Path
    work_dir: Path
    pidfile: Path
    root: Path
    bind_mounts: Mapping[str, Path] = field(default_factory=dict)
    inherit_fds: Mapping[str, int] = field(default_factory=dict)
    join_fds: Mapping[str, int] = field(default_factory=dict)
    action_script: Path | None = None
    # Memory left to the lazy-pages daemon listening in `work_dir` (decision 0034).
    lazy: bool = False


@dataclass(frozen=True)
class Criu:
    """The criu binary and the commands we run with it."""

    path: str

    def dump_command(
        self,
        *,
        pid: int,
        images_dir: Path,
        leave_running: bool = False,
        action_script: Path | None = None,
    ) -> list[str]:
        images = ["--images-dir", str(images_dir), "--log-file", DUMP_LOG]
        extra = ["--leave-running"] if leave_running else []
        if action_script is not None:
            extra += ["--action-script", str(action_script)]
        return [self.path, "dump", "--tree", str(pid), *images, *DUMP_OPTIONS, *extra]

    def container_dump_command(
        self,
        *,
        pid: int,
        images_dir: Path,
        netns_inode: int,
        freezer: Path | None = None,
        bind_mounts: Sequence[str] = (),
    ) -> list[str]:
        """A container's init: its root and mounts as the container sees them (mounts outside
        CRIU's view are external), its network namespace external (the pod keeps it), TCP
        connections kept, the whole container frozen through its freezer cgroup while it is
        dumped, and the tree left running (the workload decides when to exit).

        `bind_mounts`: the container's mount points of node directories, recorded under
        their mount point as key, so that a restore binds the target pod's own directories
        there (an autodetected mount is recorded with the source pod's node path)."""
        images = ["--images-dir", str(images_dir), "--log-file", DUMP_LOG]
        keys = [arg for point in bind_mounts for arg in ("--ext-mount-map", f"{point}:{point}")]
        return [
            self.path,
            "dump",
            "--tree",
            str(pid),
            *images,
            *DUMP_OPTIONS,
            *CONTAINER_DUMP_OPTIONS,
            *keys,
            "--root",
            f"/proc/{pid}/root",
            "--external",
            f"net[{netns_inode}]:extNetNs",
            *(["--freeze-cgroup", str(freezer)] if freezer is not None else []),
        ]

    def container_restore_command(self, target: ContainerRestoreTarget) -> list[str]:
        """A container dump restored into another container (`ContainerRestoreTarget`)."""
        dirs = ["--images-dir", str(target.images_dir), "--work-dir", str(target.work_dir)]
        outputs = ["--log-file", RESTORE_LOG, "--pidfile", str(target.pidfile)]
        mounts = [
            arg
            for point, path in target.bind_mounts.items()
            for arg in ("--ext-mount-map", f"{point}:{path}")
        ]
        fds = [
            arg
            for key, fd in target.inherit_fds.items()
            for arg in ("--inherit-fd", f"fd[{fd}]:{key}")
        ]
        joins = [
            arg
            for kind, fd in target.join_fds.items()
            for arg in ("--join-ns", f"{kind}:/proc/self/fd/{fd}")
        ]
        script = ["--action-script", str(target.action_script)] if target.action_script else []
        lazy = ["--lazy-pages"] if target.lazy else []
        return [
            self.path,
            "restore",
            *dirs,
            *outputs,
            *CONTAINER_RESTORE_OPTIONS,
            *lazy,
            "--root",
            str(target.root),
            *mounts,
            *fds,
            *joins,
            *script,
        ]

    def restore_command(
        self, *, images_dir: Path, work_dir: Path, pidfile: Path, lazy: bool = False
    ) -> list[str]:
        """`lazy`: memory is left to the lazy-pages daemon listening in `work_dir`
        (`lazy_pages_command`), which serves it on fault and in the background."""
        dirs = ["--images-dir", str(images_dir), "--work-dir", str(work_dir)]
        outputs = ["--log-file", RESTORE_LOG, "--pidfile", str(pidfile)]
        extra = ["--lazy-pages"] if lazy else []
        return [self.path, "restore", *dirs, *outputs, *RESTORE_OPTIONS, *extra]

    def lazy_pages_command(
        self, *, images_dir: Path, work_dir: Path, status_fd: int, page_server_fd: int = -1
    ) -> list[str]:
        """The lazy-pages daemon of one restore: it listens in `work_dir` (where `criu restore
        --lazy-pages` looks for it), writes a byte to `status_fd` once it does, reads the
        pages from `images_dir` (or asks for them on `page_server_fd`, CRIU's page-server
        protocol: a streamed restore's page source) and exits once every page is
        delivered."""
        dirs = ["--images-dir", str(images_dir), "--work-dir", str(work_dir)]
        outputs = ["--log-file", LAZY_PAGES_LOG, "--status-fd", str(status_fd)]
        remote = (
            ["--page-server", "--ps-socket", str(page_server_fd)] if page_server_fd >= 0 else []
        )
        return [self.path, "lazy-pages", *dirs, *outputs, *remote, *LAZY_PAGES_OPTIONS]

    def check_command(self, feature: str) -> list[str]:
        return [self.path, "check", "--feature", feature]

    def version(self) -> str:
        """Asked once per binary: every activity class of a node records or compares it."""
        return _version(self.path)

    async def restore(self, *, images_dir: Path, work_dir: Path, lazy: bool = False) -> int:
        """Restore detached; return the PID of the restored tree's root. `lazy`: with the
        lazy-pages daemon already listening in `work_dir` (`activities.criu.lazy`)."""
        work_dir.mkdir(parents=True, exist_ok=True)
        pidfile = work_dir / RESTORED_PIDFILE
        cmd = self.restore_command(
            images_dir=images_dir, work_dir=work_dir, pidfile=pidfile, lazy=lazy
        )
        proc = await spawn(cmd)
        _, stderr = await proc.communicate()
        if proc.returncode != 0:
            detail = log_errors(work_dir / RESTORE_LOG) or stderr.decode(errors="replace")[-4096:]
            detail = detail.strip() or "(no log lines and no output)"
            raise RestoreFailedError(f"criu restore exited with {proc.returncode}:\n{detail}")
        explain_log(work_dir / RESTORE_LOG)
        return int(pidfile.read_text().strip())


@functools.cache
def _version(path: str) -> str:
    out = subprocess.run(
        [path, "--version"], capture_output=True, text=True, check=False, timeout=10
    ).stdout
    match = re.search(r"Version:\s*(\S+)", out)
    return match.group(1) if match else "unknown"


async def spawn(
    cmd: list[str], env: dict[str, str] | None = None, *, pass_fds: Collection[int] = ()
) -> asyncio.subprocess.Process:
    """CRIU in its own process group, so that stopping it stops whatever it started too."""
    return await asyncio.create_subprocess_exec(
        *cmd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        pass_fds=pass_fds,
    )


def dies_with_worker(cmd: list[str]) -> list[str]:
    """`cmd` run so that it is killed when its parent dies (util-linux `setpriv
    --pdeathsig`): a dump must not go on writing staging for a worker that is gone, nor a
    restore go on into a standby that nobody will tell."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", *cmd] if setpriv else cmd


async def _spawn_uncancelled(
    cmd: list[str], env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """Start CRIU; a cancel that arrives meanwhile still stops its whole process group."""
    spawning = asyncio.ensure_future(spawn(cmd, env))
    try:
        return await asyncio.shield(spawning)
    except asyncio.CancelledError:
        await _kill_group(await spawning)
        raise


async def _tail(stream: asyncio.StreamReader | None, *, keep: int = 4096) -> str:
    """Everything `stream` says until it closes, keeping the last `keep` bytes."""
    kept = b""
    while stream is not None and (chunk := await stream.read(65536)):
        kept = (kept + chunk)[-keep:]
    return kept.decode(errors="replace")


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


async def run_dump(
    command: list[str], images: Path, *, what: str, env: dict[str, str] | None = None
) -> None:
    """Run a CRIU dump into `images`, heartbeating the bytes written; it dies with the node
    worker, a cancel kills it and what it started, a failure is DumpFailed with dump.log."""
    proc = await _spawn_uncancelled(dies_with_worker(command), env)
    # Read stderr while CRIU runs: a full pipe would block CRIU, and with it the dump.
    errors = asyncio.ensure_future(_tail(proc.stderr))
    try:
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), _HEARTBEAT_SECONDS)
                break
            except TimeoutError:
                activity.heartbeat(Heartbeat(stage="dumping", bytes=tree_size(images)))
    except asyncio.CancelledError:
        await _kill_group(proc)
        errors.cancel()
        raise
    stderr = await errors
    if proc.returncode != 0:
        detail = log_errors(images / DUMP_LOG) or stderr.strip()
        raise DumpFailedError(
            f"{what} failed with exit code {proc.returncode}; dump.log:\n{detail}"
        )
    explain_log(images / DUMP_LOG)  # before the commit digests it


# "" when a feature is there, else why not (a line a log and a result can carry).
Probe = Callable[[], str]


def feature_probe(criu: Criu, feature: str) -> Probe:
    """`criu check --feature FEATURE`, asked once, on first use: "" when CRIU and this
    kernel have it, else why not."""
    answer: list[str] = []

    def probe() -> str:
        if not answer:
            answer.append(_check_feature(criu, feature))
        return answer[0]

    return probe


def _check_feature(criu: Criu, feature: str) -> str:
    asked = f"`criu check --feature {feature}`"
    try:
        done = subprocess.run(
            criu.check_command(feature), capture_output=True, text=True, check=False, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{asked} could not run: {err}"
    if done.returncode == 0:
        return ""
    said = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["(no output)"]
    return f"{asked} exited with {done.returncode}: {said[0]}"
