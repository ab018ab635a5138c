"""The image built from the repository for the tests (`scripts/build-image.sh`, decision 0031;
importable as `tests.images`): when its tests can run, and this tree's image, built unless
cached."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.containers import CONTAINERD_SKIP

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "build-image.sh"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return f"building and running the image needs root (running as uid {os.geteuid()})"
    return CONTAINERD_SKIP


IMAGE_SKIP = _skip_reason()
needs_image = pytest.mark.skipif(IMAGE_SKIP is not None, reason=IMAGE_SKIP or "")
BUILD_SKIPPED: list[str] = []  # why this tree's image could not be built, once tried


def build_script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout
    )


def built_tarball() -> Path:
    """This tree's image as a docker-archive tarball: cached by a key over every input of
    the image, else built now (minutes cold, seconds for an edit of the sources). Skips
    with the reason the script wrote when it could not build; a failure without one fails."""
    tarball = Path(build_script("--tarball", timeout=60).stdout.strip())
    done = build_script(timeout=1700)
    if done.returncode != 0:
        marker = tarball.with_suffix(".unavailable")
        if marker.is_file():
            BUILD_SKIPPED.append(f"the image could not be built: {marker.read_text().strip()}")
            pytest.skip(BUILD_SKIPPED[-1])
        pytest.fail(f"build-image.sh failed without saying why:\n{done.stderr[-3000:]}")
    assert done.stdout.strip().splitlines()[-1] == str(tarball), done.stdout
    return tarball
