"""Restore through the cluster path against raw `criu restore` of the same container image,
both timed from the request to the restored process's first HTTP answer in the pod's own
network namespace.

- cluster: the restore-target pod is scheduled; the node worker's watch starts the
  RestoreWorkflow eagerly on its own queue, its activity verifies the version and waits for
  the standby; the standby starts (timed from here) and announces itself; the node checks
  the gate, applies the rootfs diff, runs CRIU into the standby container, writes
  `restore-complete`; the workload answers.
- raw: the same `criu restore` into a fresh standby container of the same image (the
  command line the node builds, namespaces and all), started directly: no API server, no
  workflow, no gate, no digest check, no rootfs diff.

Needs root, CRIU >= 4.2, containerd and runc (as `make test` installs them). It uses the
test suite's API emulator (kmock) and its kubelet stand-in. From the repository root:
`.venv/bin/python -m bench.cluster_restore [--runs N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from temporalio.client import Client

from activities.contracts import ContainerTarget
from activities.criu.command import Criu
from activities.runtime.containerd import Containerd
from activities.runtime.restore import run_restore
from activities.storage.store import CheckpointStore
from api.naming import restore_workflow_id
from api.restore_pods import STANDBY_NAME, STANDBY_SCRIPT
from tests.cluster_stack import PORT, Stack, Target, captured, running_stack, serving
from tests.containers import Kubelet, running_containerd
from tests.kube import start_cluster
from workers.client import connect
from workers.devserver import DevServer
from workers.ports import free_port
from workers.settings import Settings, TemporalSettings
from workflows.contracts import RestoreResult

REPO = Path(__file__).resolve().parent.parent


async def answered_within(pid: int) -> asyncio.subprocess.Process:
    """A poller in the network namespace of `pid`, ready: it prints when GET / answers."""
    proc = await asyncio.create_subprocess_exec(
        "nsenter",
        f"--net=/proc/{pid}/ns/net",
        "python3",
        "-m",
        "bench.poller",
        f"http://127.0.0.1:{PORT}/",
        "60",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    await proc.stdout.readline()  # "ready"
    return proc


async def answered_at(poller: asyncio.subprocess.Process) -> float:
    assert poller.stdout is not None
    line = await poller.stdout.readline()
    await poller.wait()
    return float(line)


# In front of the standby (the bench's own): the container waits for `go` in its control
# directory, then becomes the standby (same process, its init). Both paths are timed from
# `go`: the standby's start.
GATED = [
    "/bin/sh",
    "-c",
    'until [ -e /snapshot-control/go ]; do sleep 0.01; done; exec "$@"',
    "gated",
]


async def cluster_run(
    client: Client, stack: Stack, resource: dict[str, Any], image: str, log: Path
) -> float:
    """From the standby's start to the restored process's first answer: the restore was
    started when the pod was scheduled and prepared meanwhile; the standby announces itself
    (`standby-waiting`), the node restores into it. The kubelet's status write comes after."""
    name = f"bench-{uuid.uuid4().hex[:6]}"
    target = Target(stack, name, image, log)

    def gated(pod: dict[str, Any]) -> None:
        main = pod["spec"]["containers"][0]
        main["command"] = [*GATED, *main["command"]]

    await target.admit(resource, tamper=gated)
    poller = await answered_within(target.pid)
    started = time.monotonic()
    (target.control / "go").touch()
    elapsed = await answered_at(poller) - started
    await target.report_running()
    assert await target.restore_status() == "restored"
    workflow_id = restore_workflow_id(namespace="inference", name=name, key=target.uid)
    result = await client.get_workflow_handle(workflow_id, result_type=RestoreResult).result()
    stages = ", ".join(f"{k} {v * 1000:.0f}" for k, v in result.stage_seconds.items())
    print(f"  cluster restore {elapsed:.3f} s, stages (ms): {stages}", flush=True)
    return elapsed


async def raw_run(
    stack: Stack,
    criu: Criu,
    version_dir: Path,
    manifest: Any,
    image: str,
    log: Path,
    program: str,
) -> float:
    uid = str(uuid.uuid4())  # a standby container of no pod: no node worker looks at it
    command = ["/bin/sh", "-c", STANDBY_SCRIPT, STANDBY_NAME, "python3", "-c", program]
    stack.kubelet.run(uid, "main", command, image=image, log=log)
    pod = ContainerTarget(namespace="inference", pod_name="raw", pod_uid=uid, container="main")
    standby = await Containerd(address=stack.kubelet.address).locate(pod)
    poller = await answered_within(standby.pid)
    work = log.parent / f"raw-{uid}"
    started = time.monotonic()
    restored = await run_restore(
        criu=criu,
        standby=standby,
        images_dir=version_dir / "criu",
        manifest=manifest,
        work_dir=work,
        where="raw",
    )
    elapsed = await answered_at(poller) - started
    assert restored.host_pid > 0
    return elapsed


def table(rows: dict[str, list[float]]) -> str:
    lines = ["| path | p50 (ms) | mean (ms) | min (ms) | max (ms) |", "|---|---|---|---|---|"]
    for label, values in rows.items():
        ms = [v * 1000 for v in values]
        lines.append(
            f"| {label} | {statistics.median(ms):.0f} | {statistics.mean(ms):.0f} "
            f"| {min(ms):.0f} | {max(ms):.0f} |"
        )
    added = statistics.median(rows["cluster"]) - statistics.median(rows["raw"])
    lines.append(f"\nadded by the cluster path at p50: {added * 1000:+.0f} ms (budget +25 ms)")
    return "\n".join(lines)


async def main(runs: int, state_mib: int = 0, lazy: bool = False) -> None:
    rows = await cluster_rows(runs, state_mib, lazy=lazy)
    print(table(rows))


async def cluster_rows(
    runs: int, state_mib: int = 0, *, lazy: bool = False
) -> dict[str, list[float]]:
    """Seconds to the first answer of each run, raw and through the cluster path, of a
    workload holding `state_mib` MiB; `lazy`: the node restores lazily (raw stays eager)."""
    with tempfile.TemporaryDirectory(prefix="ws-bench-") as tmp:
        port = free_port()
        settings = Settings(home=Path(tmp), temporal=TemporalSettings(address=f"127.0.0.1:{port}"))
        server = DevServer(
            db_file=Path(tmp) / "t.db", port=port, ui_port=free_port(), headless=True
        )
        await server.start()
        try:
            client: Client = await connect(settings, wait_seconds=30)
            kubelets = running_containerd()
            kubelet: Kubelet = next(kubelets)
            try:
                async with contextlib.aclosing(start_cluster()) as clusters:  # type: ignore[type-var]
                    async for cluster in clusters:
                        return await _rounds(
                            client, cluster, kubelet, Path(tmp), runs, state_mib, lazy
                        )
            finally:
                kubelets.close()
        finally:
            await server.stop()
    raise RuntimeError("no API server started")


async def _rounds(
    client: Client,
    cluster: Any,
    kubelet: Kubelet,
    tmp: Path,
    runs: int,
    state_mib: int,
    lazy: bool,
) -> dict[str, list[float]]:
    image = kubelet.import_image("local/workload:1")
    rows: dict[str, list[float]] = {"raw": [], "cluster": []}
    program = serving(state_mib)
    async with running_stack(client, cluster, kubelet, tmp, lazy_pages=lazy) as stack:
        resource, _token = await captured(stack, image, program=program)
        store = CheckpointStore(stack.store.root)
        version_dir = store.find(resource["status"]["checkpointID"])
        manifest = store.verify(version_dir, checkpoint_id=resource["status"]["checkpointID"])
        criu = Criu(Settings().criu.resolve() or "criu")
        for i in range(runs):
            log = tmp / f"run-{i}.log"
            # Each restored process is stopped before the next restore, and the order
            # alternates: a large restore landing in memory the host has not backed yet
            # (a VM's first touch) would otherwise be charged to whichever ran second.
            for path in ("raw", "cluster") if i % 2 == 0 else ("cluster", "raw"):
                if path == "raw":
                    got = await raw_run(stack, criu, version_dir, manifest, image, log, program)
                else:
                    got = await cluster_run(client, stack, resource, image, log)
                rows[path].append(got)
                kubelet.remove_all()
                kubelet.started.clear()
            print(f"run {i + 1}: raw {rows['raw'][-1]:.3f} s, cluster {rows['cluster'][-1]:.3f} s")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--state-mib", type=int, default=0, help="memory the workload holds")
    parser.add_argument("--lazy", action="store_true", help="the node restores lazily")
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.state_mib, args.lazy))
