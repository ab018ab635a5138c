"""Whether a checkpoint can run on a node: the manifest's host facts against the node's,
compared before any byte is read, so a restore that cannot work refuses in milliseconds.

The rules, and why:
- CPU architecture: equal (the images hold machine code).
- Kernel: the same major.minor release (restored processes keep their view of kernel
  interfaces, vDSO and sysctls; a patch release differs in nothing CRIU records).
- CRIU: the node's is no older than the one that dumped (images are read forward only).
- GPUs, when the checkpoint used any: the same count (the device map pairs them one to
  one), the same model(s) in order, and the same driver version (CUDA's checkpoint state
  is the driver's own format); the CUDA version follows the driver and is reported with it.
"""

from __future__ import annotations

import re

from api.manifest import HostInfo


def _release(text: str, parts: int) -> tuple[int, ...]:
    numbers = [int(n) for n in re.findall(r"\d+", text)[:parts]]
    return tuple(numbers + [0] * (parts - len(numbers)))


def mismatches(
    *, captured: HostInfo, captured_criu: str, node: HostInfo, node_criu: str
) -> list[str]:
    """Every way `node` cannot run a checkpoint made on `captured`; [] when it can."""
    found = []
    if captured.arch != node.arch:
        found.append(f"CPU architecture {captured.arch} (this node: {node.arch})")
    if _release(captured.kernel, 2) != _release(node.kernel, 2):
        found.append(f"kernel {captured.kernel} (this node: {node.kernel})")
    if _release(node_criu, 3) < _release(captured_criu, 3):
        found.append(f"CRIU {captured_criu} or newer (this node: {node_criu})")
    if captured.gpus:
        found += _gpu_mismatches(captured, node)
    return found


def _gpu_mismatches(captured: HostInfo, node: HostInfo) -> list[str]:
    if not node.gpus:
        return [f"{len(captured.gpus)} GPU(s) {captured.gpu_model} (this node: no GPU information)"]
    found = []
    if len(captured.gpus) != len(node.gpus):
        found.append(f"{len(captured.gpus)} GPU(s) (this target: {len(node.gpus)})")
    elif captured.gpu_model != node.gpu_model:
        found.append(f"GPU model {captured.gpu_model} (this node: {node.gpu_model})")
    if captured.gpu_driver != node.gpu_driver:
        found.append(
            f"GPU driver {captured.gpu_driver} / CUDA {captured.cuda_version} "
            f"(this node: {node.gpu_driver or 'none'} / CUDA {node.cuda_version or 'none'})"
        )
    return found


def describe_mismatches(checkpoint_id: str, found: list[str]) -> str:
    return f"checkpoint {checkpoint_id} needs " + "; ".join(found)
