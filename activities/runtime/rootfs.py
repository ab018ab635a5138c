"""A container's root filesystem and mounts as the node sees them, read from the kernel
through its init PID (the same for every container runtime): the overlay's upper and lower
directories, bind mounts reachable from the node, the freezer cgroup, stdio; and the root
filesystem diff a dump takes (what the container changed in its image) and a restore
applies to the standby's root.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from activities.runtime import chrooted
from api.errors import RestoreFailedError

ROOTFS_DIFF = "rootfs-diff.tar"


DELETED_FILES = "deleted-files.json"


_DIFF_EXCLUDED = ("proc", "sys", "dev")


_DIFF_EXCLUDED_NAMES = ("__pycache__",)


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


def unreachable_mounts(pid: int) -> dict[str, Path]:
    """The container's bind mounts of node files this process cannot reach (a node worker
    in a pod sees only the node directories its pod mounts): mount point → the node path
    its runtime bound there. A dump of such a container could never be restored here (CRIU
    binds each from a path of its own mount namespace)."""
    view = _runtime_view(pid)
    if view is None:
        return {}
    here = _mount_table(Path("/proc/self/mountinfo").read_text())
    missing = {}
    for mount in _mount_table(Path(f"/proc/{pid}/mountinfo").read_text()):
        path = _reachable(mount, here)
        if path is None or not os.path.lexists(path):
            on_node = _reachable(mount, view[1])
            if on_node is not None and os.path.lexists(view[0] / on_node.relative_to("/")):
                missing[mount.point] = on_node
    return missing


def node_root(pid: int) -> Path:
    """The node's root as the runtime that started container init `pid` sees it: through
    its parent, the runtime's shim (a node worker in a pod shares the host's PIDs, not its
    mounts; the host's PID 1 may refuse to be looked through)."""
    try:
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        parent = 1
    return Path(f"/proc/{parent or 1}/root")


def _runtime_view(pid: int) -> tuple[Path, list[_Mount]] | None:
    """The node's root and mount table as the runtime's shim of `pid` has them, when its
    mount namespace is not this process's; None when it is, or out of reach."""
    root = node_root(pid)
    try:
        if os.readlink(root.parent / "ns" / "mnt") == os.readlink("/proc/self/ns/mnt"):
            return None
        return root, _mount_table((root.parent / "mountinfo").read_text())
    except OSError:
        return None


def overlay_lowers(pid: int) -> list[Path]:
    """The lower (image) directories of the container's overlay root, as the node sees
    them; [] when its root is not an overlay."""
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split(" - ", 1)
        kind, _source, options = [*fields[1].split(), "", "", ""][:3]
        if fields[0].split()[4] == "/" and kind == "overlay":
            for option in options.split(","):
                if option.startswith("lowerdir="):
                    return [host_path(Path(p), pid) for p in option[9:].split(":") if p]
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
    mount points, the directories the runtime made above them, kernel filesystems, caches
    and directories the overlay only copied up from `lowers`. Returns the number of
    entries."""
    skipped = {point.strip("/") for point in mount_points} | set(_DIFF_EXCLUDED)
    # Directories above a mount point: the runtime makes them for its mounts (a target
    # with the same mounts gets them again), so only what else is in them is carried.
    mount_parents = {
        str(parent)
        for point in mount_points
        for parent in Path(point.strip("/")).parents
        if str(parent) != "."
    }
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
                if stat.S_ISDIR(info.st_mode) and (
                    rel in mount_parents or _copied_up(path, rel, info, lowers or [])
                ):
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


def host_path(path: Path, pid: int) -> Path:
    """A path of the node's root as this process sees it: the same path on the node, or
    through the runtime of container init `pid` when the worker runs in a container with
    the host's PIDs (`node_root`)."""
    return path if path.exists() else node_root(pid) / path.relative_to("/")


async def apply_rootfs_diff(*, root: Path, version_dir: Path, where: str) -> None:
    """`deleted-files.json` removed and `rootfs-diff.tar` extracted under `root`, by a child
    chrooted there (tarfile's `tar` filter: no device files, no set-id bits)."""
    tar_path, deleted_path = version_dir / ROOTFS_DIFF, version_dir / DELETED_FILES
    if not tar_path.is_file() or _unchanged(tar_path, deleted_path):
        return  # nothing to apply: spare the child (tens of milliseconds)
    with tar_path.open("rb") as tar, deleted_path.open("rb") as deleted:
        command = chrooted.command("apply-diff", str(root), str(deleted.fileno()))
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=tar,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            pass_fds=(deleted.fileno(),),
        )
        _, err = await proc.communicate()
    if proc.returncode != 0:
        detail = err.decode(errors="replace").strip().splitlines()[-3:]
        raise RestoreFailedError(f"{where}: applying {ROOTFS_DIFF} failed: {' '.join(detail)}")


def _unchanged(tar_path: Path, deleted_path: Path) -> bool:
    """True when the diff holds no entry and no deletion."""
    with tarfile.open(tar_path, "r:") as tar:
        if tar.next() is not None:
            return False
    return not deleted_path.is_file() or not json.loads(deleted_path.read_bytes())
