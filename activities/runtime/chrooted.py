"""Work done inside a restore target's root by a child process chrooted there, so that a
link planted in that root cannot send a write onto the node. Run as
`python -I -m activities.runtime.chrooted COMMAND ROOT ...` (see `command`); it imports everything
it uses before the chroot, after which the container's files are all it sees, and it
imports nothing of warmstart's beyond this module.

Commands:
- `apply-diff ROOT FD`: remove the paths listed in the JSON read from descriptor FD (the
  checkpoint's `deleted-files.json`), then extract the tar read from stdin (its
  `rootfs-diff.tar`) with tarfile's `tar` filter: no device files, no set-id bits.
- `mount-points ROOT JSON`: create each mount point of the JSON object (path → whether it
  is a directory) that is missing, for CRIU to bind a moved mount on.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tarfile

_NAME = "activities.runtime.chrooted"


def command(*args: str) -> list[str]:
    """The argv that runs this module with `args` (isolated: no user site, no PYTHONPATH)."""
    return [sys.executable, "-I", "-m", _NAME, *args]


def apply_diff(root: str, deleted_fd: int) -> None:
    with os.fdopen(deleted_fd) as listing:
        deleted = json.load(listing)
    _enter(root)
    for path in deleted:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r:") as tar:
        if hasattr(tarfile, "tar_filter"):
            tar.extractall("/", numeric_owner=True, filter="tar")
        else:
            extract_checked(tar, "/")


# The mode bits the `tar` filter clears: set-id, sticky, group and other write.
_CLEARED = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWGRP | stat.S_IWOTH


def extract_checked(tar: tarfile.TarFile, destination: str) -> None:
    """Python before 3.11.4 (Debian 12 has 3.11.2) has no extraction filters: the `tar`
    filter's rules here, and no device files or FIFOs. Members in the stream's order."""
    for member in tar:
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            continue
        member.name = member.name.lstrip("/")
        if member.islnk():
            member.linkname = member.linkname.lstrip("/")
        member.mode &= ~_CLEARED
        tar.extract(member, destination, numeric_owner=True)


def create_mount_points(root: str, points: dict[str, bool]) -> None:
    _enter(root)
    for point, is_dir in points.items():
        os.makedirs(point if is_dir else os.path.dirname(point), exist_ok=True)
        if not is_dir and not os.path.lexists(point):
            with open(point, "x"):
                pass


def _enter(root: str) -> None:
    os.chroot(root)
    os.chdir("/")


def main(argv: list[str]) -> int:
    match argv:
        case ["apply-diff", root, fd]:
            apply_diff(root, int(fd))
        case ["mount-points", root, points]:
            create_mount_points(root, json.loads(points))
        case _:
            print(f"usage: {_NAME} apply-diff ROOT FD | mount-points ROOT JSON", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
