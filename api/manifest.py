"""The checkpoint manifest: the commit marker of a checkpoint version, written last."""

from __future__ import annotations

from datetime import datetime
from pathlib import PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.identity import CheckpointIdentity
from api.limits import PathElement
from api.workload import Readiness

SCHEMA_VERSION = 1


class FileDigest(BaseModel):
    """One artifact file, relative to the version directory."""

    model_config = ConfigDict(frozen=True)

    path: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _inside_the_version(cls, value: str) -> str:
        parts = PurePosixPath(value).parts
        if not parts or value.startswith("/") or ".." in parts:
            raise ValueError(f"file path {value!r} must stay inside the version directory")
        return value


class SourceInfo(BaseModel):
    """Where the checkpointed process ran and how to put it back."""

    model_config = ConfigDict(frozen=True)

    node: str
    namespace: str
    name: str
    pod: str = ""
    container: str = ""
    image: str = ""
    command: tuple[str, ...] = ()
    cwd: str = ""
    pid: int = 0
    control_dir: str = ""
    log_path: str = ""
    readiness: Readiness = Readiness()
    health_url: str | None = None
    # A container's fds 0-2 at the dump (`pipe:[inode]`): restore passes fresh ones in.
    stdio: tuple[str, ...] = ()


class CriuInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    version: str
    options: tuple[str, ...] = ()
    # Recorded by captures since decision 0037 (absent in older manifests): how long CRIU
    # kept the tree frozen (its stats-dump), the pre-dump rounds the images build on
    # (their pages under `criu/parent/...`), and why none where some were asked for.
    frozen_ms: float | None = None
    pre_dumps: int = 0
    pre_dump_fallback: str = ""


class GpuDevice(BaseModel):
    model_config = ConfigDict(frozen=True)

    index: int
    uuid: str
    name: str = ""


class HostInfo(BaseModel):
    """Facts a restoring node must be compatible with."""

    model_config = ConfigDict(frozen=True)

    kernel: str
    arch: str
    gpu_driver: str = ""
    cuda_version: str = ""
    gpus: tuple[GpuDevice, ...] = ()
    # Where the GPU list came from (an environment variable of the process, or NVML).
    gpu_source: str = ""

    @property
    def gpu_model(self) -> str:
        """The GPU model(s), `+`-joined in device order when they differ."""
        return "+".join(dict.fromkeys(gpu.name for gpu in self.gpus if gpu.name))


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    schema_version: int = SCHEMA_VERSION
    checkpoint_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    version: PathElement
    identity: CheckpointIdentity
    created_at: datetime
    source: SourceInfo
    criu: CriuInfo
    host: HostInfo
    files: tuple[FileDigest, ...]

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)
