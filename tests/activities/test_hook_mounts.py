"""Which dumped bind mounts moved in the restore target (the NVIDIA hook's random path)."""

from pathlib import Path

from activities.runtime.hook_mounts import moved_mounts, remapped

HOOK_A, HOOK_B = "/usr/bin/nvidia-ctk-hook-3f9a2c1b", "/usr/bin/nvidia-ctk-hook-77e01d5a"


def test_a_hook_at_another_random_path_is_found_by_its_stem() -> None:
    target = {"/snapshot-control": Path("/n/c"), HOOK_B: Path("/n/hook")}
    mounts, moved = remapped(["/snapshot-control", HOOK_A], target)
    assert moved == {HOOK_A: HOOK_B}
    assert mounts[HOOK_A] == Path("/n/hook") and mounts["/snapshot-control"] == Path("/n/c")


def test_nothing_is_guessed() -> None:
    two = {HOOK_B: Path("/a"), "/usr/bin/nvidia-ctk-hook-0000aaaa11": Path("/b")}
    assert moved_mounts([HOOK_A], two) == {}  # two candidates: none chosen
    assert moved_mounts([HOOK_A], {"/opt/nvidia-ctk-hook-77e01d5a": Path("/a")}) == {}
    assert moved_mounts(["/data"], {"/models": Path("/a")}) == {}
    assert moved_mounts([HOOK_A], {HOOK_A: Path("/a")}) == {}  # it did not move
