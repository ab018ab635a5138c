"""GPU check on a machine with an NVIDIA GPU: NVML facts, GPU discovery from a real CUDA
process's environment (each source in order), and a CUDA checkpoint cycle of that process
(lock → checkpoint → restore → unlock, timed) whose GPU memory is verified afterwards.

Needs only the standard library, nvidia-ml-py and the driver:
    PYTHONPATH=. python3 bench/gpu_check.py [--cuda-checkpoint PATH]
Prints a table; exits non-zero when a step fails. Without a GPU it says so and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from activities.gpu.cuda import CudaCheckpoint, ProcessState, resume, suspend
from activities.gpu.nvml import (
    device_map,
    format_device_map,
    gpus_of_process,
    process_environment,
    read_gpu_facts,
)

# A CUDA process: fills 256 MiB of GPU memory with a pattern, then checks it on each line
# of its input (the driver API through ctypes: no compiler or CUDA toolkit needed).
WORKLOAD = r"""
import ctypes, sys
cuda = ctypes.CDLL("libcuda.so.1")
def ok(rc, what):
    if rc != 0:
        print("error", what, rc, flush=True); sys.exit(1)
ok(cuda.cuInit(0), "cuInit")
dev, ctx, ptr = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
ok(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
ok(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "retain")
ok(cuda.cuCtxSetCurrent(ctx), "current")
n = 256 << 20
ok(cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(n)), "alloc")
ok(cuda.cuMemsetD32_v2(ptr, ctypes.c_uint(0xC0FFEE), ctypes.c_size_t(n // 4)), "memset")
ok(cuda.cuCtxSynchronize(), "sync")
expected = (0xC0FFEE).to_bytes(4, "little") * (n // 4)
print("ready", flush=True)
for line in sys.stdin:
    host = ctypes.create_string_buffer(n)
    rc = cuda.cuMemcpyDtoH_v2(host, ptr, ctypes.c_size_t(n))
    print("check", rc, rc == 0 and host.raw == expected, flush=True)
"""

# The same CUDA process for the CRIU cycle: no pipes to its parent (CRIU restores it on its
# own); it checks its GPU memory whenever the file `check` appears in its directory.
CRIU_WORKLOAD = (
    WORKLOAD.split('print("ready"')[0]
    + r"""
import os, time
d = sys.argv[1]
open(os.path.join(d, "ready"), "w").close()
while True:
    if os.path.exists(os.path.join(d, "check")):
        os.unlink(os.path.join(d, "check"))
        host = ctypes.create_string_buffer(n)
        rc = cuda.cuMemcpyDtoH_v2(host, ptr, ctypes.c_size_t(n))
        with open(os.path.join(d, "result.tmp"), "w") as out:
            out.write(f"check {rc} {rc == 0 and host.raw == expected}")
        os.rename(os.path.join(d, "result.tmp"), os.path.join(d, "result"))
    time.sleep(0.02)
"""
)

ROWS: list[tuple[str, str, str]] = []


def row(step: str, result: str, seconds: float | None = None) -> None:
    ROWS.append((step, result, "" if seconds is None else f"{seconds * 1000:.1f} ms"))
    print(f"{step:40} {result:60} {ROWS[-1][2]}", flush=True)


def timed(step: str, fn: object, *args: object, **kwargs: object) -> object:
    started = time.perf_counter()
    value = fn(*args, **kwargs)  # type: ignore[operator]
    row(step, "ok" if value is None else str(value), time.perf_counter() - started)
    return value


def start_workload(env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKLOAD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    assert proc.stdout is not None
    first = proc.stdout.readline().strip()
    if first != "ready":
        raise SystemExit(f"CUDA workload did not start: {first!r}")
    return proc


def check_memory(proc: subprocess.Popen[str], step: str) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("check\n")
    proc.stdin.flush()
    answer = proc.stdout.readline().strip()
    row(step, answer)
    if answer != "check 0 True":
        raise SystemExit(f"{step}: GPU memory not intact: {answer!r}")


def discovery(node_uuid: str, node: object) -> None:
    """Each environment source in order, read back from a real process's environ."""
    cases = {
        "GMS_GPU_UUID_<i>": {"GMS_GPU_UUID_0": node_uuid, "GMS_GPU_UUIDS": "GPU-x"},
        "GMS_GPU_UUIDS": {"GMS_GPU_UUIDS": f"{node_uuid};", "CUDA_VISIBLE_DEVICES": "GPU-y"},
        "CUDA_VISIBLE_DEVICES": {"CUDA_VISIBLE_DEVICES": f"0,{node_uuid}"},
        "NVIDIA_VISIBLE_DEVICES": {
            "CUDA_VISIBLE_DEVICES": "0",
            "NVIDIA_VISIBLE_DEVICES": node_uuid,
        },
        "NVML": {},
    }
    for expected, env in cases.items():
        clean = {
            k: v for k, v in os.environ.items() if "VISIBLE_DEVICES" not in k and "GMS_" not in k
        }
        proc = subprocess.Popen(["sleep", "30"], env={**clean, **env})
        try:
            deadline = time.monotonic() + 5  # until its exec of sleep is done
            while Path(f"/proc/{proc.pid}/cmdline").read_bytes() != b"sleep\x0030\x00":
                assert time.monotonic() < deadline, "sleep did not start"
                time.sleep(0.01)
            facts = gpus_of_process(process_environment(proc.pid), node)  # type: ignore[arg-type]
        finally:
            proc.kill()
            proc.wait()
        got = f"{facts.source}: {','.join(facts.uuids)}"
        row(f"discovery via {expected}", got)
        if facts.source != expected or facts.uuids != (node_uuid,):
            raise SystemExit(f"discovery via {expected} gave {got}")


def cycle(cuda: CudaCheckpoint, pid: int, pairs: tuple[tuple[str, str], ...], label: str) -> None:
    timed(f"{label}: lock", cuda.lock, pid)
    timed(f"{label}: checkpoint", cuda.checkpoint, pid)
    state = cuda.state(pid)
    row(f"{label}: state after checkpoint", state.name)
    if state != ProcessState.CHECKPOINTED:
        raise SystemExit(f"state {state.name} after checkpoint")
    timed(f"{label}: restore", cuda.restore, pid, pairs=pairs)
    timed(f"{label}: unlock", cuda.unlock, pid)
    row(f"{label}: state after unlock", cuda.state(pid).name)


def ask(directory: str, step: str) -> None:
    result = os.path.join(directory, "result")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(result)
    open(os.path.join(directory, "check"), "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(result):
        if time.monotonic() > deadline:
            raise SystemExit(f"{step}: no answer from the CUDA process")
        time.sleep(0.02)
    answer = Path(result).read_text()
    row(step, answer)
    if answer != "check 0 True":
        raise SystemExit(f"{step}: GPU memory not intact: {answer!r}")


def run_criu(command: list[str], log: str, step: str) -> None:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    row(step, f"rc {done.returncode}", time.perf_counter() - started)
    if done.returncode != 0:
        errors = [line for line in Path(log).read_text().splitlines() if "Error" in line]
        raise SystemExit(f"{step} failed: " + " | ".join(errors[-6:]))


def criu_cycle(criu: str, cuda: CudaCheckpoint, env: dict[str, str]) -> None:
    """A real CUDA process through suspend → criu dump → criu restore → resume."""
    work = tempfile.mkdtemp(prefix="ws-gpu-")
    images, libdir = os.path.join(work, "img"), os.path.join(work, "no-plugins")
    os.makedirs(images)
    os.makedirs(libdir)
    log = open(os.path.join(work, "workload.log"), "w")  # noqa: SIM115 (the workload's)
    proc = subprocess.Popen(
        [sys.executable, "-c", CRIU_WORKLOAD, work],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
        start_new_session=True,
    )
    while not os.path.exists(os.path.join(work, "ready")):
        if proc.poll() is not None:
            raise SystemExit(f"CUDA workload ended: {Path(log.name).read_text()[-500:]}")
        time.sleep(0.05)
    ask(work, "criu cycle: memory before")
    timed("criu cycle: cuda suspend (lock+checkpoint)", suspend, cuda, [proc.pid], timeout_ms=10000)
    base = [criu, "--libdir", libdir, "-v4"]
    dump = [
        *base,
        "dump",
        "--tree",
        str(proc.pid),
        "--images-dir",
        images,
        "--log-file",
        "dump.log",
    ]
    run_criu(dump, os.path.join(images, "dump.log"), "criu cycle: criu dump")
    proc.wait()
    size = sum(os.path.getsize(os.path.join(images, f)) for f in os.listdir(images))
    row("criu cycle: images", f"{size / 2**20:.0f} MiB")
    pidfile = os.path.join(work, "restored.pid")
    restore = [
        *base,
        "restore",
        "--images-dir",
        images,
        "--log-file",
        "restore.log",
        "--restore-detached",
        "--pidfile",
        pidfile,
    ]
    run_criu(restore, os.path.join(images, "restore.log"), "criu cycle: criu restore")
    pid = int(Path(pidfile).read_text())
    row("criu cycle: state after criu restore", cuda.state(pid).name)
    pairs = device_map(
        tuple(u for u in [env["CUDA_VISIBLE_DEVICES"]]), (env["CUDA_VISIBLE_DEVICES"],)
    )
    timed(
        "criu cycle: cuda resume (restore+unlock)",
        resume,
        cuda,
        [pid],
        pairs=pairs if format_device_map(pairs) else (),
    )
    try:
        ask(work, "criu cycle: memory after restore")
    finally:
        os.kill(pid, 9)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cuda-checkpoint", default="")
    parser.add_argument("--criu", default="", help="also dump and restore it with this criu")
    args = parser.parse_args()
    node = timed("NVML facts", read_gpu_facts)
    if not node.devices:  # type: ignore[attr-defined]
        print(f"no GPU here: {node.source}")  # type: ignore[attr-defined]
        return 2
    row("driver / CUDA", f"{node.driver} / {node.cuda}")  # type: ignore[attr-defined]
    row("GPUs", f"{len(node.devices)} x {node.model}")  # type: ignore[attr-defined]
    uuid = node.devices[0].uuid  # type: ignore[attr-defined]
    discovery(uuid, node)
    proc = start_workload({"CUDA_VISIBLE_DEVICES": uuid})
    try:
        seen = gpus_of_process(process_environment(proc.pid), node)  # type: ignore[arg-type]
        pairs = device_map(seen.uuids, node.uuids)  # type: ignore[attr-defined]
        row("device map (same GPU)", repr(pairs))
        cuda = CudaCheckpoint()
        row("restore thread id", str(cuda.restore_thread(proc.pid)))
        row("state", cuda.state(proc.pid).name)
        check_memory(proc, "memory before")
        cycle(cuda, proc.pid, (), "cycle without map")
        check_memory(proc, "memory after cycle 1")
        cycle(cuda, proc.pid, ((uuid, uuid),), "cycle with identity gpuPairs")
        check_memory(proc, "memory after cycle 2")
        if args.cuda_checkpoint:
            tool = [args.cuda_checkpoint, "--pid", str(proc.pid)]
            for action in ("--get-state", "--toggle", "--get-state", "--toggle", "--get-state"):
                started = time.perf_counter()
                out = subprocess.run([*tool[:1], action, *tool[1:]], capture_output=True, text=True)
                row(
                    f"cuda-checkpoint {action}",
                    (out.stdout + out.stderr).strip() or f"rc {out.returncode}",
                    time.perf_counter() - started,
                )
            check_memory(proc, "memory after cuda-checkpoint toggles")
    finally:
        proc.kill()
        proc.wait()
    if args.criu:
        criu_cycle(args.criu, CudaCheckpoint(), {"CUDA_VISIBLE_DEVICES": uuid})
    print("\n| step | result | time |\n|---|---|---|")
    for step, result, seconds in ROWS:
        print(f"| {step} | {result} | {seconds} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
