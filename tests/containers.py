"""A real containerd for tests, started as root with its own root, state and socket (so a
containerd already on the machine is never touched), and a kubelet stand-in that runs pod
containers in it with the kubelet's labels (importable as `tests.containers`).

Containers run from a plain root directory holding the host's `/usr` read-only, so
python3 and a shell are there without an image or a registry.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from activities.runtime.announce import EMPTY_DIRS
from api.jobs import CONTROL_VOLUME
from tests.conftest import CRIU_SKIP


def _skip_reason() -> str | None:
    if CRIU_SKIP is not None:
        return CRIU_SKIP
    for tool in ("containerd", "ctr", "runc", "iptables-restore"):
        if shutil.which(tool) is None:
            return (
                f"{tool} is not installed: `make test` installs containerd, runc, iptables as root"
            )
    return None


CONTAINERD_SKIP = _skip_reason()
needs_containerd = pytest.mark.skipif(CONTAINERD_SKIP is not None, reason=CONTAINERD_SKIP or "")


SKELETON_DIRS = ("proc", "sys", "dev", "tmp", "etc", "usr", "snapshot-control")
SKELETON_LINKS = ("bin", "lib", "lib64", "sbin")


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tar(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _entry(
    name: str, *, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "", mode: int = 0
) -> Any:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.mode = mode or (0o755 if kind == tarfile.DIRTYPE else 0o644)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


def oci_archive(
    ref: str,
    *,
    executables: Mapping[str, bytes] | None = None,
    entrypoint: list[str] | None = None,
) -> bytes:
    """An OCI image archive of one uncompressed layer, named `ref` for `ctr images import`:
    the root skeleton (its `bin`, `lib`... pointing into a `/usr` the container is given),
    /etc/warmstart-image, and `executables` (path in the image → content, mode 0755), run
    by `entrypoint` where given (a static `pause`, say)."""
    layer = _tar(
        [_entry(name, kind=tarfile.DIRTYPE) for name in SKELETON_DIRS]
        + [_entry(name, kind=tarfile.SYMTYPE, link=f"usr/{name}") for name in SKELETON_LINKS]
        + [_entry("etc/warmstart-image", data=b"from the image\n")]
        + [
            _entry(path.lstrip("/"), data=data, mode=0o755)
            for path, data in (executables or {}).items()
        ]
    )
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
            "config": {"Entrypoint": entrypoint} if entrypoint else {},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _digest(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": _digest(layer),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": _digest(manifest),
                    "size": len(manifest),
                    "annotations": {"io.containerd.image.name": ref},
                }
            ],
        }
    ).encode()
    files = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index)]
    files += [(f"blobs/sha256/{_digest(blob)[7:]}", blob) for blob in (layer, config, manifest)]
    return _tar([_entry(name, data=data) for name, data in files])


@dataclass
class Kubelet:
    """Runs pod containers in the test's containerd like a kubelet would (labels, control
    directory mounted at /snapshot-control)."""

    base: Path
    address: str
    started: list[str] = field(default_factory=list)
    shims: list[int] = field(default_factory=list)  # the runtime shim of each container

    def ctr(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(
            ["ctr", "--address", self.address, "--namespace", "k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def import_image(self, ref: str) -> str:
        """An image built here from local files (the root skeleton and one file,
        /etc/warmstart-image), imported so its containers sit on the overlay snapshotter
        as under a kubelet."""
        archive = self.base / "image.tar"
        archive.write_bytes(oci_archive(ref))
        self.ctr("images", "import", str(archive))
        return ref

    @property
    def kubelet_root(self) -> Path:
        """Where pods' volumes are laid out as under the kubelet's root directory."""
        return self.base / "kubelet"

    def run(
        self,
        pod_uid: str,
        container: str,
        command: list[str],
        *,
        image: str | None = None,
        log: Path | None = None,
        binds: dict[str, Path] | None = None,
        env: Mapping[str, str] | None = None,
        control: Path | None = None,
    ) -> tuple[str, Path]:
        """Start `command` as container `container` of pod `pod_uid` (from `image`, or from
        a plain root directory); returns its ID and its control directory on the node (the
        pod's emptyDir). With `log`, the container's stdout and stderr go to that file
        through the runtime's shim (pipes, as under a kubelet: what `kubectl logs` reads);
        `binds`: more read-only bind mounts, container path → node path; `env`: the
        container's environment as the kubelet resolved it from the pod (default: PATH and
        SNAPSHOT_CONTROL_DIR only); `control`: the control directory of an earlier container
        of the pod (a restart keeps its emptyDir)."""
        cid = f"c{uuid.uuid4().hex[:12]}"
        if image is None:
            rootfs = self.base / "rootfs" / cid
            for name in SKELETON_DIRS:
                (rootfs / name).mkdir(parents=True)
            for name in SKELETON_LINKS:
                (rootfs / name).symlink_to(f"usr/{name}")
            source = ["--rootfs"]
            root = str(rootfs)
        else:
            source, root = [], image
        if control is None:  # the pod's emptyDir, its subPath for this container
            control = self.kubelet_root / "pods" / pod_uid / EMPTY_DIRS / CONTROL_VOLUME / container
            control.mkdir(parents=True, exist_ok=True)
        environ = {
            "PATH": "/usr/bin:/bin",
            **(env or {"SNAPSHOT_CONTROL_DIR": "/snapshot-control"}),
        }
        logging = ["--log-uri", log.absolute().as_uri()] if log is not None else []
        self.ctr(
            "run",
            "--detach",
            *source,
            *logging,
            "--label",
            f"io.kubernetes.pod.uid={pod_uid}",
            "--label",
            f"io.kubernetes.container.name={container}",
            "--mount",
            "type=bind,src=/usr,dst=/usr,options=rbind:ro",
            "--mount",
            f"type=bind,src={control},dst=/snapshot-control,options=rbind:rw",
            *(
                arg
                for dst, src in (binds or {}).items()
                for arg in ("--mount", f"type=bind,src={src},dst={dst},options=rbind:ro")
            ),
            *(arg for name, value in environ.items() for arg in ("--env", f"{name}={value}")),
            root,
            cid,
            *command,
        )
        self.started.append(cid)
        shim = None
        with contextlib.suppress(LookupError):
            shim = _parent(self.pid(cid))  # its init's parent: the shim
        if shim is not None:  # None: the container already exited (its task is deleted later)
            self.shims.append(shim)
        return cid, control

    def status(self, cid: str) -> str:
        for line in self.ctr("tasks", "list").splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == cid:
                return fields[2]
        return "GONE"

    def pid(self, cid: str) -> int:
        for line in self.ctr("tasks", "list").splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == cid:
                return int(fields[1])
        raise LookupError(cid)

    def remove_all(self) -> None:
        for cid in self.started:
            self.ctr("tasks", "kill", "--signal", "SIGKILL", cid, check=False)
            for _ in range(50):
                if self.status(cid) != "RUNNING":
                    break
                time.sleep(0.1)
            self.ctr("tasks", "delete", "--force", cid, check=False)
            self.ctr("containers", "delete", cid, check=False)


def running_containerd() -> Iterator[Kubelet]:
    """A containerd of the test's own (short paths: its sockets must fit sun_path); use it
    as a fixture with `yield from running_containerd()`."""
    base = Path(f"/run/ws-{uuid.uuid4().hex[:8]}")
    base.mkdir(mode=0o700)
    address = str(base / "containerd.sock")
    config = base / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{base}/root"\n'
        f'state = "{base}/state"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{address}"\n'
    )
    log = (base / "containerd.log").open("w")
    daemon = subprocess.Popen(
        ["containerd", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    kubelet = Kubelet(base=base, address=address)
    try:
        deadline = time.monotonic() + 20
        while kubelet.ctr("version", check=False) == "" or not os.path.exists(address):
            assert daemon.poll() is None, (base / "containerd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "containerd did not start"
            time.sleep(0.1)
        yield kubelet
    finally:
        kubelet.remove_all()
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
        _stop_shims(kubelet.shims, base)
        subprocess.run(["umount", "-R", "-l", str(base / "root")], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(") ")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _stop_shims(shims: list[int], base: Path) -> None:
    """Shims this containerd left behind (a task it could not delete), stopped by the PID
    recorded when each container started, once that PID is checked to still be a shim of
    this containerd (not a PID reused since)."""
    for pid in shims:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # gone already
        if b"containerd-shim" in argv and str(base).encode() in argv:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
