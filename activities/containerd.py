"""The node side of a cluster capture on containerd: find the pod's container, dump it with
CRIU, commit the version, and talk the sentinel protocol through the container's own root.

The container is found through containerd (namespace `k8s.io`) by the labels the kubelet
sets (`io.kubernetes.pod.uid`, `io.kubernetes.container.name`), with the `ctr` client
against the node's containerd socket. Files inside the container are reached through
`/proc/<pid>/root` and opened component by component without following symbolic links,
so a link planted in the container cannot send a write elsewhere on the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import stat
import tarfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from temporalio import activity

from activities.containers import ContainerActivities
from activities.contracts import (
    CommitResult,
    ContainerCommitInput,
    ContainerDumpInput,
    ContainerRestoreInput,
    ContainerSentinelInput,
    ContainerTarget,
    GmsSavedInput,
    Heartbeat,
    RestoredContainer,
)
from activities.criu import CONTAINER_DUMP_OPTIONS, DUMP_OPTIONS, IMAGES_DIR, Criu, run_dump
from activities.cuda import CudaApi, cuda_processes, resume, suspend, tree_pids
from activities.gpu import NodeGpus
from activities.hook_mounts import MOUNTS_FILE
from activities.sentinels import wait_for_file
from activities.storage import CheckpointStore, digest_tree, make_private, process_host_info
from api.errors import (
    DumpFailedError,
    InvalidSpecError,
    UnavailableError,
    WorkloadExitedError,
    WorkloadNotReadyError,
)
from api.jobs import CONTROL_DIR as JOB_CONTROL_DIR
from api.manifest import CriuInfo, Manifest, SourceInfo

if TYPE_CHECKING:
    from activities.standby_restore import StandbyRestorer

CUDA_FILE = "cuda.json"  # in a version: the dumped tree's CUDA processes (container PIDs)
CUDA_LOCK_TIMEOUT_MS = 10_000
CONTROL_DIR = JOB_CONTROL_DIR.lstrip("/")  # the same directory, relative to the container's root
ROOTFS_DIFF = "rootfs-diff.tar"
DELETED_FILES = "deleted-files.json"
# Never part of a root filesystem diff: kernel filesystems and caches that restore rebuilds.
_DIFF_EXCLUDED = ("proc", "sys", "dev")
_DIFF_EXCLUDED_NAMES = ("__pycache__",)
POD_UID_LABEL = "io.kubernetes.pod.uid"
CONTAINER_NAME_LABEL = "io.kubernetes.container.name"


@dataclass(frozen=True)
class Located:
    """A running container: its containerd ID, init PID and what its spec says."""

    container_id: str
    pid: int
    image: str
    command: tuple[str, ...]
    cwd: str


@dataclass(frozen=True)
class Containerd:
    """containerd through its `ctr` client (namespace `k8s.io`, as under the kubelet)."""

    address: str
    ctr: str = "ctr"
    namespace: str = "k8s.io"
    # containerd's state directory: its shims keep each task's `init.pid` there.
    state: str = "/run/containerd"

    def init_pid(self, container_id: str) -> int:
        """The init PID of running container `container_id`, from the shim's `init.pid`
        (checked against the process's cgroups), else from the cgroups alone; 0 if none."""
        if not re.fullmatch(r"[0-9a-zA-Z_.-]+", container_id):
            return 0
        bundle = Path(self.state, "io.containerd.runtime.v2.task", self.namespace, container_id)
        with contextlib.suppress(OSError, ValueError):
            pid = int((bundle / "init.pid").read_text().strip())
            if container_id in Path(f"/proc/{pid}/cgroup").read_text():
                return pid
        return init_pid_of(container_id)

    async def _ctr(self, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            self.ctr,
            "--address",
            self.address,
            "--namespace",
            self.namespace,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise DumpFailedError(
                f"containerd at {self.address}: ctr {' '.join(args)}: {err.decode().strip()}"
            )
        return out.decode()

    async def locate(self, target: ContainerTarget) -> Located:
        if target.container_id:
            pid = self.init_pid(target.container_id)
            if pid:  # the restore path: no runtime round trips (each `ctr` costs ~25 ms)
                return Located(
                    container_id=target.container_id, pid=pid, image="", command=(), cwd="/"
                )
        where = f"container {target.container} of pod {target.namespace}/{target.pod_name}"
        selector = (
            f'labels."{POD_UID_LABEL}"=={target.pod_uid},'
            f'labels."{CONTAINER_NAME_LABEL}"=={target.container}'
        )
        ids = (await self._ctr("containers", "list", "--quiet", selector)).split()
        if not ids:
            raise WorkloadExitedError(f"{where} (pod UID {target.pod_uid}) is not on this node")
        tasks = _tasks(await self._ctr("tasks", "list"))
        running = [(cid, tasks[cid]) for cid in ids if tasks.get(cid, (0, ""))[1] == "RUNNING"]
        if not running:
            raise WorkloadExitedError(f"{where} is not running")
        container_id, (pid, _status) = running[-1]
        info: dict[str, Any] = json.loads(await self._ctr("containers", "info", container_id))
        process = (info.get("Spec") or {}).get("process") or {}
        return Located(
            container_id=container_id,
            pid=pid,
            image=info.get("Image") or "",
            command=tuple(process.get("args") or ()),
            cwd=process.get("cwd") or "/",
        )


def init_pid_of(container_id: str) -> int:
    """The init process of the running container `container_id`, found from the cgroups
    the runtime puts it in (the last path element is the ID, or `…-<ID>.scope` under the
    systemd driver); 0 when none runs here."""
    if not re.fullmatch(r"[0-9a-zA-Z_.-]+", container_id):
        return 0
    members: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cgroups = Path(entry.path, "cgroup").read_text()
            parent = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        for line in cgroups.splitlines():
            leaf = line.rsplit("/", 1)[-1]
            if leaf == container_id or leaf.endswith(f"-{container_id}.scope"):
                members[int(entry.name)] = parent
                break
    inits = [pid for pid, parent in members.items() if parent not in members]
    return inits[0] if len(inits) == 1 else 0


def _tasks(listing: str) -> dict[str, tuple[int, str]]:
    """`ctr tasks list` → container ID: (PID, status)."""
    found = {}
    for line in listing.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3 and fields[1].isdigit():
            found[fields[0]] = (int(fields[1]), fields[2])
    return found


def open_control_dir(pid: int) -> int:
    """A descriptor of the container's control directory, reached without following links
    (the container's root is the one `/proc/<pid>/root` names)."""
    root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY)
    try:
        return os.open(CONTROL_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root)
    finally:
        os.close(root)


def write_sentinel_at(directory: int, name: str, content: bytes = b"done\n") -> None:
    """`name` written atomically in `directory` (temp, fsync, rename); never through a link."""
    tmp = f".{name}.{os.getpid()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=directory)
    fd = os.open(tmp, flags, 0o644, dir_fd=directory)
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=directory, dst_dir_fd=directory)  # replaces a link itself
    os.fsync(directory)


def container_mounts(pid: int) -> tuple[Path | None, list[str]]:
    """The overlay upper directory of the container's root (None when its root is not an
    overlay, e.g. a plain directory) and its other mount points, as it sees them."""
    upper, points = None, []
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split(" - ", 1)
        mount_point = fields[0].split()[4]
        if mount_point != "/":
            points.append(mount_point)
            continue
        kind, _source, options = [*fields[1].split(), "", "", ""][:3]
        if kind == "overlay":
            for option in options.split(","):
                if option.startswith("upperdir="):
                    upper = Path(option.removeprefix("upperdir="))
    return upper, points


_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class _Mount:
    device: str  # major:minor
    root: str  # the directory of its filesystem that is mounted
    point: str


def _mount_table(mountinfo: str) -> list[_Mount]:
    """Entries of a `/proc/<pid>/mountinfo` (octal escapes such as `\\040` decoded)."""
    entries = []
    for line in mountinfo.splitlines():
        fields = line.split(" - ", 1)[0].split()
        root, point = (_OCTAL.sub(lambda m: chr(int(m[1], 8)), field) for field in fields[3:5])
        entries.append(_Mount(device=fields[2], root=root, point=point))
    return entries


def _reachable(mount: _Mount, here: list[_Mount]) -> Path | None:
    """Where `mount`'s directory is in the mount table `here` (the mount of the same
    filesystem whose root holds it most closely), if anywhere."""
    holding = [
        entry
        for entry in here
        if entry.device == mount.device
        and (entry.root == "/" or f"{mount.root}/".startswith(f"{entry.root}/"))
    ]
    if not holding:
        return None
    best = max(holding, key=lambda entry: len(entry.root))
    return Path(best.point) / os.path.relpath(mount.root, best.root)


def node_mounts(pid: int) -> dict[str, Path]:
    """The container's mounts that this process reaches in its own mount namespace (the
    node's): mount point in the container → path here. Its root (the overlay the runtime
    mounted) and bind mounts of node directories (volumes, the control directory) are;
    filesystems of its own (proc, sysfs, its /dev and /run tmpfs) are not."""
    here = _mount_table(Path("/proc/self/mountinfo").read_text())
    found = {}
    for mount in _mount_table(Path(f"/proc/{pid}/mountinfo").read_text()):
        path = _reachable(mount, here)
        if path is not None and os.path.lexists(path):
            found[mount.point] = path
    return found


def overlay_lowers(pid: int) -> list[Path]:
    """The lower (image) directories of the container's overlay root, as the node sees
    them; [] when its root is not an overlay."""
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split(" - ", 1)
        kind, _source, options = [*fields[1].split(), "", "", ""][:3]
        if fields[0].split()[4] == "/" and kind == "overlay":
            for option in options.split(","):
                if option.startswith("lowerdir="):
                    return [_host_path(Path(p)) for p in option[9:].split(":") if p]
    return []


def _copied_up(path: str, rel: str, info: os.stat_result, lowers: list[Path]) -> bool:
    """A directory the overlay only copied up (a child changed; it is as in the image):
    the restore target's image has it already, so the diff need not carry it."""
    with contextlib.suppress(OSError):
        if os.getxattr(path, "trusted.overlay.opaque") == b"y":
            return False  # recreated: what the image had below it is hidden
    for lower in lowers:
        with contextlib.suppress(OSError):
            seen = os.lstat(lower / rel)
            return stat.S_ISDIR(seen.st_mode) and (seen.st_mode, seen.st_uid, seen.st_gid) == (
                info.st_mode,
                info.st_uid,
                info.st_gid,
            )
    return False


def rootfs_diff(
    upper: Path, staging: Path, *, mount_points: list[str], lowers: list[Path] | None = None
) -> int:
    """What the container changed in its image: `rootfs-diff.tar` (files and directories
    of the overlay's upper directory) and `deleted-files.json` (its whiteouts), leaving out
    mount points, kernel filesystems, caches and directories the overlay only copied up
    from `lowers`. Returns the number of entries."""
    skipped = {point.strip("/") for point in mount_points} | set(_DIFF_EXCLUDED)
    deleted: list[str] = []
    entries = 0
    with tarfile.open(staging / ROOTFS_DIFF, "w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirs, names in os.walk(upper):
            rel_dir = os.path.relpath(dirpath, upper)
            rel_dir = "" if rel_dir == "." else rel_dir
            dirs[:] = [
                d
                for d in sorted(dirs)
                if os.path.join(rel_dir, d) not in skipped and d not in _DIFF_EXCLUDED_NAMES
            ]
            for name in sorted(names + dirs):
                rel = os.path.join(rel_dir, name)
                path = os.path.join(dirpath, name)
                info = os.lstat(path)
                if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
                    deleted.append("/" + rel)  # an overlay whiteout
                    continue
                if rel in skipped or name.endswith(".pyc"):
                    continue
                if stat.S_ISDIR(info.st_mode) and _copied_up(path, rel, info, lowers or []):
                    continue
                tar.add(path, arcname=rel, recursive=False)
                entries += 1
    (staging / DELETED_FILES).write_text(json.dumps(sorted(deleted), indent=2) + "\n")
    return entries


def freezer_cgroup(pid: int) -> Path | None:
    """The container's freezer cgroup directory (cgroup v1 `freezer`, or the v2 unified
    directory), if this process can see it; CRIU freezes the whole container through it."""
    base = Path("/sys/fs/cgroup")
    unified = None
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _hierarchy, controllers, path = line.split(":", 2)
        if "freezer" in controllers.split(","):
            found = base / "freezer" / path.lstrip("/")
            return found if (found / "freezer.state").is_file() else None
        if controllers == "":
            unified = base / path.lstrip("/")
    if unified is not None and (unified / "cgroup.freeze").is_file():
        return unified
    return None


def stdio(pid: int) -> tuple[str, ...]:
    """What the container's fds 0-2 are (`pipe:[inode]` from the runtime's shim): restore
    hands fresh pipes back in their place."""
    out = []
    for fd in (0, 1, 2):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            out.append("")
    return tuple(out)


def thaw(pid: int, freezer: Path | None = None) -> None:
    """Resume a container a failed or cancelled dump left frozen or stopped (a
    leave-running dump must never leave its source so)."""
    if freezer is not None:
        with contextlib.suppress(OSError):
            if (freezer / "freezer.state").is_file():
                (freezer / "freezer.state").write_text("THAWED")
            elif (freezer / "cgroup.freeze").is_file():
                (freezer / "cgroup.freeze").write_text("0")
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return
    if state in ("T", "t"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _host_path(path: Path) -> Path:
    """A path of the node's root as this process sees it: the same path on the node, or
    through the node's init when the worker runs in a container with the host's PIDs."""
    return path if path.exists() else Path("/proc/1/root") / path.relative_to("/")


class ContainerdActivities(ContainerActivities):
    """`ContainerActivities` for a node whose pods run in containerd."""

    def __init__(
        self,
        *,
        runtime: Containerd,
        criu: Criu,
        store: CheckpointStore,
        node: str,
        gpus: NodeGpus | None = None,
        cuda: CudaApi | None = None,
        restorer: StandbyRestorer | None = None,
    ) -> None:
        """`cuda`: the driver's checkpoint API on a GPU node (None elsewhere); `restorer`:
        restores into standby containers (a node that only captures has none)."""
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
        control = Path(f"/proc/{located.pid}/root") / CONTROL_DIR
        sentinel = f"gms-save-complete-{target.pod_uid}"
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def check() -> None:
            activity.heartbeat(Heartbeat(waited_seconds=round(loop.time() - started, 1)))

        if await wait_for_file(control, [sentinel], timeout=request.timeout_seconds, check=check):
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
        staging = self._store.fresh_staging(request.checkpoint_id, request.version)
        images = staging / IMAGES_DIR
        images.mkdir()
        where = (
            f"checkpoint {request.checkpoint_id}: criu dump of container {target.container} "
            f"of pod {target.namespace}/{target.pod_name} (pid {located.pid})"
        )
        activity.logger.info("%s", where)
        freezer = freezer_cgroup(located.pid)
        binds = [point for point in node_mounts(located.pid) if point != "/"]
        command = self._criu.container_dump_command(
            pid=located.pid,
            images_dir=images,
            netns_inode=netns,
            freezer=freezer,
            bind_mounts=binds,
        )
        suspended: list[int] = []
        try:
            suspended = await asyncio.to_thread(self._suspend_cuda, located.pid, staging)
            await run_dump(command, images, what=where)
            (staging / MOUNTS_FILE).write_text(json.dumps({"bind_mounts": binds}) + "\n")
            upper, mount_points = container_mounts(located.pid)
            if upper is not None:
                count = await asyncio.to_thread(
                    rootfs_diff,
                    _host_path(upper),
                    staging,
                    mount_points=mount_points,
                    lowers=overlay_lowers(located.pid),
                )
                activity.logger.info("%s: rootfs diff of %d entries", where, count)
        except BaseException:
            thaw(located.pid, freezer)
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
                return CommitResult(storage_uri=final.as_uri(), size_bytes=manifest.size_bytes)
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
                control_dir=f"/{CONTROL_DIR}",
                stdio=stdio(located.pid),
            ),
            criu=self._criu_info,
            host=process_host_info(located.pid, self._gpus),
            files=digest_tree(staging),
        )
        committed = self._store.commit(staging, manifest)
        return CommitResult(storage_uri=committed.as_uri(), size_bytes=manifest.size_bytes)

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
        located = await self._runtime.locate(request.target)
        try:
            directory = open_control_dir(located.pid)
        except OSError as err:
            raise InvalidSpecError(
                f"pod {request.target.namespace}/{request.target.pod_name}: no control "
                f"directory /{CONTROL_DIR} in container {request.target.container}: {err}"
            ) from err
        try:
            content = f"{request.content}\n".encode() if request.content else b"done\n"
            write_sentinel_at(directory, request.sentinel.value, content)
        finally:
            os.close(directory)
