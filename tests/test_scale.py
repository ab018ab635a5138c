"""The scale bench (`bench/scale.py`) in small: 20 pipelines on 5 simulated nodes against
the session's real dev server, with the real workflows and control worker; locally, and on
the cluster path (`bench/scale_cluster.py`) through kmock and a real kube-apiserver."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from temporalio.client import Client

from api.reasons import Phase, Reason
from bench.scale import CONTROL_STEPS, Durations, listening_pid, report_lines, run_levels
from bench.scale_cluster import api_server, run_cluster_levels
from tests.apiserver import needs_apiserver
from workers.settings import Settings, TemporalSettings

CAPTURE_STEPS = {
    "claim_checkpoint_id",
    "launch_workload",
    "await_workload_ready",
    "dump_checkpoint",
    "commit_checkpoint",
    "write_sentinel",
    "publish_status",
    "stop_workload",
}


async def test_twenty_pipelines_on_five_nodes(client: Client, settings: Settings) -> None:
    port = int(client.service_client.config.target_host.rsplit(":", 1)[1])
    server_pid = listening_pid(port)
    assert server_pid is not None, f"no process found listening on the dev server's port {port}"
    durations = Durations(warm_up=0.2)
    (level,) = await run_levels(
        client,
        settings,
        pipelines=20,
        nodes=5,
        levels=[8],
        durations=durations,
        server_pid=server_pid,
        fall_back_every=5,
    )

    # Every pipeline ended as planned, in its workflow's result and in what the real
    # control side published: 10 captures Ready, 8 restores Restored, 2 fell back.
    outcomes = [(p.kind, p.outcome, p.published) for p in level.pipelines]
    ready, restored = f"{Phase.READY}:{Reason.CAPTURED}", f"{Phase.RESTORED}:{Reason.RESTORED}"
    fell_back = f"{Phase.FELL_BACK}:{Reason.CHECKPOINT_NOT_FOUND}"
    assert outcomes.count(("capture", ready, ready)) == 10, outcomes
    assert outcomes.count(("restore", restored, restored)) == 8, outcomes
    assert outcomes.count(("restore", fell_back, fell_back)) == 2, outcomes
    assert not level.unexpected
    assert {p.node for p in level.pipelines} == {f"node-{i:03d}" for i in range(5)}

    # Each run's steps, from its history: captures took every local capture step once.
    assert len(level.timings) == 20
    for pipeline, timing in zip(level.pipelines, level.timings, strict=True):
        names = [step.step for step in timing.steps]
        if pipeline.kind == "capture":
            assert sorted(names) == sorted(CAPTURE_STEPS), names
        else:
            assert names == ["restore_checkpoint", "publish_status"], names
        for step in timing.steps:
            # Stand-ins slept at least their draw, inside the step's span; control steps
            # are real and count whole.
            assert step.added >= -0.002, (pipeline.name, step)
            assert step.queued >= 0, (pipeline.name, step)
            assert (step.stand_in == 0) == (step.step in CONTROL_STEPS), step
        assert timing.added >= 0 and timing.start >= -0.01, timing
        # Each step is scheduled, started and ended in the history, beside the run's own.
        assert timing.events > 3 * len(timing.steps), timing

    # The rate cannot beat the stand-ins: no pipeline ends before its own sleeps do.
    slowest = max(sum(s.stand_in for s in t.steps) for t in level.timings)
    assert 0 < level.rate <= len(level.pipelines) / slowest
    assert level.wall >= slowest
    assert level.events_rate > 3 * level.rate  # no pipeline without its steps
    steps = level.steps()
    assert set(steps) == CAPTURE_STEPS | {"restore_checkpoint"}
    queued, added = steps["dump_checkpoint"]
    assert queued.n == added.n == 10 and 0 <= added.p50 <= added.p99
    assert steps["publish_status"][1].n == 20

    # CPU: both processes worked, neither beyond the machine's cores.
    cores = os.cpu_count() or 1
    assert level.server_cpu is not None and 0 < level.server_cpu <= cores * level.wall
    assert 0 < level.own_cpu <= cores * level.wall
    assert 0 < level.machine_busy <= 1

    lines = list(report_lines([level], nodes=5))
    assert any(line.strip().startswith("8 ") for line in lines), lines


CLUSTER_CAPTURE_STEPS = [
    "claim_checkpoint_id",
    "publish_status",
    "create_capture_job",
    "publish_status",
    "signal pod_scheduled",
    "publish_status",
    "signal container_ready",
    "dump_container",
    "commit_container",
    "write_container_sentinel",
    "publish_status",
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["kmock", pytest.param("apiserver", marks=needs_apiserver)])
async def test_twenty_pipelines_on_five_nodes_through_an_api_server(
    client: Client, settings: Settings, tmp_path: Path, kind: str
) -> None:
    """The cluster path: Checkpoints and restore-target pods through kmock or a real
    kube-apiserver, `warmstart controller` in its own process, the nodes' own watches."""
    address = client.service_client.config.target_host
    settings = dataclasses.replace(settings, temporal=TemporalSettings(address=address))
    durations = Durations(warm_up=0.2)
    async with api_server(kind) as api:
        (level,) = await run_cluster_levels(
            client,
            settings,
            api,
            pipelines=20,
            nodes=5,
            levels=[8],
            durations=durations,
            server_pid=listening_pid(int(address.rsplit(":", 1)[1])),
            folder=tmp_path,
            fall_back_every=5,
        )

    # Every pipeline ended as planned, in its workflow's result and on the API server (the
    # Checkpoint's status, the pod's restore-status, their Events).
    outcomes = [(p.kind, p.outcome, p.published) for p in level.pipelines]
    ready, restored = f"{Phase.READY}:{Reason.CAPTURED}", f"{Phase.RESTORED}:{Reason.RESTORED}"
    fell_back = f"{Phase.FELL_BACK}:{Reason.CHECKPOINT_NOT_FOUND}"
    assert outcomes.count(("capture", ready, ready)) == 10, outcomes
    assert outcomes.count(("restore", restored, restored)) == 8, outcomes
    assert outcomes.count(("restore", fell_back, fell_back)) == 2, outcomes
    assert not level.unexpected
    assert {p.node for p in level.pipelines} == {f"node-{i:03d}" for i in range(5)}

    # Each run's steps, from its history: a capture took every cluster step once (status
    # published four times), its pod's two signals among them, each after the bench's write.
    for pipeline, timing in zip(level.pipelines, level.timings, strict=True):
        names = [step.step for step in timing.steps]
        if pipeline.kind == "capture":
            assert sorted(names) == sorted(CLUSTER_CAPTURE_STEPS), names
            ready_signal = next(s for s in timing.steps if s.step == "signal container_ready")
            warm_up = durations.draw(pipeline.workflow_id, "await_workload_ready")
            assert ready_signal.stand_in == warm_up
        elif pipeline.expected == restored:
            assert names == ["restore_container", "publish_status"], names
        else:
            assert names == ["restore_container", "write_container_sentinel", "publish_status"]
        for step in timing.steps:
            assert step.added >= -0.002 and step.queued >= 0, (pipeline.name, step)
        assert timing.added >= 0 and timing.start >= 0, timing

    slowest = max(sum(s.stand_in for s in t.steps) for t in level.timings)
    assert 0 < level.rate <= len(level.pipelines) / slowest
    steps = level.steps()
    assert steps["publish_status"][1].n == 4 * 10 + 10
    assert steps["signal pod_scheduled"][1].n == steps["dump_container"][1].n == 10

    # CPU: the dev server, the API server's processes, the controller's and the bench's.
    cores = os.cpu_count() or 1
    names = {"kmock"} if kind == "kmock" else {"apiserver", "etcd"}
    assert set(level.cpu) == {"temporal", "controller", "bench", *names}
    for name, seconds in level.cpu.items():
        assert seconds is not None and 0 < seconds <= cores * level.wall, (name, seconds)

    lines = list(report_lines([level], nodes=5))
    assert any(line.strip().startswith("8 ") for line in lines), lines
    assert any(line.startswith("signal container_ready (watch)") for line in lines), lines
