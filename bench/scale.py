"""Scale: N capture and restore pipelines across M simulated nodes, one Temporal dev server.

This module is the local mode (`--api none`, the default) and what both modes share: the
plan, the stand-ins, the timings and the report. `--api kmock|apiserver` runs the same plan
on the cluster path, through an API server (`bench/scale_cluster.py`, its docstring says what
is real there and what the bench plays).

Real: the Temporal dev server (`workers.devserver.DevServer`), the client, the workflows
(`CaptureWorkflow`, `RestoreWorkflow`, unchanged), the control worker
(`workers.compose.control_worker`: claims and status published into its state directory)
and the workers' interceptors (`workers.compose.interceptors`). Each simulated node is a
real Temporal `Worker` on its own task queue, `warmstart-node-<node>`, running
`RestoreWorkflow`, all in this one process. Only the node-side activities are
**stand-ins**: `NodeStandIns` subclasses the declarations of `activities/steps.py`, so each
is registered under the name the workflows call, and sleeps for a duration drawn around a
figure this repository measured (BENCHMARKS.md), ±25 %, the same draw for the same
workflow and step every time (a digest of both, so the report can subtract it exactly):

- `launch_workload`, 20 ms: not measured there; a fork and exec of `unshare` and the
  workload (an estimate).
- `await_workload_ready`, `--warm-up` (1 s): real warm-ups are 5 s (the real node's
  synthetic one) to 21.5 s (the demo's sample worker); shortened so that the bench
  measures the system rather than the wait (a longer one only holds a slot longer).
- `dump_checkpoint`, 180 ms: "Capture and restore at real sizes", raw `criu dump` of
  0.25 GiB, 0.18 s.
- `commit_checkpoint`, 200 ms: "Cluster capture of a real containerd container", `commit`
  0.195-0.213 s.
- `write_sentinel`, 5 ms: a file written and renamed (the 0.14-0.18 s `snapshot-complete`
  step of that cluster capture is mostly the pipeline's own round trip, not the write).
- `stop_workload`, 20 ms: SIGTERM and the exit of a process that handles it (an estimate).
- `restore_checkpoint`, 160 ms: "Restore storm on one node", the stages' means: verify 41
  + prepare 22 + criu-restore 88 + await-answer 9 ms.
- `restore_checkpoint` of a version the node does not hold, 5 ms: one directory listing.

Pipelines: captures and restores alternate, a pair to each node in turn; every
`--fall-back-every`-th restore names a checkpoint no node holds, so its node answers
`CheckpointNotFound` and the restore falls back (the expected outcome, checked like the
others). Each pipeline's outcome is the workflow's result and the status the real control
side published; both must say what was expected.

Timings come from each workflow's history (server timestamps): per step, the queueing
(scheduled → started) and the added latency (from the end of the previous step, or the
run's start, to this step's end, less the stand-in's own duration: the workflow task that
schedules it, the queue, dispatch and reporting the result back). The control steps
(`claim_checkpoint_id`, `publish_status`) are real, so all their time counts as added.
CPU: the dev server's and this process's, read from `/proc/<pid>/stat`, and the machine's
busy share from `/proc/stat` ("others": what the machine spent beyond the measured processes,
other work on a shared machine included).

Usage, from the repository root (no root needed, nothing is dumped; `--api apiserver` needs
root and the kube-apiserver `make test` builds):
`.venv/bin/python -m bench.scale --pipelines 1000 --nodes 50 --in-flight 50,200,1000`
`.venv/bin/python -m bench.scale --api kmock --pipelines 1000 --nodes 50 --in-flight 20,50,200`
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import logging
import math
import os
import re
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.service import RPCError
from temporalio.worker import Worker

from activities.contracts import (
    AwaitReadyInput,
    CommitInput,
    CommitResult,
    DiscardInput,
    DumpInput,
    LaunchInput,
    LaunchResult,
    ReleaseInput,
    RestoredWorkload,
    RestoreInput,
    SentinelInput,
    StopInput,
    UploadInput,
    UploadResult,
)
from activities.local.state import read_status
from activities.steps import DumpSteps, LocalProcessSteps, RestoreSteps, SentinelSteps, StorageSteps
from api.errors import CheckpointNotFoundError, StorageError
from api.identity import CheckpointIdentity, checkpoint_id
from api.naming import LOCAL_NAMESPACE, node_task_queue
from api.reasons import Phase, Reason
from api.workload import LocalWorkload
from workers.client import connect
from workers.compose import control_worker, interceptors
from workers.devserver import DevServer
from workers.operations import pipeline_failure, start_capture, start_restore
from workers.ports import free_port
from workers.settings import NodeSettings, Settings, TemporalSettings
from workflows.contracts import CaptureRequest, RestoreRequest
from workflows.restore import RestoreWorkflow

log = logging.getLogger(__name__)
SPREAD = 0.25  # each stand-in sleeps its median times [0.75, 1.25)
MISSING = "restore_checkpoint/missing"
MEDIANS = {
    "launch_workload": 0.020,
    "dump_checkpoint": 0.180,
    "commit_checkpoint": 0.200,
    "write_sentinel": 0.005,
    "stop_workload": 0.020,
    "restore_checkpoint": 0.160,
    MISSING: 0.005,
    "discard_staging": 0.010,
    # The cluster path's node steps (sources in bench/scale_cluster.py's docstring).
    "dump_container": 0.340,
    "commit_container": 0.200,
    "write_container_sentinel": 0.005,
    "restore_container": 0.240,
    "restore_container/missing": 0.005,
}
CONTROL_STEPS = (
    "claim_checkpoint_id",
    "publish_status",
    "create_capture_job",
    "read_capture_pod",
    "delete_capture_job",
)
# Signals that report what the bench plays (the kubelet) and how long that took: the
# container is Ready after its warm-up.
PLAYED = {"container_ready": "await_workload_ready"}
HISTORY_READS = 16  # histories fetched at once after a level


@dataclass(frozen=True)
class Durations:
    """How long each stand-in sleeps: a draw around its median, fixed by workflow and step."""

    warm_up: float = 1.0

    def median(self, step: str) -> float:
        return self.warm_up if step == "await_workload_ready" else MEDIANS[step]

    def draw(self, workflow_id: str, step: str) -> float:
        digest = hashlib.sha256(f"{workflow_id}\0{step}".encode()).digest()
        share = int.from_bytes(digest[:8], "big") / 2**64
        return self.median(step) * (1 - SPREAD + 2 * SPREAD * share)


def _number(*parts: str) -> int:
    """A stable stand-in number (a PID, start ticks) for these parts."""
    return 100_000 + int.from_bytes(hashlib.sha256("\0".join(parts).encode()).digest()[:3], "big")


class NodeStandIns(LocalProcessSteps, DumpSteps, SentinelSteps, StorageSteps, RestoreSteps):
    """Stand-ins of a node's local-mode activities, under the declared names: they sleep
    for `Durations` and answer as the real ones do. `held`: the checkpoint IDs every node
    holds a version of; a restore of another is `CheckpointNotFound`, as on a real node."""

    def __init__(self, durations: Durations, held: set[str]) -> None:
        self._durations, self._held = durations, held

    async def _sleep(self, step: str) -> None:
        await asyncio.sleep(self._durations.draw(activity.info().workflow_id, step))

    @activity.defn
    async def launch_workload(self, request: LaunchInput) -> LaunchResult:
        await self._sleep("launch_workload")
        pid = _number(activity.info().workflow_id, "pid")
        return LaunchResult(pid=pid, start_ticks=_number(str(pid), "ticks"))

    @activity.defn
    async def await_workload_ready(self, request: AwaitReadyInput) -> None:
        await self._sleep("await_workload_ready")

    @activity.defn
    async def stop_workload(self, request: StopInput) -> None:
        await self._sleep("stop_workload")

    @activity.defn
    async def dump_checkpoint(self, request: DumpInput) -> None:
        await self._sleep("dump_checkpoint")

    @activity.defn
    async def write_sentinel(self, request: SentinelInput) -> None:
        await self._sleep("write_sentinel")

    @activity.defn
    async def commit_checkpoint(self, request: CommitInput) -> CommitResult:
        await self._sleep("commit_checkpoint")
        uri = f"file:///checkpoints/{request.checkpoint_id}/{request.version}"
        return CommitResult(storage_uri=uri, size_bytes=256 << 20)

    @activity.defn
    async def upload_version(self, request: UploadInput) -> UploadResult:
        raise StorageError("the scale bench has no remote storage: nothing is uploaded")

    @activity.defn
    async def discard_staging(self, request: DiscardInput) -> None:
        await self._sleep("discard_staging")

    @activity.defn
    async def release_version(self, request: ReleaseInput) -> None:
        """Never scheduled here: the scale bench's captures are not verified."""
        raise NotImplementedError("the scale bench does not verify captures")

    @activity.defn
    async def restore_checkpoint(self, request: RestoreInput) -> RestoredWorkload:
        info = activity.info()
        if request.checkpoint_id not in self._held:
            await self._sleep(MISSING)
            raise CheckpointNotFoundError(
                f"no version of checkpoint {request.checkpoint_id} on {info.task_queue}"
            )
        await self._sleep("restore_checkpoint")
        return RestoredWorkload(
            pid=_number(info.workflow_id, "pid"),
            version=request.version or f"standin-{request.checkpoint_id}",
            stage_seconds={"stand-in": self._durations.median("restore_checkpoint")},
        )

    def activities(self) -> list[Any]:
        return [
            self.launch_workload,
            self.await_workload_ready,
            self.stop_workload,
            self.dump_checkpoint,
            self.write_sentinel,
            self.commit_checkpoint,
            self.upload_version,
            self.discard_staging,
            self.restore_checkpoint,
        ]


def node_worker(client: Client, settings: Settings, node: str, stand_ins: NodeStandIns) -> Worker:
    """A simulated node: `RestoreWorkflow` and the stand-ins on the node's own queue, with
    the interceptors and limits of the real node worker (`workers.compose.node_worker`)."""
    return Worker(
        client,
        task_queue=node_task_queue(node),
        workflows=[RestoreWorkflow],
        activities=stand_ins.activities(),
        interceptors=interceptors(settings),
        max_concurrent_activities=settings.node.max_concurrent_activities,
        max_concurrent_activity_task_polls=settings.node.activity_pollers,
    )


Kind = Literal["capture", "restore"]


@dataclass
class Pipeline:
    kind: Kind
    name: str
    node: str
    checkpoint_id: str
    expected: str  # "<phase>:<reason>" the pipeline must end with
    outcome: str = ""
    published: str = ""  # what the control side published last
    submitted: float = 0.0  # wall clock, when the start was requested
    workflow_id: str = ""
    handle: WorkflowHandle[Any, Any] | None = None
    failure: str = ""  # the workflow's failure message, when it failed
    source: str = ""  # a restore: the capture just before it, which it restores
    # The cluster path: when (wall clock) the bench, playing the kubelet, made the change
    # that a workflow signal reports, by the signal's name.
    played: dict[str, float] = field(default_factory=dict)


@dataclass
class Plan:
    """N pipelines, captures and restores alternating, over M nodes round robin; a restore
    restores the capture just before it, on the same node."""

    run: str
    nodes: list[str]
    pipelines: list[Pipeline]
    held: set[str]

    @classmethod
    def make(cls, pipelines: int, nodes: int, fall_back_every: int, run: str) -> Plan:
        names = [f"node-{i:03d}" for i in range(nodes)]
        plan: list[Pipeline] = []
        captured: list[str] = []
        restores = 0
        for i in range(pipelines):
            node = names[(i // 2) % nodes]  # a capture, then a restore, on each node in turn
            if i % 2 == 0:
                name = f"scale-{run}-c{i:05d}"
                ckpt = checkpoint_id(_identity(name))
                captured.append(ckpt)
                plan.append(
                    Pipeline("capture", name, node, ckpt, f"{Phase.READY}:{Reason.CAPTURED}")
                )
                continue
            restores += 1
            name = f"scale-{run}-r{i:05d}"
            if fall_back_every and restores % fall_back_every == 0:
                ckpt = checkpoint_id(_identity(f"scale-{run}-missing-{i:05d}"))
                expected = f"{Phase.FELL_BACK}:{Reason.CHECKPOINT_NOT_FOUND}"
            else:
                ckpt, expected = captured[-1], f"{Phase.RESTORED}:{Reason.RESTORED}"
            source = plan[-1].name
            plan.append(Pipeline("restore", name, node, ckpt, expected, source=source))
        return cls(run=run, nodes=names, pipelines=plan, held=set(captured))


def _identity(name: str) -> CheckpointIdentity:
    return CheckpointIdentity(model=f"bench/{name}", backend_framework="vllm")


class Driver(Protocol):
    """How a level's pipelines are started and followed: local mode here, the cluster path
    in `bench.scale_cluster`."""

    async def run_one(self, pipeline: Pipeline, slots: asyncio.Semaphore) -> None:
        """Start `pipeline` while holding one of `slots`, wait for its end and record its
        outcome (the workflow's result) and what was published about it."""

    async def settle(self, pipelines: Sequence[Pipeline]) -> None:
        """After the level: check what can only be checked once it ended."""


async def workflow_outcome(pipeline: Pipeline, handle: WorkflowHandle[Any, Any]) -> str:
    """`<phase>:<reason>` of the pipeline's workflow, from its result."""
    try:
        await handle.result()
    except WorkflowFailureError as err:
        phase = Phase.FAILED if pipeline.kind == "capture" else Phase.FELL_BACK
        causes: list[str] = []
        cause: BaseException | None = err.cause
        while cause is not None:
            causes.append(str(cause))
            cause = cause.__cause__
        pipeline.failure = ": ".join(causes)
        return f"{phase}:{pipeline_failure(err).reason}"
    phase, reason = (
        (Phase.READY, Reason.CAPTURED)
        if pipeline.kind == "capture"
        else (Phase.RESTORED, Reason.RESTORED)
    )
    return f"{phase}:{reason}"


@dataclass
class LocalDriver:
    """Local mode: pipelines started with the CLI's own calls; status read from the control
    worker's state directory."""

    client: Client
    settings: Settings

    async def _start(self, pipeline: Pipeline) -> WorkflowHandle[Any, Any]:
        queue = self.settings.node.control_task_queue
        if pipeline.kind == "capture":
            workload = LocalWorkload(name=pipeline.name, command=("serve",), cwd="/")
            request = CaptureRequest.local(
                workload, _identity(pipeline.name), node=pipeline.node, control_task_queue=queue
            )
            return await start_capture(self.client, request)
        restore = RestoreRequest(
            name=pipeline.name,
            checkpoint_id=pipeline.checkpoint_id,
            node=pipeline.node,
            control_task_queue=queue,
        )
        return await start_restore(self.client, restore)

    async def run_one(self, pipeline: Pipeline, slots: asyncio.Semaphore) -> None:
        async with slots:
            pipeline.submitted = time.time()
            try:
                handle = await self._start(pipeline)
            except RPCError as err:  # the server refused or timed out the start: counted
                pipeline.outcome = pipeline.published = f"not started: {err}"
                return
            pipeline.handle, pipeline.workflow_id = handle, handle.id
            pipeline.outcome = await workflow_outcome(pipeline, handle)
        home = self.settings.home
        record = read_status(home, pipeline.kind, LOCAL_NAMESPACE, pipeline.name)
        pipeline.published = f"{record.phase}:{record.reason}" if record else "nothing published"

    async def settle(self, pipelines: Sequence[Pipeline]) -> None:
        pass


# --- CPU -------------------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User and system CPU of a process (all its threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / TICK, sum(values) / TICK


def listening_pid(port: int) -> int | None:
    """The PID of the process listening on TCP `port` (the dev server's), found through
    /proc/net/tcp{,6} and the processes' open sockets."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{parts[9]}]")
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                return pid
        except OSError:
            continue
    return None


@dataclass
class CpuMeter:
    """CPU of the named processes (by PID; None: not found) and of this process ("bench")
    over a level, and this process's event-loop lag (how late a 50 ms sleep wakes: the
    workers' own saturation shows there first)."""

    processes: dict[str, int | None]
    every: float = 0.05
    lags: list[float] = field(default_factory=list)
    wall: float = 0.0
    cpu: dict[str, float | None] = field(default_factory=dict)
    machine: float = 0.0

    @asynccontextmanager
    async def measure(self) -> Any:
        pids = {**self.processes, "bench": os.getpid()}
        start = time.monotonic()
        before = {name: process_cpu_seconds(pid) for name, pid in pids.items() if pid}
        busy0, total0 = machine_busy()
        sampler = asyncio.ensure_future(self._sample_lag())
        try:
            yield self
        finally:
            sampler.cancel()
            self.wall = time.monotonic() - start
            self.cpu = {
                name: process_cpu_seconds(pid) - before[name] if pid else None
                for name, pid in pids.items()
            }
            busy1, total1 = machine_busy()
            self.machine = (busy1 - busy0) / max(total1 - total0, 1e-9)

    async def _sample_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.every)
            self.lags.append(loop.time() - before - self.every)


# --- Histories ------------------------------------------------------------------------


@dataclass
class StepTiming:
    """An activity, or (`signal <name>`) a signal that reports what the bench played."""

    step: str
    queued: float  # scheduled → started (a signal: 0)
    # An activity: previous boundary → completed, less the stand-in's own time. A signal:
    # the bench's change (a pod created, its container made Ready) → the signal in history.
    added: float
    stand_in: float  # the stand-in's own time (0 for the real control steps)


@dataclass
class PipelineTiming:
    kind: Kind
    start: float  # start requested → the run's started event
    added: float  # the run's start → close, less every stand-in's own time
    steps: list[StepTiming]
    events: int  # history events of the run


def _seconds(event: Any) -> float:
    stamp = event.event_time
    return float(stamp.seconds) + stamp.nanos / 1e9


ENDED = {
    EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED: "activity_task_completed_event_attributes",
    EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED: "activity_task_failed_event_attributes",
    EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT: "activity_task_timed_out_event_attributes",
    EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED: "activity_task_canceled_event_attributes",
}


def pipeline_timing(
    pipeline: Pipeline, events: Sequence[Any], durations: Durations
) -> PipelineTiming:
    """Step timings of one run from its history events (server time)."""
    scheduled: dict[int, tuple[str, float]] = {}
    started: dict[int, float] = {}
    run_start = run_end = boundary = 0.0
    before_schedule: dict[int, float] = {}
    steps: list[StepTiming] = []
    for event in events:
        at, kind = _seconds(event), event.event_type
        if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            run_start = boundary = at
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            scheduled[event.event_id] = (name, at)
            before_schedule[event.event_id] = boundary
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            started[event.activity_task_started_event_attributes.scheduled_event_id] = at
        elif kind in ENDED:
            ref = getattr(event, ENDED[kind]).scheduled_event_id
            name, at_scheduled = scheduled[ref]
            own = 0.0
            if name not in CONTROL_STEPS:
                failed = kind != EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
                key = f"{name}/missing" if failed and f"{name}/missing" in MEDIANS else name
                own = durations.draw(pipeline.workflow_id, key)
            queued = started.get(ref, at) - at_scheduled
            steps.append(StepTiming(name, queued, at - before_schedule[ref] - own, own))
            boundary = at
        elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            signal = event.workflow_execution_signaled_event_attributes.signal_name
            if signal in pipeline.played:
                played = PLAYED.get(signal)
                own = durations.draw(pipeline.workflow_id, played) if played else 0.0
                added = at - pipeline.played[signal]
                steps.append(StepTiming(f"signal {signal}", 0.0, added, own))
            boundary = max(boundary, at)
        elif kind in (
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
        ):
            run_end = at
    total_own = sum(step.stand_in for step in steps)
    return PipelineTiming(
        kind=pipeline.kind,
        start=run_start - pipeline.submitted,
        added=run_end - run_start - total_own,
        steps=steps,
        events=len(events),
    )


async def read_timings(pipelines: Sequence[Pipeline], durations: Durations) -> list[PipelineTiming]:
    reads = asyncio.Semaphore(HISTORY_READS)

    async def one(pipeline: Pipeline) -> PipelineTiming:
        assert pipeline.handle is not None
        async with reads:
            history = await pipeline.handle.fetch_history()
        return pipeline_timing(pipeline, history.events, durations)

    return list(await asyncio.gather(*(one(p) for p in pipelines if p.handle is not None)))


# --- Temporal's actions ---------------------------------------------------------------

_ACTION = re.compile(r"^action\{([^}]*)\} (\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


async def temporal_actions(metrics_url: str) -> dict[str, float]:
    """The dev server's count of actions in namespace `default` by type (what Temporal
    Cloud bills and rate-limits: workflows started, activities scheduled, timers, signals,
    search attribute upserts), from its metrics; {} without a URL."""
    if not metrics_url:
        return {}

    def fetch() -> str:
        with urllib.request.urlopen(metrics_url, timeout=30) as answer:
            return str(answer.read().decode())

    counts: dict[str, float] = {}
    for line in (await asyncio.to_thread(fetch)).splitlines():
        found = _ACTION.match(line)
        labels = dict(_LABEL.findall(found[1])) if found else {}
        if found and labels.get("namespace") == "default":
            kind = labels.get("action_type", "?").removeprefix("command_").removeprefix("grpc_")
            counts[kind] = counts.get(kind, 0.0) + float(found[2])
    return counts


def actions_note(before: dict[str, float], after: dict[str, float], pipelines: int) -> str:
    spent = {kind: (n - before.get(kind, 0.0)) / pipelines for kind, n in after.items()}
    kinds = ", ".join(f"{kind} {n:.1f}" for kind, n in sorted(spent.items(), key=lambda i: -i[1]))
    return f"Temporal actions per pipeline: {sum(spent.values()):.1f} ({kinds})"


# --- Levels and the report ------------------------------------------------------------


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile (`share` in (0, 1])."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered), math.ceil(share * len(ordered))) - 1)]


@dataclass
class Spread:
    n: int
    p50: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(len(values), percentile(values, 0.5), percentile(values, 0.99))


@dataclass
class Level:
    in_flight: int
    pipelines: list[Pipeline]
    timings: list[PipelineTiming]
    wall: float
    cpu: dict[str, float | None]  # CPU seconds by process ("temporal", "bench", ...)
    machine_busy: float
    loop_lag: Spread
    notes: list[str] = field(default_factory=list)  # what else a mode measured, as lines

    @property
    def own_cpu(self) -> float:
        return self.cpu["bench"] or 0.0

    @property
    def server_cpu(self) -> float | None:
        """The Temporal dev server's."""
        return self.cpu.get("temporal")

    @property
    def rate(self) -> float:
        return len(self.pipelines) / self.wall

    @property
    def others_cpu(self) -> float:
        """CPU seconds the machine spent beyond the measured processes (other work)."""
        spent = self.machine_busy * (os.cpu_count() or 1) * self.wall
        return max(0.0, spent - sum(seconds or 0.0 for seconds in self.cpu.values()))

    @property
    def events_rate(self) -> float:
        """History events written per second, all runs of the level."""
        return sum(t.events for t in self.timings) / self.wall

    @property
    def unexpected(self) -> list[Pipeline]:
        return [p for p in self.pipelines if p.outcome != p.expected or p.published != p.expected]

    def steps(self) -> dict[str, tuple[Spread, Spread]]:
        """Per step: (queued, added) spreads."""
        by_step: dict[str, list[StepTiming]] = {}
        for timing in self.timings:
            for step in timing.steps:
                by_step.setdefault(step.step, []).append(step)
        return {
            name: (Spread.of([s.queued for s in found]), Spread.of([s.added for s in found]))
            for name, found in by_step.items()
        }

    def added(self, kind: Kind) -> Spread:
        return Spread.of([t.added for t in self.timings if t.kind == kind])

    def start(self) -> Spread:
        return Spread.of([t.start for t in self.timings])


async def run_level(
    driver: Driver,
    plan: Plan,
    durations: Durations,
    in_flight: int,
    processes: dict[str, int | None],
    *,
    temporal_metrics: str = "",
) -> Level:
    """`plan`'s pipelines through `driver`, at most `in_flight` at once; CPU of `processes`
    (name → PID) and of this one; Temporal's actions where its metrics are at hand."""
    slots = asyncio.Semaphore(in_flight)
    meter = CpuMeter(processes)
    actions = await temporal_actions(temporal_metrics)
    async with meter.measure():
        await asyncio.gather(*(driver.run_one(p, slots) for p in plan.pipelines))
    after = await temporal_actions(temporal_metrics)
    await driver.settle(plan.pipelines)
    timings = await read_timings(plan.pipelines, durations)
    level = Level(
        in_flight=in_flight,
        pipelines=plan.pipelines,
        timings=timings,
        wall=meter.wall,
        cpu=meter.cpu,
        machine_busy=meter.machine,
        loop_lag=Spread.of(meter.lags or [0.0]),
        notes=[actions_note(actions, after, len(plan.pipelines))] if after else [],
    )
    cpu = ", ".join(f"{n} {100 * (c or 0) / level.wall:.0f}%" for n, c in level.cpu.items())
    log.info(
        "%d in flight: %d pipelines in %.1f s, %.1f/s, %d unexpected; CPU %s, machine %.0f%%",
        in_flight,
        len(plan.pipelines),
        level.wall,
        level.rate,
        len(level.unexpected),
        cpu,
        100 * level.machine_busy,
    )
    return level


@asynccontextmanager
async def simulated_fleet(
    client: Client, settings: Settings, nodes: Sequence[str], stand_ins: NodeStandIns
) -> Any:
    """The real control worker and one stand-in node worker per node, all in this process."""
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(control_worker(client, settings))
        for node in nodes:
            await stack.enter_async_context(node_worker(client, settings, node, stand_ins))
        yield


async def run_levels(
    client: Client,
    settings: Settings,
    *,
    pipelines: int,
    nodes: int,
    levels: Sequence[int],
    durations: Durations,
    server_pid: int | None,
    fall_back_every: int = 10,
    temporal_metrics: str = "",
) -> list[Level]:
    """Each level runs `pipelines` fresh pipelines with at most `in_flight` at once, on one
    fleet of `nodes` simulated nodes."""
    plans = [Plan.make(pipelines, nodes, fall_back_every, run=uuid.uuid4().hex[:8]) for _ in levels]
    held = set().union(*(plan.held for plan in plans))
    stand_ins = NodeStandIns(durations, held)
    driver = LocalDriver(client, settings)
    results = []
    async with simulated_fleet(client, settings, plans[0].nodes, stand_ins):
        for plan, in_flight in zip(plans, levels, strict=True):
            processes = {"temporal": server_pid}
            results.append(
                await run_level(
                    driver, plan, durations, in_flight, processes, temporal_metrics=temporal_metrics
                )
            )
    return results


def _ms(spread: Spread) -> str:
    return f"{spread.p50 * 1000:7.1f} {spread.p99 * 1000:7.1f}"


def _cpu(seconds: float | None, wall: float, width: int) -> str:
    return f"{'?':>{width}}" if seconds is None else f"{100 * seconds / wall:{width - 1}.0f}%"


def report_lines(levels: Sequence[Level], nodes: int) -> Iterator[str]:
    cores = os.cpu_count() or 1
    yield (
        f"\n{len(levels[0].pipelines)} pipelines per level (captures and restores alternating) "
        f"on {nodes} simulated nodes; CPU as a share of one core ({cores} cores); ms p50 p99"
    )
    widths = {name: max(7, len(name)) for name in levels[0].cpu}
    yield (
        f"{'in flight':>9} {'wall s':>7} {'pipel./s':>8} {'events/s':>8} "
        + "".join(f"{name:>{width}} " for name, width in widths.items())
        + f"{'machine':>7} {'others':>7} {'start ms':>15} {'capture added':>15} "
        f"{'restore added':>15} "
        f"{'loop lag ms':>15} {'unexpected':>10}"
    )
    for level in levels:
        yield (
            f"{level.in_flight:>9} {level.wall:>7.1f} {level.rate:>8.1f} "
            f"{level.events_rate:>8.0f} "
            + "".join(f"{_cpu(level.cpu.get(n), level.wall, w)} " for n, w in widths.items())
            + f"{100 * level.machine_busy:6.0f}% {_cpu(level.others_cpu, level.wall, 7)} "
            f"{_ms(level.start())} "
            f"{_ms(level.added('capture'))} {_ms(level.added('restore'))} "
            f"{_ms(level.loop_lag)} {len(level.unexpected):>10}"
        )
    yield "\nCPU per pipeline, core-ms (what each process spent, over the pipelines it served)"
    for level in levels:
        spent = {**level.cpu, "others": level.others_cpu}
        shown = ", ".join(
            f"{name} {1000 * (seconds or 0.0) / len(level.pipelines):.0f}"
            for name, seconds in spent.items()
        )
        yield f"{level.in_flight:>9} in flight: {shown}"
    for level in levels:
        for note in level.notes:
            yield f"{level.in_flight:>9} in flight: {note}"
    yield "\nper step: queued (scheduled → started) and added (beyond the stand-in), ms p50 p99"
    names = {name: f"{name}{_marked(name)}" for name in levels[0].steps()}
    column = max(len(shown) for shown in names.values())
    header = " ".join(f"{f'{level.in_flight} in flight':>31}" for level in levels)
    yield f"{'step':<{column}} {header}"
    yield f"{'':<{column}} " + " ".join(f"{'queued':>15} {'added':>15}" for _ in levels)
    for name, shown in names.items():
        cells = []
        for level in levels:
            found = level.steps().get(name)
            cells.append(f"{_ms(found[0])} {_ms(found[1])}" if found else f"{'-':>31}")
        yield f"{shown:<{column}} " + " ".join(cells)
    rates = [level.rate for level in levels]
    for before, after in itertools.pairwise(levels):
        if after.rate < 1.1 * before.rate:
            yield (
                f"\nthroughput stops rising between {before.in_flight} and {after.in_flight} "
                f"in flight ({before.rate:.1f} → {after.rate:.1f} pipelines/s)"
            )
            break
    else:
        shown = ", ".join(f"{rate:.1f}" for rate in rates)
        yield f"\nthroughput still rising at {levels[-1].in_flight} in flight: {shown} pipelines/s"


def _marked(step: str) -> str:
    if step in CONTROL_STEPS:
        return " (real)"
    return " (watch)" if step.startswith("signal ") else ""


class TunedDevServer(DevServer):
    """`warmstart dev`'s dev server, with more dynamic config values when asked, and its
    metrics on `metrics_port` (0: a port of its choosing)."""

    def __init__(self, *, extra: Sequence[str] = (), metrics_port: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.extra, self.metrics_port = list(extra), metrics_port

    def command(self) -> list[str]:
        dynamic = [a for v in self.extra for a in ("--dynamic-config-value", v)]
        metrics = ["--metrics-port", str(self.metrics_port)] if self.metrics_port else []
        return super().command() + dynamic + metrics


async def main(args: argparse.Namespace) -> None:
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in ("bench", __name__):  # a line as each level ends (__main__ when run so)
        logging.getLogger(name).setLevel(logging.INFO)
    # The planned CheckpointNotFound answers would each log a traceback.
    logging.getLogger("temporalio.activity").setLevel(logging.ERROR)
    levels = [int(level) for level in args.in_flight.split(",")]
    durations = Durations(warm_up=args.warm_up)
    with tempfile.TemporaryDirectory(dir=args.db_dir) as tmp:
        port, metrics_port = free_port(), free_port()
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        settings = Settings(
            home=Path(tmp) / "home",
            temporal=TemporalSettings(address=f"127.0.0.1:{port}"),
            node=NodeSettings(name="bench-control"),
        )
        server = TunedDevServer(
            db_file=Path(tmp) / "temporal.db",
            port=port,
            ui_port=free_port(),
            headless=True,
            extra=args.dynamic_config,
            metrics_port=metrics_port,
        )
        await server.start()
        try:
            client = await connect(settings, wait_seconds=30)
            if args.api == "none":
                results = await run_levels(
                    client,
                    settings,
                    pipelines=args.pipelines,
                    nodes=args.nodes,
                    levels=levels,
                    durations=durations,
                    server_pid=listening_pid(port),
                    fall_back_every=args.fall_back_every,
                    temporal_metrics=metrics,
                )
            else:
                from bench.scale_cluster import api_server, run_cluster_levels

                async with api_server(args.api) as api:
                    results = await run_cluster_levels(
                        client,
                        settings,
                        api,
                        pipelines=args.pipelines,
                        nodes=args.nodes,
                        levels=levels,
                        durations=durations,
                        server_pid=listening_pid(port),
                        folder=Path(tmp),
                        fall_back_every=args.fall_back_every,
                        temporal_metrics=metrics,
                    )
        finally:
            await server.stop()
    for line in report_lines(results, args.nodes):
        print(line)
    wrong = [p for level in results for p in level.unexpected]
    for pipeline in wrong[:10]:
        print(
            f"UNEXPECTED {pipeline.name}: {pipeline.outcome} / {pipeline.published}"
            + (f" ({pipeline.failure})" if pipeline.failure else "")
        )
    if wrong:
        sys.exit(f"{len(wrong)} pipelines did not end as expected")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", type=int, default=1000, help="per level")
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--in-flight", default="50,200,1000", help="levels, comma-separated")
    parser.add_argument("--warm-up", type=float, default=1.0, help="stand-in warm-up, s")
    parser.add_argument("--fall-back-every", type=int, default=10, help="0: none")
    parser.add_argument(
        "--api",
        choices=("none", "kmock", "apiserver"),
        default="none",
        help="none: local mode; kmock or apiserver (the real kube-apiserver, root): the "
        "cluster path through that API server (bench/scale_cluster.py)",
    )
    parser.add_argument(
        "--dynamic-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another dynamic config value for the dev server (repeatable)",
    )
    parser.add_argument(
        "--db-dir",
        default=None,
        help="where the dev server's SQLite file and the control side's state go "
        "(default: the temporary directory; /dev/shm takes the disk out)",
    )
    asyncio.run(main(parser.parse_args()))
