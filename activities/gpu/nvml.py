"""GPU facts of a node and of a target process: NVML (nvidia-ml-py) and the process's own
environment, for manifests, compatibility checks and the restore device map.

Which GPUs a process uses is read from its environment first, in the order GPU Memory
Service and Dynamo's workloads use: `GMS_GPU_UUID_<i>`, then `GMS_GPU_UUIDS` (split on
`,` and `;`), then the `GPU-`/`MIG-` entries of `CUDA_VISIBLE_DEVICES`, then of
`NVIDIA_VISIBLE_DEVICES`; only then NVML's list of the node's devices. Without the NVML
library (no driver on the node) the answer is "no GPU information", never an error.
Only the standard library at import time: NVML is imported inside `read_gpu_facts`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from api.errors import IncompatibleError

log = logging.getLogger(__name__)

NO_GPU_INFORMATION = "no GPU information (no NVML library or driver on this node)"
_INDEXED = re.compile(r"^GMS_GPU_UUID_(\d+)$")
_UUID_PREFIXES = ("GPU-", "MIG-")


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str = ""


@dataclass(frozen=True)
class GpuFacts:
    """A node's driver and devices (or a process's view of them); `source` says where the
    device list came from, `NO_GPU_INFORMATION` when nowhere."""

    driver: str = ""
    cuda: str = ""
    devices: tuple[Gpu, ...] = ()
    source: str = NO_GPU_INFORMATION

    @property
    def uuids(self) -> tuple[str, ...]:
        return tuple(device.uuid for device in self.devices)

    @property
    def model(self) -> str:
        """The GPU model(s), `+`-joined in device order when they differ; "" when unknown."""
        names = list(dict.fromkeys(device.name for device in self.devices if device.name))
        return "+".join(names)


def uuids_from_environment(env: Mapping[str, str]) -> tuple[tuple[str, ...], str]:
    """The GPU UUIDs a process's environment names, and the variable that named them
    (("", ...) when none does)."""
    indexed = sorted(
        (int(match.group(1)), value.strip())
        for name, value in env.items()
        if (match := _INDEXED.match(name)) and value.strip()
    )
    if indexed:
        return tuple(uuid for _, uuid in indexed), "GMS_GPU_UUID_<i>"
    listed = [part.strip() for part in re.split(r"[,;]", env.get("GMS_GPU_UUIDS", ""))]
    if any(listed):
        return tuple(part for part in listed if part), "GMS_GPU_UUIDS"
    for variable in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        entries = [part.strip() for part in env.get(variable, "").split(",")]
        uuids = tuple(part for part in entries if part.startswith(_UUID_PREFIXES))
        if uuids:
            return uuids, variable
    return (), ""


def process_environment(pid: int, *, root: Path = Path("/proc")) -> dict[str, str]:
    """The environment `pid` started with (`/proc/<pid>/environ`); {} when unreadable."""
    try:
        raw = (root / str(pid) / "environ").read_bytes()
    except OSError:
        return {}
    pairs = (entry.split(b"=", 1) for entry in raw.split(b"\0") if b"=" in entry)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}


def gpus_of_process(env: Mapping[str, str], node: GpuFacts) -> GpuFacts:
    """The GPUs a process with environment `env` uses on a node with facts `node`: the
    environment's UUIDs (named from NVML where it knows them), else all the node's."""
    uuids, variable = uuids_from_environment(env)
    if not uuids:
        return node
    names = {device.uuid: device.name for device in node.devices}
    devices = tuple(Gpu(i, uuid, names.get(uuid, "")) for i, uuid in enumerate(uuids))
    return GpuFacts(node.driver, node.cuda, devices, source=variable)


def local_target(source: tuple[str, ...], node: GpuFacts) -> GpuFacts:
    """The node's GPUs a local restore lands on: the checkpoint's own when all are here
    (the restored environment names them), else the node's first as many."""
    here = {device.uuid: device for device in node.devices}
    if source and all(uuid in here for uuid in source):
        chosen = tuple(here[uuid] for uuid in source)
    else:
        chosen = node.devices[: len(source)] if source else node.devices
    return GpuFacts(node.driver, node.cuda, chosen, node.source)


def device_map(source: tuple[str, ...], target: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """How a checkpoint's GPUs land on a target's: a source UUID also on the target keeps
    its GPU, the rest pair with the remaining targets by position. Counts must match."""
    if len(source) != len(target):
        raise IncompatibleError(
            f"the checkpoint used {len(source)} GPU(s), the target has {len(target)}"
        )
    kept = set(source) & set(target)
    spare = iter(uuid for uuid in target if uuid not in kept)
    return tuple((uuid, uuid if uuid in kept else next(spare)) for uuid in source)


def format_device_map(pairs: tuple[tuple[str, str], ...]) -> str:
    """`src=dst,…`, or "" when every GPU maps to itself (nothing to remap)."""
    if all(old == new for old, new in pairs):
        return ""
    return ",".join(f"{old}={new}" for old, new in pairs)


def read_gpu_facts() -> GpuFacts:
    """Driver, CUDA version and devices from NVML; no GPU information where NVML or its
    driver library is absent."""
    try:
        import pynvml
    except ImportError:  # pragma: no cover - a dependency of the distribution
        log.warning("nvidia-ml-py is not installed: pip install nvidia-ml-py")
        return GpuFacts()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        log.debug("%s: %s", NO_GPU_INFORMATION, err)
        return GpuFacts()
    try:
        return _collect(pynvml)
    finally:
        pynvml.nvmlShutdown()


def _collect(nv: object) -> GpuFacts:
    driver = _text(nv.nvmlSystemGetDriverVersion())  # type: ignore[attr-defined]
    cuda_int = int(nv.nvmlSystemGetCudaDriverVersion())  # type: ignore[attr-defined]
    devices = []
    for index in range(int(nv.nvmlDeviceGetCount())):  # type: ignore[attr-defined]
        handle = nv.nvmlDeviceGetHandleByIndex(index)  # type: ignore[attr-defined]
        uuid = _text(nv.nvmlDeviceGetUUID(handle))  # type: ignore[attr-defined]
        devices.append(Gpu(index, uuid, _text(nv.nvmlDeviceGetName(handle))))  # type: ignore[attr-defined]
    cuda = f"{cuda_int // 1000}.{cuda_int % 1000 // 10}"
    return GpuFacts(driver, cuda, tuple(devices), source="NVML")


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class NodeGpus:
    """The node's NVML facts, read once per worker (a node's GPUs do not change while its
    worker runs; NVML's init costs tens of milliseconds on the restore path). `known`
    gives them instead (a node described by its settings, or a test's)."""

    known: GpuFacts | None = None

    def facts(self) -> GpuFacts:
        if self.known is None:
            self.known = read_gpu_facts()
        return self.known
