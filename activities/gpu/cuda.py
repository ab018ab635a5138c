"""CUDA checkpoint of a process's GPU state: lock → checkpoint before CRIU dumps it,
restore (onto a device map) → unlock after CRIU restores it.

These are the driver's `cuCheckpointProcess*` calls (libcuda, driver ≥ 570), the same
ones NVIDIA's `cuda-checkpoint` utility makes; calling them directly gives the restore
its GPU remapping (`CUcheckpointRestoreArgs.gpuPairs`), which that utility's command line
does not expose. Only the standard library: libcuda is opened on first use, and a node
without it gets `CudaUnavailable` saying so.
"""

from __future__ import annotations

import ctypes
import enum
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from activities.host.processes import children
from api.errors import GpuError

CUDA_FILE = "cuda.json"  # in a version: the dumped tree's CUDA processes (container PIDs)


class CudaUnavailableError(GpuError):
    """No libcuda (no NVIDIA driver) on this node, or one without checkpoint support."""


class CudaCheckpointError(GpuError):
    """A checkpoint call failed; the message names the call, the PID and the CUDA error."""


class ProcessState(enum.IntEnum):
    """`CUprocessState`."""

    RUNNING = 0
    LOCKED = 1
    CHECKPOINTED = 2
    FAILED = 3


class _Uuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_char * 16)]


class _GpuPair(ctypes.Structure):
    _fields_ = [("old", _Uuid), ("new", _Uuid)]


class _LockArgs(ctypes.Structure):
    _fields_ = [
        ("timeoutMs", ctypes.c_uint),
        ("reserved0", ctypes.c_uint),
        ("reserved1", ctypes.c_uint64 * 7),
    ]


class _RestoreArgs(ctypes.Structure):
    _fields_ = [
        ("gpuPairs", ctypes.POINTER(_GpuPair)),
        ("gpuPairsCount", ctypes.c_uint),
        ("reserved", ctypes.c_char * (52 - ctypes.sizeof(ctypes.c_void_p))),
        ("reserved1", ctypes.c_uint64),
    ]


def uuid_bytes(gpu_uuid: str) -> bytes:
    """NVML's `GPU-xxxxxxxx-…` (or `MIG-…`) as the 16 bytes of a `CUuuid`."""
    text = gpu_uuid.split("-", 1)[1] if gpu_uuid.startswith(("GPU-", "MIG-")) else gpu_uuid
    try:
        return uuidlib.UUID(text).bytes
    except ValueError:
        raise GpuError(f"{gpu_uuid!r} is not a GPU UUID") from None


@dataclass
class CudaCheckpoint:
    """The driver's checkpoint API for other processes, by PID."""

    library: str = "libcuda.so.1"
    _cuda: ctypes.CDLL | None = field(default=None, init=False, repr=False)

    def _lib(self) -> ctypes.CDLL:
        if self._cuda is None:
            try:
                cuda = ctypes.CDLL(self.library)
            except OSError as err:
                raise CudaUnavailableError(
                    f"no CUDA driver library ({self.library}): {err}"
                ) from err
            if not hasattr(cuda, "cuCheckpointProcessLock"):
                raise CudaUnavailableError(
                    f"{self.library} has no checkpoint API (driver 570 or newer needed)"
                )
            self._call(cuda.cuInit, 0, what="cuInit")
            self._cuda = cuda
        return self._cuda

    def _call(self, fn: Callable[..., int], *args: object, what: str) -> None:
        code = fn(*args)
        if code != 0:
            raise CudaCheckpointError(f"{what} failed: {self._error_name(code)} ({code})")

    def _error_name(self, code: int) -> str:
        name = ctypes.c_char_p()
        if self._cuda is not None and self._cuda.cuGetErrorName(code, ctypes.byref(name)) == 0:
            return (name.value or b"").decode()
        return "CUDA error"

    def state(self, pid: int) -> ProcessState:
        value = ctypes.c_int()
        lib = self._lib()
        self._call(
            lib.cuCheckpointProcessGetState, pid, ctypes.byref(value), what=f"state of pid {pid}"
        )
        return ProcessState(value.value)

    def lock(self, pid: int, *, timeout_ms: int = 10_000) -> None:
        args = _LockArgs(timeoutMs=timeout_ms)
        lib = self._lib()
        self._call(lib.cuCheckpointProcessLock, pid, ctypes.byref(args), what=f"lock of pid {pid}")

    def checkpoint(self, pid: int) -> None:
        lib = self._lib()
        self._call(lib.cuCheckpointProcessCheckpoint, pid, None, what=f"checkpoint of pid {pid}")

    def restore(self, pid: int, *, pairs: tuple[tuple[str, str], ...] = ()) -> None:
        """Bring GPU state back; with `pairs` (old, new UUID) onto those GPUs. Callers
        pass pairs only when a GPU moves (`activities.gpu.nvml.format_device_map`)."""
        array = (_GpuPair * max(1, len(pairs)))()
        for i, (old, new) in enumerate(pairs):
            array[i] = _GpuPair(_Uuid(uuid_bytes(old)), _Uuid(uuid_bytes(new)))
        args = _RestoreArgs(gpuPairs=array if pairs else None, gpuPairsCount=len(pairs))
        lib = self._lib()
        what = f"restore of pid {pid}" + (f" onto {dict(pairs)}" if pairs else "")
        self._call(lib.cuCheckpointProcessRestore, pid, ctypes.byref(args), what=what)

    def unlock(self, pid: int) -> None:
        lib = self._lib()
        self._call(lib.cuCheckpointProcessUnlock, pid, None, what=f"unlock of pid {pid}")

    def restore_thread(self, pid: int) -> int:
        """The process's CUDA restore thread: a process using CUDA has one, others do not."""
        tid = ctypes.c_int()
        lib = self._lib()
        self._call(
            lib.cuCheckpointProcessGetRestoreThreadId,
            pid,
            ctypes.byref(tid),
            what=f"restore thread of pid {pid}",
        )
        return tid.value


class CudaApi(Protocol):
    """What the node asks of the driver's checkpoint API (CudaCheckpoint implements it)."""

    def restore_thread(self, pid: int) -> int: ...
    def lock(self, pid: int, *, timeout_ms: int = 10_000) -> None: ...
    def checkpoint(self, pid: int) -> None: ...
    def restore(self, pid: int, *, pairs: tuple[tuple[str, str], ...] = ()) -> None: ...
    def unlock(self, pid: int) -> None: ...


def cuda_processes(cuda: CudaApi, pids: list[int]) -> list[int]:
    """Those of `pids` that use CUDA (a CUDA process has a restore thread)."""
    found = []
    for pid in pids:
        try:
            cuda.restore_thread(pid)
        except CudaCheckpointError:
            continue
        found.append(pid)
    return found


def suspend(cuda: CudaApi, pids: list[int], *, timeout_ms: int) -> None:
    """Before CRIU dumps them: lock every CUDA process (no new work), then move each one's
    GPU memory into host memory, where CRIU sees it. A failure resumes what was done."""
    done: list[int] = []
    try:
        for pid in pids:
            cuda.lock(pid, timeout_ms=timeout_ms)
            done.append(pid)
        for pid in pids:
            cuda.checkpoint(pid)
    except CudaCheckpointError:
        resume(cuda, done, pairs=(), quiet=True)
        raise


def resume(
    cuda: CudaApi, pids: list[int], *, pairs: tuple[tuple[str, str], ...], quiet: bool = False
) -> None:
    """After CRIU restored them (or a leave-running dump ended): GPU memory back onto the
    GPUs `pairs` names (old, new UUID; none: the same ones), then unlock each process."""
    for pid in pids:
        try:
            cuda.restore(pid, pairs=pairs)
        except CudaCheckpointError:
            if not quiet:
                raise
    for pid in pids:
        try:
            cuda.unlock(pid)
        except CudaCheckpointError:
            if not quiet:
                raise


def tree_pids(root: int) -> list[tuple[int, int]]:
    """Every process of the tree under `root` (itself included): (node PID, PID in the
    tree's innermost PID namespace), parents first."""
    found, pending = [], [root]
    while pending:
        pid = pending.pop(0)
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        nspid = next((ln.split()[1:] for ln in status.splitlines() if ln.startswith("NSpid:")), [])
        found.append((pid, int(nspid[-1]) if nspid else pid))
        pending.extend(children(pid))
    return found
