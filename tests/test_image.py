"""The image built from the repository (`scripts/build-image.sh`, decision 0031), imported into
a containerd of the test's own and run there: its entrypoint, its CRIU, its packages.

The build happens in a session fixture that calls the script: cached by a key over every
input of the image, it returns at once for an unchanged tree and rebuilds only what changed
otherwise, so the image tested is always this tree's. A build that could not run skips the
tests with the reason the script wrote."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.containers import Kubelet, running_containerd
from tests.images import REPO, build_script, built_tarball, needs_image

# A cold build (base, CRIU from source, the locked dependencies) takes minutes; the test
# that first asks for the image waits for it.
pytestmark = pytest.mark.timeout(1800)


@dataclass(frozen=True)
class Image:
    """The built image as imported: its reference, its config, the containerd it is in."""

    ref: str
    config: dict[str, Any]
    containerd: Kubelet


@pytest.fixture(scope="session")
def image_tarball() -> Path:
    return built_tarball()


def _archive_config(tarball: Path) -> tuple[str, dict[str, Any]]:
    """The one image of a docker-archive: its name and its config."""
    with tarfile.open(tarball) as archive:
        manifest = json.load(_member(archive, "manifest.json"))
        assert len(manifest) == 1, manifest
        (ref,) = manifest[0]["RepoTags"]
        config = json.load(_member(archive, manifest[0]["Config"]))
    return str(ref), dict(config["config"])


def _member(archive: tarfile.TarFile, name: str) -> Any:
    found = archive.extractfile(name)
    assert found is not None, name
    return found


def _ctr(containerd: Kubelet, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ctr", "--address", containerd.address, "--namespace", "k8s.io", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def containerd() -> Iterator[Kubelet]:
    yield from running_containerd()


@pytest.fixture(scope="module")
def image(image_tarball: Path, containerd: Kubelet) -> Image:
    """The image imported into a containerd of the test's own, as a node would
    (`ctr -n k8s.io images import`)."""
    ref, config = _archive_config(image_tarball)
    done = _ctr(containerd, "images", "import", str(image_tarball), timeout=600)
    assert done.returncode == 0, done.stderr
    assert ref in _ctr(containerd, "images", "list", "--quiet").stdout.split()
    return Image(ref=ref, config=config, containerd=containerd)


def run_image(image: Image, *argv: str, env: dict[str, str] | None = None) -> Any:
    """A container of the image, waited for: with `argv` its whole process (ctr puts it
    in place of the entrypoint and the command), else the image's own entrypoint and
    command; the image's environment plus `env`."""
    cid = f"img{uuid.uuid4().hex[:12]}"
    image.containerd.started.append(cid)  # removed at teardown should it outlive the run
    extra = [arg for name, value in (env or {}).items() for arg in ("--env", f"{name}={value}")]
    return _ctr(image.containerd, "run", "--rm", *extra, image.ref, cid, *argv)


@needs_image
def test_the_entrypoint_is_warmstart(image: Image) -> None:
    """The image's own process is `warmstart worker`: run as it is, with a setting it
    refuses, it is warmstart that answers (exit 2, the variable named)."""
    assert image.config["Entrypoint"] == ["warmstart"]
    assert image.config["Cmd"] == ["worker"]
    done = run_image(image, env={"WARMSTART_NODE__CLUSTER": "maybe"})
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "WARMSTART_NODE__CLUSTER='maybe': expected true or false" in done.stderr


@needs_image
def test_warmstart_help_exits_0(image: Image) -> None:
    done = run_image(image, "warmstart", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: warmstart "), done.stdout[:500]
    for command in ("worker", "controller", "webhook", "restore"):
        assert command in done.stdout


@needs_image
def test_criu_in_the_image_is_4_2_or_newer(image: Image) -> None:
    done = run_image(image, "criu", "--version")
    assert done.returncode == 0, done.stderr
    found = re.search(r"Version:\s*(\d+)\.(\d+)", done.stdout)
    assert found is not None, done.stdout
    assert (int(found[1]), int(found[2])) >= (4, 2), done.stdout


@needs_image
def test_the_node_tools_are_in_the_image(image: Image) -> None:
    """What the node worker runs besides CRIU: ctr against the node's containerd,
    iptables-restore (CRIU's network lock), unshare."""
    for argv in (["ctr", "--version"], ["iptables-restore", "--version"], ["unshare", "-V"]):
        done = run_image(image, *argv)
        assert done.returncode == 0, (argv, done.stderr)


@needs_image
def test_the_packages_import_with_the_images_python(image: Image) -> None:
    script = "import sys, activities, workers, workflows, api\nprint(sys.prefix, api.__file__)\n"
    done = run_image(image, "python", "-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["/opt/warmstart/.venv", "/opt/warmstart/api/__init__.py"]


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="sha256sum is not installed")
def test_the_cache_key_follows_every_input_and_nothing_else(tmp_path: Path) -> None:
    """An unchanged tree keeps its key (no rebuild), bytecode left beside the sources
    changes nothing, and an edit of a package's source, the lock or the Dockerfile gives a
    new key."""
    tree = tmp_path / "tree"
    for name in ("api", "activities", "workflows", "workers", "examples", "deploy/docker"):
        shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("scripts/build-image.sh", "scripts/install-criu.sh", ".dockerignore"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tree / name)
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy2(REPO / name, tree / name)

    def key() -> str:
        done = subprocess.run(
            ["bash", str(tree / "scripts" / "build-image.sh"), "--key"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    first = key()
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    assert key() == first
    assert key() == build_script("--key", timeout=60).stdout.strip()  # the same inputs as here
    (tree / "api" / "__pycache__").mkdir()
    (tree / "api" / "__pycache__" / "naming.cpython-311.pyc").write_bytes(b"bytecode")
    assert key() == first
    seen = {first}
    for name in ("api/naming.py", "uv.lock", "deploy/docker/Dockerfile", "scripts/install-criu.sh"):
        path = tree / name
        original = path.read_bytes()
        path.write_bytes(original + b"\n")
        seen.add(key())
        path.write_bytes(original)
        assert key() == first
    assert len(seen) == 5
