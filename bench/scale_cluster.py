"""Scale on the cluster path (`bench.scale --api kmock|apiserver`): the pipelines of
`bench.scale`'s plan, started and followed through an API server as on a cluster.

Real: the API server (kmock's emulator in a process of its own, `bench.kmock_server`, with
selectors honoured; or a real kube-apiserver 1.20 on etcd, `tests.apiserver`), the
controller as `warmstart controller` runs it (its own process: the kopf watcher under its
Lease starts a `CaptureWorkflow` per Checkpoint and signals it from the capture pod's
changes; the cluster control worker claims checkpoint IDs with Leases, creates the capture
Job, publishes status and Events on the Checkpoint and on restore-target pods), the dev
server and the workflows. Each simulated node runs, in this process, a real worker on its
own queue with `RestoreWorkflow` and the node's own watch of its restore targets
(`workers.restore_targets.RestoreTargetWatch`: field selector `spec.nodeName`, the
Checkpoint read, the eager start). Only the node's container steps are stand-ins
(`ContainerStandIns`, sleeping around `bench.scale.MEDIANS`):

- `dump_container`, 340 ms: "Cluster capture of a real containerd container", the dump step
  0.44 s less about 0.1 s of the pipeline's own round trip (CRIU with the container's
  options and its rootfs diff, a 4 MiB-state workload).
- `commit_container`, 200 ms: the commit step there (0.195-0.213 s).
- `write_container_sentinel`, 5 ms: a file written and renamed.
- `restore_container`, 240 ms: "Cluster restore into a pod's standby container": the
  standby's start (about 100 ms, `await-standby`) and the raw CRIU restore (131 ms p50),
  verify, gate and prepare (under 10 ms); 5 ms to answer `CheckpointNotFound`.

The bench plays what a cluster's other parts do, through the API server (`PlayedCluster`):
the Job controller and the scheduler (each capture Job's pod, labelled as its template says,
bound to the pipeline's node), the kubelet (the target container Ready after the workload's
warm-up, `--warm-up`, drawn as in local mode), the webhook (restore-target pods shaped by
`api.restore_pods.restore_pod`) and the user (a Checkpoint created; a restore-target pod
created once the Checkpoint it names is Ready; both awaited through watches). Not played:
the pod's exit after `snapshot-complete` and the Job's completion (about three more writes
per capture from the kubelet and the Job controller that a real cluster would add).

Each level runs in a namespace of its own. A restore restores the capture just before it
(its pod names that Checkpoint), so it starts once that capture is Ready; every
`--fall-back-every`-th restore finds its node without that checkpoint (`CheckpointNotFound`)
and must fall back. Outcomes are each workflow's result and what the control side published
on the API server: the Checkpoint's phase and Ready condition, the pod's
`warmstart.dev/restore-status`, and their Events.

Timings as in local mode, from the histories; in addition a signal of the capture's pod is a
step (`signal pod_scheduled`, `signal container_ready`): from the bench's write (the pod
created bound to its node, its container made Ready) to the signal in the history, that is
the API server, the watcher and the signal. A capture's added time leaves out its warm-up.
"start" is the Checkpoint's (or the pod's) create to the workflow's start. CPU: the dev
server, the API server (kube-apiserver and etcd, or kmock's process), the controller's
process, and this one (the simulated nodes and the played parts).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import re
import ssl
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client as kube
from kubernetes.client.exceptions import ApiException
from temporalio import activity
from temporalio.client import Client

from activities.contracts import (
    CommitResult,
    ContainerCommitInput,
    ContainerDumpInput,
    ContainerRestoreInput,
    ContainerSentinelInput,
    ContainerTarget,
    GmsSavedInput,
    RestoredContainer,
)
from activities.kube.client import api_client, configuration
from activities.kube.watch import Watch, WatchEvent
from activities.steps import ContainerSteps
from api.errors import CheckpointNotFoundError, InvalidSpecError
from api.naming import capture_workflow_id, restore_workflow_id
from api.reasons import Phase, Reason
from api.resources import (
    CHECKPOINT_LABEL,
    CHECKPOINT_UID_LABEL,
    GROUP,
    TARGET_CONTAINER_ANNOTATION,
    VERSION,
)
from api.restore_claims import RESTORE_FROM_ANNOTATION
from api.restore_pods import RESTORE_STATUS_ANNOTATION, RESTORE_TARGET_LABEL, RestoreSettings
from api.restore_pods import restore_pod as shaped_restore_pod
from bench.scale import (
    Durations,
    Level,
    NodeStandIns,
    Pipeline,
    Plan,
    node_worker,
    run_level,
    workflow_outcome,
)
from tests.kube import Cluster
from workers.checkpoints import checkpoint_reader
from workers.restore_targets import RestoreTargetWatch
from workers.settings import ENV_PREFIX, KubeSettings, Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
CONTROLLER_NAMESPACE = "warmstart-system"  # its Leases (KubeSettings.namespace)
IMAGE = "bench/workload:1"
READ_SECONDS = 10.0  # a node's Checkpoint read (the node worker's own figure)
EVENTS = {  # the Events a pipeline that ended as expected leaves, by expected phase
    Phase.READY: ("CaptureStarted", "CaptureSucceeded"),
    Phase.RESTORED: ("Restored",),
    Phase.FELL_BACK: ("RestoreFellBack",),
}


class ContainerStandIns(NodeStandIns, ContainerSteps):
    """Stand-ins of a cluster node's container steps under the declared names (what
    `workers.compose._container_activities` registers there), plus the storage steps a
    capture's cleanup may take. `held`: the checkpoint IDs every node holds."""

    @activity.defn
    async def await_gms_saved(self, request: GmsSavedInput) -> None:
        raise InvalidSpecError("the scale bench's Checkpoints have no GPU Memory Service")

    @activity.defn
    async def dump_container(self, request: ContainerDumpInput) -> None:
        await self._sleep("dump_container")

    @activity.defn
    async def commit_container(self, request: ContainerCommitInput) -> CommitResult:
        await self._sleep("commit_container")
        where = f"{request.checkpoint_id}/{request.version}"
        return CommitResult(
            storage_uri=f"file:///checkpoints/{where}",
            size_bytes=256 << 20,
            manifest_sha256=hashlib.sha256(where.encode()).hexdigest(),
        )

    @activity.defn
    async def write_container_sentinel(self, request: ContainerSentinelInput) -> None:
        await self._sleep("write_container_sentinel")

    @activity.defn
    async def stop_standby(self, request: ContainerTarget) -> None:
        raise InvalidSpecError("the scale bench's restore targets run warmstart's standby")

    @activity.defn
    async def restore_container(self, request: ContainerRestoreInput) -> RestoredContainer:
        info = activity.info()
        if request.checkpoint_id not in self._held:
            await self._sleep("restore_container/missing")
            raise CheckpointNotFoundError(
                f"no version of checkpoint {request.checkpoint_id} on {info.task_queue}"
            )
        await self._sleep("restore_container")
        return RestoredContainer(
            pid=100_000
            + int(hashlib.sha256((info.workflow_id or "").encode()).hexdigest()[:4], 16),
            namespace_pid=1,
            version=request.version,
            stage_seconds={"stand-in": self._durations.median("restore_container")},
        )

    def activities(self) -> list[Any]:
        return [
            self.await_gms_saved,
            self.dump_container,
            self.commit_container,
            self.write_container_sentinel,
            self.stop_standby,
            self.restore_container,
            self.upload_version,
            self.discard_staging,
        ]


def cluster_plan(plan: Plan) -> Plan:
    """`plan` as the cluster path runs it (in place): a restore-target pod names a Checkpoint,
    so a restore planned to fall back names the capture before it like the others, and no
    node holds that checkpoint."""
    captures = {p.name: p for p in plan.pipelines if p.kind == "capture"}
    for pipeline in plan.pipelines:
        if pipeline.kind == "restore" and pipeline.expected.startswith(Phase.FELL_BACK):
            pipeline.checkpoint_id = captures[pipeline.source].checkpoint_id
            plan.held.discard(pipeline.checkpoint_id)
    return plan


# --- The API server ----------------------------------------------------------------------

_SAMPLE = re.compile(r"^(\w+)\{([^}]*)\} (\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass
class Traffic:
    """What a real API server served, from its own metrics, by request kind ("LIST
    checkpoints", "PATCH pods/status"): requests, seconds spent answering (watches left
    out: they last as long as they are open), bytes answered; and watch events sent.
    kube-apiserver 1.20 counts a GET of one custom resource as a LIST (its audit log tells
    them apart): "LIST checkpoints" holds the Checkpoint reads too."""

    requests: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, float] = field(default_factory=dict)
    watch_events: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Traffic:
        traffic = cls()
        wanted = {
            "apiserver_request_total": traffic.requests,
            "apiserver_request_duration_seconds_sum": traffic.seconds,
            "apiserver_response_sizes_sum": traffic.bytes,
        }
        for line in text.splitlines():
            sample = _SAMPLE.match(line)
            if sample is None:
                continue
            name, labels, value = sample[1], dict(_LABEL.findall(sample[2])), float(sample[3])
            if name == "apiserver_watch_events_total":
                traffic.watch_events += value
            elif name in wanted and labels.get("verb") != "WATCH":
                sub = labels.get("subresource")
                key = f"{labels.get('verb')} {labels.get('resource')}{'/' + sub if sub else ''}"
                wanted[name][key] = wanted[name].get(key, 0.0) + value
        return traffic

    def __sub__(self, before: Traffic) -> Traffic:
        def less(now: dict[str, float], then: dict[str, float]) -> dict[str, float]:
            return {kind: value - then.get(kind, 0.0) for kind, value in now.items()}

        return Traffic(
            less(self.requests, before.requests),
            less(self.seconds, before.seconds),
            less(self.bytes, before.bytes),
            self.watch_events - before.watch_events,
        )

    def lines(self, pipelines: int, top: int = 6) -> list[str]:
        """Per pipeline: every request, then the kinds that took the most answering time."""
        each = 1 / pipelines
        slowest = sorted(self.seconds.items(), key=lambda item: -item[1])[:top]
        kinds = ", ".join(
            f"{kind} {self.requests.get(kind, 0) * each:.1f} ({1000 * seconds * each:.0f} ms, "
            f"{self.bytes.get(kind, 0) * each / 1024:.0f} KiB)"
            for kind, seconds in slowest
        )
        return [
            f"API server per pipeline: {sum(self.requests.values()) * each:.1f} requests, "
            f"{1000 * sum(self.seconds.values()) * each:.0f} ms answering them, "
            f"{sum(self.bytes.values()) * each / 1024:.0f} KiB answered, "
            f"{self.watch_events * each:.0f} watch events sent",
            f"API server per pipeline, by answering time: {kinds}",
        ]


@dataclass
class ApiServerRun:
    """The API server the bench drives: a client of its own (`cluster`), the one login the
    controller and the nodes use, and its processes by name (for the CPU columns)."""

    name: str
    cluster: Cluster
    login: KubeSettings
    processes: dict[str, int | None]
    # Whether namespaces are objects to create (not in kmock), with the `default` service
    # account a pod needs there (what the controller manager would create).
    namespaces: bool
    metrics_url: str = ""  # the API server's own metrics (kmock has none)
    token: str = ""

    async def traffic(self) -> Traffic | None:
        """What the API server served so far, from its metrics; None where it has none."""
        if not self.metrics_url:
            return None
        request = urllib.request.Request(
            self.metrics_url, headers={"Authorization": f"Bearer {self.token}"}
        )
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # self-signed

        def fetch() -> str:
            with urllib.request.urlopen(request, timeout=30, context=context) as answer:
                return str(answer.read().decode())

        return Traffic.parse(await asyncio.to_thread(fetch))

    async def add_namespace(self, name: str) -> None:
        if not self.namespaces:
            return
        core = self.cluster.core
        await self.cluster.run(core.create_namespace, {"metadata": {"name": name}})
        account = {"metadata": {"name": "default"}, "automountServiceAccountToken": False}
        await self.cluster.run(core.create_namespaced_service_account, name, account)


@contextlib.asynccontextmanager
async def kmock_server() -> AsyncIterator[ApiServerRun]:
    """kmock's emulator in its own process (`bench.kmock_server`)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.kmock_server",
        cwd=REPO,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        url = (await process.stdout.readline()).decode().strip()
        if not url:
            raise RuntimeError(f"bench.kmock_server did not start (exit {await process.wait()})")
        cluster = Cluster(None, url)
        try:
            login = KubeSettings(server=url, namespace=CONTROLLER_NAMESPACE)
            yield ApiServerRun("kmock", cluster, login, {"kmock": process.pid}, namespaces=False)
        finally:
            cluster.close()
    finally:
        await _stop(process, stdin=True)


@contextlib.asynccontextmanager
async def kube_apiserver() -> AsyncIterator[ApiServerRun]:
    """A real kube-apiserver on etcd (`tests.apiserver`), its CRDs installed."""
    from tests.apiserver import APISERVER_SKIP, installed, running_apiserver

    if APISERVER_SKIP is not None:
        raise RuntimeError(APISERVER_SKIP)
    running = contextlib.contextmanager(running_apiserver)()
    server = await asyncio.to_thread(running.__enter__)
    try:
        cluster = await installed(server, (CONTROLLER_NAMESPACE,))
        try:
            login = KubeSettings(
                server=server.url,
                token_file=str(server.token_file),
                insecure_skip_tls_verify=True,
                namespace=CONTROLLER_NAMESPACE,
            )
            assert server.process is not None and server.process.proc is not None
            processes = {"apiserver": server.process.proc.pid, "etcd": server.etcd_pid}
            yield ApiServerRun(
                "kube-apiserver",
                cluster,
                login,
                processes,
                namespaces=True,
                metrics_url=f"{server.url}/metrics",
                token=server.token,
            )
        finally:
            cluster.close()
    finally:
        await asyncio.to_thread(running.__exit__, None, None, None)


def api_server(kind: str) -> contextlib.AbstractAsyncContextManager[ApiServerRun]:
    """`kmock` or `apiserver` (the real kube-apiserver)."""
    return kmock_server() if kind == "kmock" else kube_apiserver()


async def _stop(process: asyncio.subprocess.Process, *, stdin: bool = False) -> None:
    """End a process of ours: close its standard input (it ends on that) or SIGTERM; after
    20 s SIGKILL; reap it."""
    if process.returncode is not None:
        return
    if stdin and process.stdin is not None:
        process.stdin.close()
    else:
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), 20)
    except TimeoutError:
        process.kill()
        await process.wait()


# --- The controller ----------------------------------------------------------------------


@dataclass
class ControllerProcess:
    """`warmstart controller` (control worker and watcher) in a process of its own."""

    process: asyncio.subprocess.Process
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.asynccontextmanager
async def controller_process(
    settings: Settings, login: KubeSettings, folder: Path
) -> AsyncIterator[ControllerProcess]:
    """The controller as a Deployment runs it, configured by `WARMSTART_*` variables: this
    Temporal server and control queue, this API server; the webhook's certificate is not
    its business here (no webhook runs)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
    env.update(
        {
            f"{ENV_PREFIX}HOME": str(folder / "controller"),
            f"{ENV_PREFIX}TEMPORAL__ADDRESS": settings.temporal.address,
            f"{ENV_PREFIX}NODE__CONTROL_TASK_QUEUE": settings.node.control_task_queue,
            f"{ENV_PREFIX}KUBE__SERVER": login.server,
            f"{ENV_PREFIX}KUBE__TOKEN_FILE": login.token_file,
            f"{ENV_PREFIX}KUBE__INSECURE_SKIP_TLS_VERIFY": str(login.insecure_skip_tls_verify),
            f"{ENV_PREFIX}KUBE__NAMESPACE": login.namespace,
            f"{ENV_PREFIX}CERTIFICATE__MANAGE": "false",
        }
    )
    log_path = folder / "controller.log"
    with log_path.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("warmstart")),
            "controller",
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        yield ControllerProcess(process, log_path)
    finally:
        await _stop(process)


# --- The simulated nodes -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def simulated_nodes(
    client: Client,
    settings: Settings,
    nodes: Sequence[str],
    stand_ins: ContainerStandIns,
    login: KubeSettings,
) -> AsyncIterator[None]:
    """Per node: a worker on its queue with `RestoreWorkflow` and the stand-ins, and the
    node's watch of its restore targets, which starts their restores on that worker."""
    api = api_client(login)
    read = checkpoint_reader(kube.CustomObjectsApi(api), timeout_seconds=READ_SECONDS)
    watches = [
        RestoreTargetWatch(
            configuration=configuration(login),
            client=client,
            node=node,
            control_task_queue=settings.node.control_task_queue,
            deadline_seconds=settings.node.restore_deadline_seconds,
            read_checkpoint=read,
        )
        for node in nodes
    ]
    stop = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        for node in nodes:
            await stack.enter_async_context(node_worker(client, settings, node, stand_ins))
        running = [asyncio.create_task(watch.run(stop)) for watch in watches]
        try:
            await _until(lambda: all(w.health.state == "watching" for w in watches), "nodes")
            yield
        finally:
            stop.set()
            await asyncio.gather(*running, return_exceptions=True)
            api.close()  # type: ignore[no-untyped-call]


# --- What the bench plays ----------------------------------------------------------------


class PlayedCluster:
    """The parts of a cluster the bench plays, through the API server: the Job controller and
    the scheduler, the kubelet, the webhook's shaping and the user who waits."""

    def __init__(self, api: ApiServerRun, durations: Durations) -> None:
        self.api = api
        self._cluster, self._durations = api.cluster, durations
        # Its own threads: its calls must not queue behind the nodes' in the default pool.
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="played")
        self._pipelines: dict[str, tuple[str, Pipeline]] = {}  # name → (namespace, pipeline)
        self._ended: dict[str, asyncio.Future[dict[str, Any]]] = {}  # Checkpoints
        self._told: dict[str, asyncio.Future[str]] = {}  # restore-target pods
        self._jobs: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        watched = configuration(api.login)
        self._watches = [
            Watch(
                watched,
                path=f"/apis/{GROUP}/{VERSION}/checkpoints",
                kind="Checkpoints (the user)",
                handler=self._on_checkpoint,
            ),
            Watch(
                watched,
                path="/apis/batch/v1/jobs",
                kind="capture Jobs (the Job controller)",
                handler=self._on_job,
                label_selector=CHECKPOINT_LABEL,
            ),
            Watch(
                watched,
                path="/api/v1/pods",
                kind="restore targets (the user)",
                handler=self._on_restore_target,
                label_selector=f"{RESTORE_TARGET_LABEL}=true",
            ),
        ]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[PlayedCluster]:
        stop = asyncio.Event()
        watching = [asyncio.create_task(watch.run(stop)) for watch in self._watches]
        try:
            await _until(lambda: all(w.health.state == "watching" for w in self._watches), "bench")
            yield self
        finally:
            stop.set()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*watching, *self._tasks, return_exceptions=True)
            self._pool.shutdown()

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def expect(self, plan: Plan, namespace: str) -> None:
        loop = asyncio.get_running_loop()
        for pipeline in plan.pipelines:
            self._pipelines[pipeline.name] = (namespace, pipeline)
            futures: dict[str, Any] = self._ended if pipeline.kind == "capture" else self._told
            futures[pipeline.name] = loop.create_future()

    def namespace(self, pipeline: Pipeline) -> str:
        return self._pipelines[pipeline.name][0]

    # --- the user ----------------------------------------------------------------------

    async def create_checkpoint(self, pipeline: Pipeline) -> str:
        """The pipeline's Checkpoint; its UID."""
        namespace = self.namespace(pipeline)
        container = {"name": "main", "image": IMAGE, "command": ["serve"]}
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Checkpoint",
            "metadata": {"name": pipeline.name, "namespace": namespace},
            "spec": {
                "identity": {"model": f"bench/{pipeline.name}", "backendFramework": "vllm"},
                "job": {"podTemplateSpec": {"spec": {"containers": [container]}}},
            },
        }
        custom, where = self._cluster.custom, (GROUP, VERSION, namespace, "checkpoints")
        created: Any = await self.call(custom.create_namespaced_custom_object, *where, body)
        if not isinstance(created, dict):  # kmock answers 200, for which the client has None
            created = await self.call(custom.get_namespaced_custom_object, *where, pipeline.name)
        return str(created["metadata"]["uid"])

    async def ended(self, name: str) -> dict[str, Any]:
        """The Checkpoint `name` once Ready or Failed."""
        return await self._ended[name]

    async def create_restore_target(self, pipeline: Pipeline, source: dict[str, Any]) -> Any:
        """The pipeline's pod, asking to be restored from `source` (its Checkpoint, Ready),
        shaped as the webhook shapes it and bound to the pipeline's node; the created pod."""
        namespace = self.namespace(pipeline)
        asked = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pipeline.name,
                "namespace": namespace,
                "annotations": {RESTORE_FROM_ANNOTATION: pipeline.source},
            },
            "spec": {"containers": [{"name": "main", "image": IMAGE, "command": ["serve"]}]},
        }
        pod = shaped_restore_pod(asked, checkpoint=source, settings=RestoreSettings())
        pod["metadata"]["namespace"], pod["spec"]["nodeName"] = namespace, pipeline.node
        return await self.call(self._cluster.core.create_namespaced_pod, namespace, pod)

    async def told(self, name: str) -> str:
        """The restore-status the restore-target pod `name` was given."""
        return await self._told[name]

    async def events(self, namespace: str) -> dict[str, set[str]]:
        """The reasons of the Events of `namespace`, by the name of what they regard."""
        listed = await self.call(self._cluster.events.list_namespaced_event, namespace)
        found: dict[str, set[str]] = {}
        for event in listed.items:
            if event.regarding is not None and event.regarding.name and event.reason:
                found.setdefault(event.regarding.name, set()).add(event.reason)
        return found

    async def _on_checkpoint(self, event: WatchEvent) -> None:
        name = (event.object.get("metadata") or {}).get("name", "")
        phase = (event.object.get("status") or {}).get("phase")
        future = self._ended.get(name)
        if future is not None and not future.done() and phase in (Phase.READY, Phase.FAILED):
            future.set_result(dict(event.object))

    async def _on_restore_target(self, event: WatchEvent) -> None:
        meta = event.object.get("metadata") or {}
        told = (meta.get("annotations") or {}).get(RESTORE_STATUS_ANNOTATION)
        future = self._told.get(meta.get("name", ""))
        if told is not None and future is not None and not future.done():
            future.set_result(told)

    # --- the Job controller, the scheduler and the kubelet -----------------------------

    async def _on_job(self, event: WatchEvent) -> None:
        meta = event.object.get("metadata") or {}
        found = self._pipelines.get((meta.get("labels") or {}).get(CHECKPOINT_LABEL, ""))
        if event.type != "ADDED" or found is None or meta.get("uid") in self._jobs:
            return
        self._jobs.add(meta.get("uid", ""))
        task = asyncio.create_task(self._run_capture_pod(found[1], dict(event.object)))
        self._tasks.add(task)
        task.add_done_callback(self._ran)

    def _ran(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a capture pod was not played", exc_info=task.exception())

    async def _run_capture_pod(self, pipeline: Pipeline, job: dict[str, Any]) -> None:
        """The Job's pod, bound to the pipeline's node (the Job controller and the scheduler
        in one write); once the workload warmed up, its target container Ready (the
        kubelet). Both moments are recorded: the capture's signals report them."""
        meta, template = job["metadata"], job["spec"]["template"]
        namespace, labels = meta["namespace"], template["metadata"]["labels"]
        name = f"{meta['name']}-{uuid.uuid4().hex[:5]}"
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                **template["metadata"],
                "name": name,
                "namespace": namespace,
                "labels": {**labels, "job-name": meta["name"]},
            },
            "spec": {**template["spec"], "nodeName": pipeline.node},
        }
        workflow_id = capture_workflow_id(
            namespace=namespace, name=labels[CHECKPOINT_LABEL], key=labels[CHECKPOINT_UID_LABEL]
        )
        warm_up = self._durations.draw(workflow_id, "await_workload_ready")
        core = self._cluster.core
        pipeline.played["pod_scheduled"] = bound = time.time()
        await self.call(core.create_namespaced_pod, namespace, pod)
        await asyncio.sleep(max(0.0, bound + warm_up - time.time()))
        target = (template["metadata"].get("annotations") or {}).get(
            TARGET_CONTAINER_ANNOTATION, "main"
        )
        status = {
            "name": target,
            "ready": True,
            "started": True,
            "state": {"running": {}},
            "image": IMAGE,
            "imageID": "",
            "restartCount": 0,
            "containerID": f"containerd://{uuid.uuid4().hex}",
        }
        pipeline.played["container_ready"] = time.time()
        body = {"status": {"phase": "Running", "containerStatuses": [status]}}
        await self.call(core.patch_namespaced_pod_status, name, namespace, body)


# --- Pipelines ---------------------------------------------------------------------------


@dataclass
class ClusterDriver:
    """Pipelines through the API server: a capture is a Checkpoint created, a restore a
    restore-target pod created once its Checkpoint is Ready."""

    client: Client
    played: PlayedCluster
    deadline_seconds: float = 900.0  # for a pipeline's end, from its create

    async def run_one(self, pipeline: Pipeline, slots: asyncio.Semaphore) -> None:
        try:
            if pipeline.kind == "capture":
                await self._capture(pipeline, slots)
            else:
                await self._restore(pipeline, slots)
        except ApiException as err:  # the API server refused the create: counted
            pipeline.outcome = pipeline.published = f"not created: {err.status} {err.reason}"
        except TimeoutError:
            pipeline.outcome = pipeline.outcome or f"no end in {self.deadline_seconds:g} s"
            pipeline.published = pipeline.published or pipeline.outcome

    async def _capture(self, pipeline: Pipeline, slots: asyncio.Semaphore) -> None:
        async with slots:
            pipeline.submitted = time.time()
            uid = await self.played.create_checkpoint(pipeline)
            namespace = self.played.namespace(pipeline)
            pipeline.workflow_id = capture_workflow_id(
                namespace=namespace, name=pipeline.name, key=uid
            )
            ended = await asyncio.wait_for(self.played.ended(pipeline.name), self.deadline_seconds)
            pipeline.handle = self.client.get_workflow_handle(pipeline.workflow_id)
            pipeline.outcome = await workflow_outcome(pipeline, pipeline.handle)
        status = ended.get("status") or {}
        ready = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
        pipeline.published = f"{status.get('phase')}:{ready[0].get('reason') if ready else ''}"

    async def _restore(self, pipeline: Pipeline, slots: asyncio.Semaphore) -> None:
        source = await asyncio.wait_for(self.played.ended(pipeline.source), self.deadline_seconds)
        phase = (source.get("status") or {}).get("phase")
        if phase != Phase.READY:
            pipeline.outcome = pipeline.published = f"not started: {pipeline.source} {phase}"
            return
        async with slots:
            pipeline.submitted = time.time()
            pod = await self.played.create_restore_target(pipeline, source)
            namespace = self.played.namespace(pipeline)
            pipeline.workflow_id = restore_workflow_id(
                namespace=namespace, name=pipeline.name, key=pod.metadata.uid
            )
            told = await asyncio.wait_for(self.played.told(pipeline.name), self.deadline_seconds)
            pipeline.handle = self.client.get_workflow_handle(pipeline.workflow_id)
            pipeline.outcome = await workflow_outcome(pipeline, pipeline.handle)
        if told == "restored":
            pipeline.published = f"{Phase.RESTORED}:{Reason.RESTORED}"
        elif told.startswith("fell-back: "):
            pipeline.published = f"{Phase.FELL_BACK}:{told.split(': ')[1]}"
        else:
            pipeline.published = told

    async def settle(self, pipelines: Sequence[Pipeline]) -> None:
        """Each pipeline's Events: one it should have left and did not is noted on what it
        published (and so makes it unexpected)."""
        namespaces = {self.played.namespace(p) for p in pipelines}
        found: dict[str, set[str]] = {}
        for namespace in namespaces:
            found.update(await self.played.events(namespace))
        for pipeline in pipelines:
            wanted = EVENTS.get(Phase(pipeline.expected.split(":")[0]), ())
            missing = [r for r in wanted if r not in found.get(pipeline.name, set())]
            if missing and pipeline.published == pipeline.expected:
                pipeline.published += f" (no {', '.join(missing)} Event)"


async def run_cluster_levels(
    client: Client,
    settings: Settings,
    api: ApiServerRun,
    *,
    pipelines: int,
    nodes: int,
    levels: Sequence[int],
    durations: Durations,
    server_pid: int | None,
    folder: Path,
    fall_back_every: int = 10,
    temporal_metrics: str = "",
) -> list[Level]:
    """Each level runs `pipelines` fresh pipelines, in a namespace of their own, with at
    most `in_flight` at once, on one fleet of `nodes` simulated nodes. A warm-up pair (a
    capture and its restore, not measured) first shows that the controller is up."""
    run = uuid.uuid4().hex[:6]
    warm_up = cluster_plan(Plan.make(2, nodes, 0, run=f"{run}w"))
    plans = [
        cluster_plan(Plan.make(pipelines, nodes, fall_back_every, run=f"{run}{i}"))
        for i in range(len(levels))
    ]
    held = set().union(*(plan.held for plan in [warm_up, *plans]))
    stand_ins = ContainerStandIns(durations, held)
    played = PlayedCluster(api, durations)
    async with (
        controller_process(settings, api.login, folder) as controller,
        simulated_nodes(client, settings, warm_up.nodes, stand_ins, api.login),
        played.running(),
    ):
        driver = ClusterDriver(client, played)
        await _warm_up(driver, warm_up, controller)
        processes = {"temporal": server_pid, **api.processes, "controller": controller.pid}
        results = []
        for plan, in_flight in zip(plans, levels, strict=True):
            namespace = f"scale-{plan.run}"
            await api.add_namespace(namespace)
            played.expect(plan, namespace)
            before = await api.traffic()
            level = await run_level(
                driver, plan, durations, in_flight, processes, temporal_metrics=temporal_metrics
            )
            after = await api.traffic()
            if before is not None and after is not None:
                for line in (after - before).lines(len(plan.pipelines)):
                    log.info("%d in flight: %s", in_flight, line)
                    level.notes.append(line)
            results.append(level)
    return results


async def _warm_up(driver: ClusterDriver, plan: Plan, controller: ControllerProcess) -> None:
    namespace = f"scale-{plan.run}"
    await driver.played.api.add_namespace(namespace)
    driver.played.expect(plan, namespace)
    slots = asyncio.Semaphore(len(plan.pipelines))
    warming = ClusterDriver(driver.client, driver.played, deadline_seconds=60)
    await asyncio.gather(*(warming.run_one(p, slots) for p in plan.pipelines))
    wrong = [
        f"{p.name}: {p.outcome} / {p.published}" for p in plan.pipelines if p.outcome != p.expected
    ]
    if wrong:
        alive = "running" if controller.process.returncode is None else "exited"
        raise RuntimeError(
            f"the warm-up pair did not end as expected ({'; '.join(wrong)}); the controller "
            f"({alive}) logged:\n{controller.tail()}"
        )


async def _until(done: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Wait, with a deadline, until `done()` (watches of `what` have begun)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the watches of the {what} did not begin in {timeout:g} s")
        await asyncio.sleep(0.05)
