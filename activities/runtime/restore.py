"""Restore a containerd container's checkpoint into the standby container of another pod:
prepare its root, run CRIU so the restored tree lives in the standby, and answer the
standby through the sentinel protocol (`restore-complete` holding the restored PID as the
standby sees it, or `restore-failed` with the reason, and the standby starts cold).

Where the restored tree lives, and why so (CRIU 4.2, cgroup v1 or v2):
- network: the standby's. The dump recorded the pod's network namespace as external
  (`extNetNs`), so it is handed to CRIU as `--inherit-fd fd[N]:extNetNs` (CRIU refuses an
  external netns without one; `--join-ns net` is for namespaces the dump did not record).
- UTS and IPC: the standby's, with `--join-ns`. CRIU joins them and then still writes
  the dumped hostname and IPC settings into them (it restores every namespace the dump
  recorded): a CRIU action script puts the pod's own host and domain names back before the
  restored tree resumes.
- PID: a namespace of its own (the dumped init's, restored as PID 1) nested under the
  standby's: CRIU runs inside the standby's PID namespace (`nsenter --pid`), which
  CRIU allows only with a /proc of that namespace, so it runs in a mount namespace of its
  own with one (`unshare --mount-proc`: a private copy of the node's mounts, so every node
  path stays valid). The restored init is then a child of the standby's PID 1.
- cgroups: the standby's. CRIU is moved into them before it starts
  (`--manage-cgroups=ignore`), and the restored tree is born there.
- mounts: a mount namespace of its own, as dumped, over the standby's root as the
  runtime mounted it on the node (`--root`); each bind mount is bound from the
  standby's own directory for the same mount point (`--ext-mount-map POINT:PATH`; the
  dump keys them by mount point), so the control directory is the standby's, never
  the source pod's.
- stdio: the dumped `pipe:[inode]` of fds 0-2 are replaced by the standby's own pipes
  (`--inherit-fd`), so the container's log carries the restored output.
- TCP connections are closed (`--tcp-close`): the pod's address differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from activities.contracts import ContainerTarget
from activities.criu.command import (
    IMAGES_DIR,
    RESTORE_LOG,
    ContainerRestoreTarget,
    Criu,
    dies_with_worker,
    explain_log,
    log_errors,
    spawn,
)
from activities.gpu.nvml import process_environment
from activities.host.processes import children
from activities.pipeline import Stages
from activities.runtime import chrooted, control
from activities.runtime.base import Located
from activities.runtime.hook_mounts import MOUNTS_FILE, remapped
from activities.runtime.rootfs import apply_rootfs_diff, node_mounts
from api.dynamo import restore_context
from api.errors import RestoreFailedError
from api.manifest import Manifest
from api.reasons import Sentinel

UTS_SCRIPT = "keep-pod-names"
# Run by CRIU: before the restore it saves the pod's names from the standby's UTS
# namespace (its PID 1 shares it, and CRIU runs in its PID namespace), after it (the tree is
# still stopped) it writes them back over the dumped ones.
KEEP_POD_NAMES_SCRIPT = """#!/bin/sh
names="$WARMSTART_WORK_DIR/pod-names"
case "$CRTOOLS_SCRIPT_ACTION" in
pre-restore)
  exec nsenter --target 1 --uts -- cat /proc/sys/kernel/hostname /proc/sys/kernel/domainname \
    > "$names" ;;
post-restore)
  { read -r host && read -r domain; } < "$names" || exit 1
  exec nsenter --target 1 --uts -- /bin/sh -c \
    'printf %s "$1" > /proc/sys/kernel/hostname && printf %s "$2" > /proc/sys/kernel/domainname' \
    sh "$host" "$domain" ;;
esac
"""
# Moves itself into the cgroups named before `--`, then becomes the command after it.
_ENTER_CGROUPS = (
    'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
)
_STDIO_FLAGS = (os.O_RDONLY, os.O_WRONLY, os.O_WRONLY)
# A damaged image can leave CRIU spinning for ever (an emptied pages image does, with 4.2).
RESTORE_TIMEOUT_SECONDS = 300.0


@dataclass(frozen=True)
class RestoredProcess:
    """The restored tree's root: its PID on the node and in the standby's PID namespace
    (what `restore-complete` says)."""

    host_pid: int
    pid: int


def describe(target: ContainerTarget, manifest: Manifest) -> str:
    """How messages name a restore: checkpoint, version and the standby container."""
    return (
        f"checkpoint {manifest.checkpoint_id} version {manifest.version} into container "
        f"{target.container} of pod {target.namespace}/{target.pod_name}"
    )


async def restore_into_container(
    *,
    criu: Criu,
    target: ContainerTarget,
    standby: Located,
    version_dir: Path,
    manifest: Manifest,
    work_dir: Path,
    stages: Stages,
    timeout_seconds: float = RESTORE_TIMEOUT_SECONDS,
    before_complete: Callable[[RestoredProcess], Awaitable[None]] | None = None,
    environ: Mapping[str, str] | None = None,
    lazy: bool = False,
) -> RestoredProcess:
    """Restore the committed `version_dir` into the running `standby` and write
    `restore-complete`, after `before_complete` (e.g. CUDA restore) has run on the restored
    tree; stages `prepare`, `criu-restore`, `cuda-restore` on `stages`. On any failure (or
    cancel) what was restored is killed and the error raised (an OSError as
    RestoreFailedError); `restore-failed` is the caller's to write (one writer per
    failure). `environ`: the standby's environment as Kubernetes resolved it in this pod
    (read from the standby when None); the restored process gets its restore-context names
    before it resumes."""
    where = describe(target, manifest)
    restored: RestoredProcess | None = None
    try:
        stages.start("prepare")
        await prepare_standby(
            pid=standby.pid, version_dir=version_dir, where=where, environ=environ
        )
        stages.start("criu-restore")
        restored = await run_restore(
            criu=criu,
            standby=standby,
            images_dir=version_dir / IMAGES_DIR,
            manifest=manifest,
            work_dir=work_dir,
            where=where,
            timeout_seconds=timeout_seconds,
            lazy=lazy,
        )
        if before_complete is not None:
            stages.start("cuda-restore")
            await before_complete(restored)
        content = f"{restored.pid}\n".encode()
        # Not fsynced: the standby reads it at once, and a node that crashes takes the pod.
        await asyncio.to_thread(
            functools.partial(
                control.write_sentinel,
                standby.pid,
                Sentinel.RESTORE_COMPLETE.value,
                content,
                durable=False,
            )
        )
        return restored
    except BaseException as err:
        _kill_restored(standby.pid, restored)
        if isinstance(err, OSError):
            raise RestoreFailedError(f"{where}: {err}") from err
        raise


async def prepare_standby(
    *, pid: int, version_dir: Path, where: str, environ: Mapping[str, str] | None = None
) -> None:
    """The checkpoint's root filesystem changes applied inside the standby whose init is
    `pid`, and the restore context written in its control directory, from `environ` (else
    the environment `pid` started with: what Kubernetes resolved for this pod, downward API
    and Secrets included)."""
    await apply_rootfs_diff(root=Path(f"/proc/{pid}/root"), version_dir=version_dir, where=where)
    context = restore_context(process_environment(pid) if environ is None else environ)
    await asyncio.to_thread(control.reset_for_restore, pid, context)


async def run_restore(
    *,
    criu: Criu,
    standby: Located,
    images_dir: Path,
    manifest: Manifest,
    work_dir: Path,
    where: str,
    timeout_seconds: float = RESTORE_TIMEOUT_SECONDS,
    lazy: bool = False,
) -> RestoredProcess:
    """`criu restore` of `images_dir` into the standby's namespaces, cgroups and root;
    `lazy`: its memory left to the lazy-pages daemon listening in `work_dir`."""
    pid = standby.pid
    work_dir.mkdir(parents=True, exist_ok=True)
    mounts = node_mounts(pid)
    if "/" not in mounts:
        raise RestoreFailedError(f"{where}: the container's root is not mounted on this node")
    root = mounts.pop("/")
    mounts, moved = remapped(_dumped_mounts(images_dir.parent), mounts)
    if moved:  # e.g. the NVIDIA hook's random path: bind the new one at the old point
        dirs = {old: mounts[old].is_dir() for old in moved}
        await _create_mount_points(pid=pid, points=dirs, where=where)
    with _handles(pid, manifest.source.stdio) as handles:
        target = ContainerRestoreTarget(
            images_dir=images_dir,
            work_dir=work_dir,
            pidfile=work_dir / "restored.pid",
            root=root,
            bind_mounts=mounts,
            inherit_fds=handles.inherit,
            join_fds=handles.join,
            action_script=_write_uts_script(work_dir),
            lazy=lazy,
        )
        command = _in_standby(pid, handles.pid_ns, criu.container_restore_command(target))
        env = {**os.environ, "WARMSTART_WORK_DIR": str(work_dir)}
        await _run(
            command,
            env,
            fds=handles.all(),
            where=where,
            work_dir=work_dir,
            timeout_seconds=timeout_seconds,
        )
    explain_log(work_dir / RESTORE_LOG)
    ns_pid = int(target.pidfile.read_text().strip())
    return _find_restored(pid, ns_pid, where)


def _dumped_mounts(version_dir: Path) -> list[str]:
    try:
        return list(json.loads((version_dir / MOUNTS_FILE).read_text())["bind_mounts"])
    except FileNotFoundError:
        return []  # an older dump: its mount points are taken as they are


async def _create_mount_points(*, pid: int, points: dict[str, bool], where: str) -> None:
    """Old mount points created in the container's root (by a child chrooted there, so a
    link in the root cannot send them onto the node) for CRIU to bind the moved mounts on."""
    command = chrooted.command("mount-points", f"/proc/{pid}/root", json.dumps(points))
    proc = await asyncio.create_subprocess_exec(*command, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        detail = err.decode(errors="replace").strip().splitlines()[-1:]
        raise RestoreFailedError(f"{where}: mount points for moved mounts: {' '.join(detail)}")


@dataclass
class _Handles:
    """Descriptors of the standby opened once, so a PID reused meanwhile cannot
    redirect them: what CRIU inherits (its network namespace as `extNetNs`, its stdio for
    each dumped `pipe:[inode]`), its namespaces CRIU joins, and its PID namespace."""

    inherit: dict[str, int]
    join: dict[str, int]
    pid_ns: int

    def all(self) -> list[int]:
        return [*self.inherit.values(), *self.join.values(), self.pid_ns]


@contextlib.contextmanager
def _handles(pid: int, stdio: tuple[str, ...]) -> Iterator[_Handles]:
    opened: list[int] = []

    def keep(path: str, flags: int = os.O_RDONLY) -> int:
        opened.append(os.open(path, flags | os.O_CLOEXEC))
        return opened[-1]

    try:
        inherit = {"extNetNs": keep(f"/proc/{pid}/ns/net")}
        for fd, dumped in enumerate(stdio[:3]):
            if dumped.startswith("pipe:") and dumped not in inherit:
                inherit[dumped] = keep(f"/proc/{pid}/fd/{fd}", _STDIO_FLAGS[fd])
        join = {kind: keep(f"/proc/{pid}/ns/{kind}") for kind in ("uts", "ipc")}
        yield _Handles(inherit=inherit, join=join, pid_ns=keep(f"/proc/{pid}/ns/pid"))
    finally:
        for fd in opened:
            os.close(fd)


def _in_standby(pid: int, pid_ns_fd: int, criu: list[str]) -> list[str]:
    """`criu` run in the standby's cgroups and PID namespace, with a /proc of that
    namespace in a mount namespace of its own (see the module docstring)."""
    cgroups = [str(path) for path in cgroup_procs_files(pid)]
    enter = ["nsenter", f"--pid=/proc/self/fd/{pid_ns_fd}", "--", "unshare", "--mount-proc"]
    # Both hops die with their parent: nsenter with the node worker, and CRIU (a child of
    # nsenter, in the standby's namespace) with nsenter. A worker killed mid-restore then
    # leaves no CRIU behind; what it restored so far is the standby's child, which the
    # standby kills before it starts cold.
    inner = [*enter, *dies_with_worker(criu)]
    return dies_with_worker(["/bin/sh", "-c", _ENTER_CGROUPS, "sh", *cgroups, "--", *inner])


def join_cgroups(pid: int, *, of: int) -> None:
    """Move process `pid` into every cgroup process `of` is in: a restore's lazy-pages
    daemon joins its standby's, so that it lives and dies with the pod it serves (not with
    the node worker's pod) and its memory is the pod's."""
    for procs in cgroup_procs_files(of):
        procs.write_text(f"{pid}\n")


def cgroup_procs_files(pid: int) -> list[Path]:
    """The `cgroup.procs` of every cgroup `pid` is in (each v1 hierarchy and the v2 one)
    mounted here: writing a PID there moves that process in."""
    mounts: list[tuple[set[str], Path]] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, super_options = (part.split() for part in line.split(" - ", 1))
        if fields[3] == "/" and super_options[0] in ("cgroup", "cgroup2"):
            options = set(super_options[2].split(",")) if super_options[0] == "cgroup" else set()
            mounts.append((options, Path(fields[4])))
    found = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _hierarchy, controllers, path = line.split(":", 2)
        wanted = set(controllers.split(",")) if controllers else set()
        for options, base in mounts:
            procs = base / path.lstrip("/") / "cgroup.procs"
            if (wanted <= options if wanted else not options) and procs.is_file():
                found.append(procs)
                break
    return found


def _write_uts_script(work_dir: Path) -> Path:
    script = work_dir / UTS_SCRIPT
    script.write_text(KEEP_POD_NAMES_SCRIPT)
    script.chmod(0o700)
    return script


async def _run(
    command: list[str],
    env: dict[str, str],
    *,
    fds: list[int],
    where: str,
    work_dir: Path,
    timeout_seconds: float,
) -> None:
    proc = await spawn(command, env, pass_fds=fds)
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout_seconds)
    except (asyncio.CancelledError, TimeoutError) as err:
        # Tasks CRIU forked may be in sessions of their own already: kill the whole tree.
        for pid in [proc.pid, *_descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await proc.wait()
        if isinstance(err, TimeoutError):
            raise RestoreFailedError(
                f"{where}: criu restore did not finish within {timeout_seconds:g} s"
            ) from None
        raise
    if proc.returncode != 0:
        log = work_dir / RESTORE_LOG
        detail = log_errors(log).strip() if log.exists() else ""
        detail = detail or stderr.decode(errors="replace").strip()[-4096:]
        raise RestoreFailedError(
            f"{where}: criu restore exited with {proc.returncode}:\n{detail or '(no output)'}"
        )


def _find_restored(standby_pid: int, ns_pid: int, where: str) -> RestoredProcess:
    """The restored root among the standby init's children (it is their reaper): the one
    whose PID in the standby's namespace is `ns_pid`."""
    depth = len(_ns_pids(standby_pid))
    for child in _children(standby_pid):
        levels = _ns_pids(child)
        if len(levels) == depth + 1 and levels[depth - 1] == ns_pid:
            return RestoredProcess(host_pid=child, pid=ns_pid)
    raise RestoreFailedError(f"{where}: the restored process (pid {ns_pid} there) is gone")


def _ns_pids(pid: int) -> list[int]:
    """A process's PID in each PID namespace it is in, the node's first (`NSpid`)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return [int(value) for value in line.split()[1:]]
    return []


def _children(pid: int) -> list[int]:
    """Children of `pid` (from /proc/PID/task/*/children where the kernel has it)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        files = [Path(f"/proc/{pid}/task/{task}/children") for task in tasks]
        return [int(child) for path in files for child in path.read_text().split()]
    except FileNotFoundError:
        return children(pid)


def _descendants(pid: int) -> list[int]:
    found = _children(pid)
    return found + [grandchild for child in found for grandchild in _descendants(child)]


def _nested(pid: int) -> list[int]:
    """Children of the standby's init in a PID namespace below its own: restored trees
    (the standby starts none), reparented to it once CRIU is gone."""
    depth = len(_ns_pids(pid))
    return [child for child in _children(pid) if len(_ns_pids(child)) > depth]


def _kill_restored(pid: int, restored: RestoredProcess | None) -> None:
    """Kill what was restored into the standby whose init is `pid` (the restored tree's
    init: its PID namespace goes with it), also a tree CRIU left when it failed."""
    doomed = [restored.host_pid] if restored is not None else _nested(pid)
    for victim in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
