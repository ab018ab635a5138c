"""The compatibility rules between a checkpoint's host and a restoring node."""

from __future__ import annotations

import pytest

from api.compatibility import describe_mismatches, mismatches
from api.manifest import GpuDevice, HostInfo

H100 = tuple(GpuDevice(index=i, uuid=f"GPU-{i}", name="NVIDIA H100") for i in range(2))
CAPTURED = HostInfo(
    kernel="6.8.0-45-generic", arch="x86_64", gpu_driver="570.86", cuda_version="12.8", gpus=H100
)


def check(node: HostInfo, *, criu: str = "4.2") -> list[str]:
    return mismatches(captured=CAPTURED, captured_criu="4.2", node=node, node_criu=criu)


def test_the_same_class_of_node_is_compatible_whatever_its_gpu_uuids() -> None:
    other_gpus = tuple(g.model_copy(update={"uuid": f"GPU-x{g.index}"}) for g in H100)
    node = CAPTURED.model_copy(update={"kernel": "6.8.0-51-generic", "gpus": other_gpus})
    assert check(node, criu="4.2.1") == []


@pytest.mark.parametrize(
    ("change", "criu", "problem"),
    [
        ({"arch": "aarch64"}, "4.2", "CPU architecture x86_64 (this node: aarch64)"),
        ({"kernel": "6.11.0"}, "4.2", "kernel 6.8.0-45-generic (this node: 6.11.0)"),
        ({}, "4.1.1", "CRIU 4.2 or newer (this node: 4.1.1)"),
        ({"gpus": H100[:1]}, "4.2", "2 GPU(s) (this target: 1)"),
        ({"gpus": ()}, "4.2", "2 GPU(s) NVIDIA H100 (this node: no GPU information)"),
        (
            {"gpus": tuple(g.model_copy(update={"name": "NVIDIA L40S"}) for g in H100)},
            "4.2",
            "GPU model NVIDIA H100 (this node: NVIDIA L40S)",
        ),
        (
            {"gpu_driver": "580.1", "cuda_version": "13.0"},
            "4.2",
            "GPU driver 570.86 / CUDA 12.8 (this node: 580.1 / CUDA 13.0)",
        ),
    ],
)
def test_each_mismatch_is_named(change: dict[str, object], criu: str, problem: str) -> None:
    assert check(CAPTURED.model_copy(update=change), criu=criu) == [problem]


def test_a_cpu_checkpoint_ignores_the_node_gpus_and_all_mismatches_are_listed() -> None:
    cpu = CAPTURED.model_copy(update={"gpus": (), "gpu_driver": "", "cuda_version": ""})
    node = HostInfo(kernel="5.15.0", arch="aarch64", gpu_driver="570.86", gpus=H100)
    found = mismatches(captured=cpu, captured_criu="4.2", node=node, node_criu="4.2")
    assert describe_mismatches("96429b2725761a09", found) == (
        "checkpoint 96429b2725761a09 needs CPU architecture x86_64 (this node: aarch64); "
        "kernel 6.8.0-45-generic (this node: 5.15.0)"
    )
