"""Bind mounts whose mount point differs between the dumped container and the restore
target: the NVIDIA container toolkit mounts its per-container hook at a path with a random
part (`…/nvidia-ctk-hook-<random>`), so the dump recorded a mount point the new container
does not have. Such a mount is remapped onto the target's mount of the same stem in the
same directory, and its old mount point is created in the target's root for CRIU to bind
onto.

The dump records its bind mount points (`mounts.json`, an artifact of the version) so the
restore knows what it must map.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

MOUNTS_FILE = "mounts.json"
# A random part at the end of a name: hex or digits, after an optional separator.
_RANDOM = re.compile(r"[-_.]?(?:[0-9a-fA-F]{6,}|[0-9]+)$")


def _stem(point: str) -> tuple[str, str]:
    path = PurePosixPath(point)
    return str(path.parent), _RANDOM.sub("", path.name)


def moved_mounts(dumped: list[str], target: dict[str, Path]) -> dict[str, str]:
    """Dumped mount point → the target's mount point it moved to: a dumped point the target
    lacks, matched to the one target point the dump lacks with the same directory and stem
    (never guessed between several)."""
    spare = [point for point in target if point not in dumped and point != "/"]
    moved = {}
    for point in dumped:
        if point in target or point == "/":
            continue
        stem = _stem(point)
        if not stem[1]:
            continue
        matches = [other for other in spare if _stem(other) == stem]
        if len(matches) == 1:
            moved[point] = matches[0]
    return moved


def remapped(dumped: list[str], target: dict[str, Path]) -> tuple[dict[str, Path], dict[str, str]]:
    """The bind mounts to hand CRIU (key: the dumped mount point) and what moved."""
    moved = moved_mounts(dumped, target)
    mounts = dict(target)
    for old, new in moved.items():
        mounts[old] = target[new]
    return mounts, moved
