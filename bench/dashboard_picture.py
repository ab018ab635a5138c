"""A picture of the dashboard (`deploy/observability/warmstart-dashboard.json`) drawn from a
real run's metrics: a dev server, the control and node workers with metrics served for
Prometheus, real CRIU and a moto S3 server; captures uploaded, restores fetched into the
node cache and from it, restores of a missing checkpoint, a restore that fails (its port
taken) and is quarantined, and the refusals after it. The endpoint is scraped every second
and a dozen of the dashboard's panels are computed from the scrapes as its PromQL would.

    .venv/bin/python -m bench.dashboard_picture --out docs/dashboard.png   # as root

matplotlib is not a dependency of the project: run it with `uv run --with matplotlib`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from activities.host.processes import terminate
from activities.storage.store import CheckpointStore
from api.errors import PipelineFailedError
from api.identity import CheckpointIdentity
from api.workload import LocalWorkload
from workers.compose import control_worker, node_worker
from workers.devserver import temporal_cli
from workers.metrics import configure_metrics, watching_backlog
from workers.operations import (
    follow,
    local_capture_request,
    remote_storage,
    start_capture,
    start_restore,
)
from workers.ports import free_port
from workers.settings import NodeSettings, Settings, StorageSettings, TelemetrySettings
from workflows.contracts import RestoreRequest
from workflows.visibility import ALL_KEYS

REPO = Path(__file__).resolve().parents[1]
Sample = tuple[str, dict[str, str], float]
Scrape = tuple[float, list[Sample]]


def scrape(url: str) -> list[Sample]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def workload(name: str, port: int) -> LocalWorkload:
    return LocalWorkload(
        name=name,
        command=(
            sys.executable,
            "-m",
            "examples.inference_worker",
            "--port",
            str(port),
            "--warmup-rounds",
            "20",
        ),
        cwd=str(REPO),
        health_url=f"http://127.0.0.1:{port}/healthz",
        ready_timeout_seconds=60,
    )


async def run(settings: Settings, client: Client, restores: int) -> None:
    """The scenario: what the picture shows."""

    async def capture(name: str, port: int) -> str:
        identity = CheckpointIdentity(model=f"bench/{name}", backend_framework="vllm")
        request = local_capture_request(settings, workload(name, port), identity)
        handle = await start_capture(client, request)
        result = await follow(client, handle, lambda _s: None, every=0.2)
        return result.checkpoint_id

    async def restore(name: str, ckpt: str, *, remote: bool = True) -> None:
        request = RestoreRequest(
            name=name,
            checkpoint_id=ckpt,
            node=settings.node.name,
            answer_timeout_seconds=30,
            control_task_queue=settings.node.control_task_queue,
            storage=remote_storage(settings) if remote else None,
        )
        try:
            handle = await start_restore(client, request)
            restored = await follow(client, handle, lambda _s: None, every=0.2)
        except PipelineFailedError as err:
            print(f"restore {name}: {err.reason}", flush=True)
            return
        await terminate(restored.pid, grace_seconds=5)

    ports = {"llama": free_port(), "qwen": free_port()}
    ckpts = {name: await capture(name, port) for name, port in ports.items()}
    store = CheckpointStore(settings.checkpoint_root)
    for ckpt in ckpts.values():  # only the bucket holds them: the node cache fetches
        shutil.rmtree(store.checkpoint_dir(ckpt))
    for i in range(restores):
        name = "llama" if i % 3 else "qwen"
        await restore(name, ckpts[name])
        if i % 7 == 6:
            await restore("gone", "0" * 16, remote=False)
        await asyncio.sleep(0.5)
    squatter = socket.socket()  # CRIU cannot rebind the worker's port: it fails, quarantined
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", ports["qwen"]))
    squatter.listen()
    with squatter:
        await restore("qwen", ckpts["qwen"])
    for _ in range(3):  # refused by the gate from now on: cold starts at once
        await restore("qwen", ckpts["qwen"])
        await restore("llama", ckpts["llama"])
        await asyncio.sleep(1)


async def record(restores: int, every: float) -> list[Scrape]:
    home = Path(tempfile.mkdtemp(prefix="warmstart-dashboard-"))
    from moto.server import ThreadedMotoServer

    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    host, s3_port = s3.get_host_and_port()
    endpoint = f"http://{host}:{s3_port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
        Bucket="checkpoints"
    )
    port = free_port()
    telemetry = TelemetrySettings(
        metrics="prometheus", prometheus_host="127.0.0.1", prometheus_port=port
    )
    configure_metrics(telemetry)
    settings = Settings(
        home=home,
        node=NodeSettings(name="gpu-node-1"),
        telemetry=telemetry,
        storage=StorageSettings(
            s3_bucket="checkpoints",
            s3_endpoint=endpoint,
            s3_region="us-east-1",
            part_size_mib=5,
            concurrency=4,
        ),
    )
    url = f"http://127.0.0.1:{port}/metrics"
    scrapes: list[Scrape] = []
    started = time.monotonic()

    async def sampling() -> None:
        while True:
            scrapes.append((time.monotonic() - started, await asyncio.to_thread(scrape, url)))
            await asyncio.sleep(every)

    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_cli(),
        dev_server_log_level="error",
        search_attributes=list(ALL_KEYS),
        data_converter=pydantic_data_converter,
    )
    try:
        async with env:
            client = env.client
            queues = [settings.node.control_task_queue, f"warmstart-node-{settings.node.name}"]
            base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
            async with (
                control_worker(client, settings),
                node_worker(client, replace(settings), base_env=base_env),
                watching_backlog(client, queues, every_seconds=1),
            ):
                sampler = asyncio.create_task(sampling())
                await run(settings, client, restores)
                await asyncio.sleep(3 * every)
                sampler.cancel()
    finally:
        s3.stop()
        shutil.rmtree(home, ignore_errors=True)
    return scrapes


def total(samples: list[Sample], name: str, match: Callable[[dict[str, str]], bool]) -> float:
    return sum(v for n, labels, v in samples if n == name and match(labels))


def groups(scrapes: list[Scrape], name: str, by: str) -> list[str]:
    return sorted({labels.get(by, "") for _, s in scrapes for n, labels, _ in s if n == name})


def rate(
    scrapes: list[Scrape], name: str, window: float, match: Callable[[dict[str, str]], bool]
) -> tuple[list[float], list[float]]:
    """`rate(name[window])` at each scrape (a counter's growth per second)."""
    xs, ys = [], []
    for i, (t, samples) in enumerate(scrapes):
        j = i
        while j > 0 and t - scrapes[j - 1][0] <= window:
            j -= 1
        if j == i:
            continue
        t0, earlier = scrapes[j]
        xs.append(t)
        ys.append((total(samples, name, match) - total(earlier, name, match)) / (t - t0))
    return xs, ys


def quantile(
    q: float, samples: list[Sample], base: str, match: Callable[[dict[str, str]], bool]
) -> float:
    """`histogram_quantile` over the whole run's buckets, interpolated as Prometheus does."""
    buckets: dict[float, float] = defaultdict(float)
    for n, labels, v in samples:
        if n == f"{base}_bucket" and match(labels):
            buckets[float(labels["le"])] += v
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] == 0:
        return float("nan")
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(buckets[bound] - below, 1e-12)
        lower, below = bound, buckets[bound]
    return lower


def draw(scrapes: list[Scrape], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.style.use("dark_background")
    fig, axes = plt.subplots(4, 3, figsize=(18, 16))
    fig.suptitle(
        "warmstart (deploy/observability/warmstart-dashboard.json), one node, "
        f"{scrapes[-1][0]:.0f} s of a real run",
        fontsize=15,
    )
    last = scrapes[-1][1]
    every = lambda _labels: True  # noqa: E731

    def panel(ax: Any, title: str) -> Any:
        ax.set_title(title, fontsize=11, loc="left")
        ax.grid(alpha=0.2)
        return ax

    def bars(ax: Any, values: dict[str, float], fmt: str = "{:.2f}") -> None:
        names = list(values)
        ax.barh(names, [values[n] for n in names], color="#73bf69")
        for i, n in enumerate(names):
            ax.text(values[n], i, " " + fmt.format(values[n]), va="center", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)

    ax = panel(axes[0][0], "Restores by outcome (per s, 15 s rate)")
    for outcome in groups(scrapes, "warmstart_restores_total", "warmstart_outcome"):
        ax.plot(
            *rate(
                scrapes,
                "warmstart_restores_total",
                15,
                lambda lab, o=outcome: lab.get("warmstart_outcome") == o,
            ),
            label=outcome,
        )
    ax.legend(fontsize=8)
    ax = panel(axes[0][1], "Restores not restored, by reason (total)")
    reasons = {
        f"{lab['warmstart_outcome']} {lab['warmstart_reason']}": v
        for n, lab, v in last
        if n == "warmstart_restores_total" and lab.get("warmstart_outcome") != "restored"
    }
    bars(ax, reasons, "{:.0f}")
    ax = panel(axes[0][2], "Restore duration, restored (s)")
    restored = lambda lab: lab.get("warmstart_outcome") == "restored"  # noqa: E731
    bars(
        ax,
        {
            f"p{int(q * 100)}": quantile(q, last, "warmstart_restore_duration_seconds", restored)
            for q in (0.5, 0.9, 0.99)
        },
        "{:.3f} s",
    )
    ax = panel(axes[1][0], "Restore stages, p99 (s)")
    stages = groups(scrapes, "warmstart_restore_stage_duration_seconds_count", "warmstart_stage")
    bars(
        ax,
        {
            s: quantile(
                0.99,
                last,
                "warmstart_restore_stage_duration_seconds",
                lambda lab, s=s: lab.get("warmstart_stage") == s,
            )
            for s in stages
        },
        "{:.3f} s",
    )
    ax = panel(axes[1][1], "Steps, p99 duration (s)")
    steps = groups(scrapes, "warmstart_step_duration_seconds_count", "warmstart_step")
    bars(
        ax,
        {
            s: quantile(
                0.99,
                last,
                "warmstart_step_duration_seconds",
                lambda lab, s=s: lab.get("warmstart_step") == s,
            )
            for s in steps
        },
        "{:.3f} s",
    )
    ax = panel(axes[1][2], "Step failures, by step and reason (total)")
    failures = {
        f"{lab['warmstart_step']} {lab['warmstart_reason']}": v
        for n, lab, v in last
        if n == "warmstart_step_duration_seconds_count" and lab.get("warmstart_outcome") == "failed"
    }
    bars(ax, failures, "{:.0f}")
    ax = panel(axes[2][0], "Bytes moved (MiB/s, 15 s rate)")
    for direction in groups(
        scrapes, "warmstart_transfer_bytes_total", "warmstart_transfer_direction"
    ):
        xs, ys = rate(
            scrapes,
            "warmstart_transfer_bytes_total",
            15,
            lambda lab, d=direction: lab.get("warmstart_transfer_direction") == d,
        )
        ax.plot(xs, [y / (1 << 20) for y in ys], label=direction)
    ax.legend(fontsize=8)
    ax = panel(axes[2][1], "Node cache hit ratio")
    xs, ys = [], []
    for t, samples in scrapes:
        lookups = total(samples, "warmstart_cache_lookups_total", every)
        if lookups:
            hits = total(
                samples,
                "warmstart_cache_lookups_total",
                lambda lab: lab.get("warmstart_cache_result") == "hit",
            )
            xs.append(t)
            ys.append(hits / lookups)
    ax.plot(xs, ys, color="#73bf69")
    ax.set_ylim(0, 1.05)
    ax = panel(axes[2][2], "Node cache usage (MiB)")
    ax.plot(
        [t for t, _ in scrapes],
        [total(s, "warmstart_cache_usage_bytes", every) / (1 << 20) for _, s in scrapes],
    )
    ax = panel(axes[3][0], "Captures by outcome (total), p50 duration")
    captures = {
        f"{lab['warmstart_outcome']} {lab['warmstart_reason']}": v
        for n, lab, v in last
        if n == "warmstart_captures_total"
    }
    p50 = quantile(0.5, last, "warmstart_capture_duration_seconds", every)
    bars(ax, captures, "{:.0f}")
    ax.set_xlabel(f"p50 capture duration {p50:.1f} s", fontsize=9)
    ax = panel(axes[3][1], "Quarantine evidence (total)")
    bars(
        ax,
        {
            f"{lab['warmstart_quarantine_state']} {lab['warmstart_reason']}": v
            for n, lab, v in last
            if n == "warmstart_quarantine_entries_total"
        },
        "{:.0f}",
    )
    ax = panel(axes[3][2], "Task queue backlog and steps running")
    for queue in groups(scrapes, "warmstart_queue_backlog", "temporal_task_queue"):
        ax.plot(
            [t for t, _ in scrapes],
            [
                total(
                    s,
                    "warmstart_queue_backlog",
                    lambda lab, q=queue: lab.get("temporal_task_queue") == q,
                )
                for _, s in scrapes
            ],
            label=f"backlog {queue}",
        )
    ax.plot(
        [t for t, _ in scrapes],
        [total(s, "warmstart_step_active", every) for _, s in scrapes],
        label="steps running",
    )
    ax.legend(fontsize=8)
    for row in axes:
        for a in row:
            a.tick_params(labelsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out, dpi=80)
    print(f"wrote {out}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    parser.add_argument("--restores", type=int, default=30)
    parser.add_argument("--every", type=float, default=1.0, help="seconds between scrapes")
    args = parser.parse_args()
    scrapes = asyncio.run(record(args.restores, args.every))
    draw(scrapes, args.out)


if __name__ == "__main__":
    main()
