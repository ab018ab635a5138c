"""GPU facts from NVML (nvidia-ml-py), for manifests and compatibility checks.

NVML is optional: on hosts without the NVIDIA driver the facts are empty, not an error.
"""

from __future__ import annotations

import logging

from api.manifest import GpuDevice

log = logging.getLogger(__name__)


class GpuFacts:
    def __init__(self, driver: str = "", cuda: str = "", devices: tuple[GpuDevice, ...] = ()):
        self.driver = driver
        self.cuda = cuda
        self.devices = devices


def read_gpu_facts() -> GpuFacts:
    """Driver, CUDA version and devices; empty where NVML or its driver library is absent."""
    try:
        import pynvml
    except ImportError:  # pragma: no cover - a dependency of the distribution
        log.warning("nvidia-ml-py is not installed: pip install nvidia-ml-py")
        return GpuFacts()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        log.debug("no NVML on this host: %s", err)
        return GpuFacts()
    try:
        return _collect(pynvml)
    finally:
        pynvml.nvmlShutdown()


def _collect(pynvml: object) -> GpuFacts:
    nv = pynvml
    driver = _text(nv.nvmlSystemGetDriverVersion())  # type: ignore[attr-defined]
    cuda_int = int(nv.nvmlSystemGetCudaDriverVersion())  # type: ignore[attr-defined]
    devices = []
    for index in range(int(nv.nvmlDeviceGetCount())):  # type: ignore[attr-defined]
        handle = nv.nvmlDeviceGetHandleByIndex(index)  # type: ignore[attr-defined]
        devices.append(
            GpuDevice(
                index=index,
                uuid=_text(nv.nvmlDeviceGetUUID(handle)),  # type: ignore[attr-defined]
                name=_text(nv.nvmlDeviceGetName(handle)),  # type: ignore[attr-defined]
            )
        )
    return GpuFacts(driver, f"{cuda_int // 1000}.{cuda_int % 1000 // 10}", tuple(devices))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
