"""GPU discovery, the restore device map and the CUDA checkpoint seam, without a GPU (the
same paths ran on an H200: `bench/gpu_check.py`, figures in BENCHMARKS.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from activities.gpu.cuda import (
    CudaCheckpoint,
    CudaCheckpointError,
    CudaUnavailableError,
    uuid_bytes,
)
from activities.gpu.nvml import (
    NO_GPU_INFORMATION,
    Gpu,
    GpuFacts,
    device_map,
    format_device_map,
    gpus_of_process,
    local_target,
    process_environment,
    read_gpu_facts,
    uuids_from_environment,
)
from activities.pipeline import QUARANTINED_REASONS, as_restore_failure, failure_note
from api.errors import GpuError, IncompatibleError, RestoreFailedError

A, B, C = (f"GPU-{n * 8}-0000-0000-0000-000000000000" for n in "abc")
MIG = "MIG-5c8f2a7e-0000-0000-0000-000000000000"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"GMS_GPU_UUID_1": B, "GMS_GPU_UUID_0": A, "GMS_GPU_UUIDS": C},
            ((A, B), "GMS_GPU_UUID_<i>"),
        ),
        (
            {"GMS_GPU_UUIDS": f"{A};{B}, {C}", "CUDA_VISIBLE_DEVICES": C},
            ((A, B, C), "GMS_GPU_UUIDS"),
        ),
        (
            {"CUDA_VISIBLE_DEVICES": f"0,{B},{MIG}", "NVIDIA_VISIBLE_DEVICES": A},
            ((B, MIG), "CUDA_VISIBLE_DEVICES"),
        ),
        (
            {"CUDA_VISIBLE_DEVICES": "0,1", "NVIDIA_VISIBLE_DEVICES": f"{C},{A}"},
            ((C, A), "NVIDIA_VISIBLE_DEVICES"),
        ),
        ({"NVIDIA_VISIBLE_DEVICES": "all", "GMS_GPU_UUIDS": " ; "}, ((), "")),
    ],
    ids=["indexed", "list", "cuda-visible", "nvidia-visible", "none"],
)
def test_gpu_uuids_come_from_each_source_in_order(
    env: dict[str, str], expected: tuple[tuple[str, ...], str]
) -> None:
    assert uuids_from_environment(env) == expected


def test_a_process_environment_is_read_from_the_process_itself(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": f"{B},{A}", "ODD": "a=b"}
    program = "import time; print('up', flush=True); time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", program], env=env, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"  # past its exec
        seen = process_environment(proc.pid)
        node = GpuFacts(
            "570.1", "12.8", (Gpu(0, A, "NVIDIA H100"), Gpu(1, B, "NVIDIA H100")), "NVML"
        )
        facts = gpus_of_process(seen, node)
    finally:
        proc.kill()
        proc.communicate()
    assert seen["ODD"] == "a=b"
    assert (facts.source, facts.uuids, facts.model) == (
        "CUDA_VISIBLE_DEVICES",
        (B, A),
        "NVIDIA H100",
    )
    assert process_environment(2**22 + 7) == {}


def test_without_gpu_variables_the_process_uses_what_the_node_has() -> None:
    node = GpuFacts("570.1", "12.8", (Gpu(0, A, "NVIDIA H100"),), "NVML")
    assert gpus_of_process({"PATH": "/bin"}, node) == node


def test_without_nvml_there_is_no_gpu_information() -> None:
    # This machine has no NVIDIA driver (a GPU machine has, and its CI run says so).
    if Path("/proc/driver/nvidia").exists():
        pytest.skip("an NVIDIA driver is loaded here: NVML answers")
    facts = read_gpu_facts()
    assert (facts.devices, facts.source, facts.model) == ((), NO_GPU_INFORMATION, "")


def test_the_device_map_keeps_same_gpus_and_pairs_the_rest_by_position() -> None:
    assert device_map((A, B), (B, A)) == ((A, A), (B, B))
    assert format_device_map(device_map((A, B), (B, A))) == ""
    assert device_map((A, B), (C, B)) == ((A, C), (B, B))
    assert format_device_map(device_map((A, B), (C, MIG))) == f"{A}={C},{B}={MIG}"
    with pytest.raises(
        IncompatibleError, match=r"the checkpoint used 2 GPU\(s\), the target has 1"
    ):
        device_map((A, B), (C,))


def test_a_local_restore_lands_on_the_checkpoint_gpus_when_they_are_here() -> None:
    node = GpuFacts("570.1", "12.8", tuple(Gpu(i, u, "H") for i, u in enumerate((A, B, C))), "NVML")
    assert local_target((C,), node).uuids == (C,)
    assert local_target((MIG, A), node).uuids == (A, B)


def test_gpu_uuids_become_cuda_uuid_bytes() -> None:
    assert uuid_bytes("GPU-73823c32-1417-b306-5320-7bb33a5257b2").hex() == (
        "73823c321417b30653207bb33a5257b2"
    )
    with pytest.raises(GpuError, match="'GPU-nope' is not a GPU UUID"):
        uuid_bytes("GPU-nope")


def test_without_a_cuda_driver_the_checkpoint_api_says_so() -> None:
    cuda = CudaCheckpoint(library="libcuda-absent.so.1")
    with pytest.raises(CudaUnavailableError, match=r"no CUDA driver library \(libcuda-absent"):
        cuda.lock(1)


def test_a_cuda_failure_in_a_restore_is_restore_failed_for_the_quarantine() -> None:
    cause = CudaCheckpointError("cuCheckpointProcessRestore(pid 7) failed: CUDA_ERROR (999)")
    failure = as_restore_failure(cause, "restore of checkpoint 0123456789abcdef")
    assert isinstance(failure, RestoreFailedError)
    assert failure.reason in QUARANTINED_REASONS
    assert str(failure) == f"restore of checkpoint 0123456789abcdef: CudaCheckpointError: {cause}"
    assert failure_note(failure).startswith("RestoreFailed: restore of checkpoint")
