"""The scale bench (`bench/scale.py`) in small: 20 pipelines on 5 simulated nodes against
the session's real dev server, with the real workflows and control worker."""

from __future__ import annotations

import os

from temporalio.client import Client

from api.reasons import Phase, Reason
from bench.scale import CONTROL_STEPS, Durations, listening_pid, report_lines, run_levels
from workers.settings import Settings

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
