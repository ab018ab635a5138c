"""The watcher: kopf handlers over Checkpoint and PodSnapshot resources and capture pods.

It stays thin. It starts the capture workflow of a resource (ID
`capture/<namespace>/<name>/<uid>`, conflict policy USE_EXISTING, a closed one never run
again), keeps a Checkpoint's Temporal Schedule in step with its `spec.schedule`, starts a
run on demand when the `capture-now` annotation changes (later runs, decision 0043:
`workers.capture_triggers`), turns what it sees of a capture pod (scheduled on a node,
target container Ready, a container failed) into signals to the run that made the pod
(and so what a verified capture's verification pod says: decision 0045),
and on deletion cancels every run and deletes the Schedule, holding the resource with the
finalizer `warmstart.dev/cleanup` until the runs have cleaned up. Everything else — the
Job, status, Events, the dump — is the workflows'.

kopf runs standalone (no kopf peering) in its own thread and event loop, under the Lease
elector of `workers.leader`, so one replica is active. It logs in with the one login of
every other Kubernetes call (`activities.kube.client.configuration`): its login handler
builds kopf's ConnectionInfo from the same settings and credentials, afresh each time kopf
asks (after a 401: a rotated token is read again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import kopf
from pydantic import ValidationError
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from activities.contracts import PodObservation, ResourceRef, VerificationObservation
from activities.kube.client import Login, authorization, configuration
from activities.kube.control import verification_observation
from api.naming import CAPTURE_WORKFLOW, capture_schedule_id, capture_workflow_id, is_run_of
from api.reasons import Phase
from api.resources import (
    CAPTURE_NOW_ANNOTATION,
    CAPTURE_WORKFLOW_ANNOTATION,
    CHECKPOINT_ID_LABEL,
    CHECKPOINT_LABEL,
    CHECKPOINT_UID_LABEL,
    CLEANUP_FINALIZER,
    GROUP,
    IDENTITY_IMMUTABLE,
    TARGET_CONTAINER_ANNOTATION,
    VERIFICATION_LABEL,
    VERSION,
    Checkpoint,
    PodSnapshot,
)
from api.storage import RemoteStorage, resource_storage
from workers.capture_triggers import capture_now, delete_capture_schedule, ensure_capture_schedule
from workers.drain import register_drain
from workers.operations import start_capture
from workers.settings import KubeSettings
from workflows import visibility
from workflows.capture import CaptureWorkflow
from workflows.contracts import CaptureRequest, ClusterCapture, ClusterTarget

# Signals of the capture workflow (its @workflow.signal names).
# The capture's pod signals, sent by reference to CaptureWorkflow's methods; their names are
# what `signals_for` lists and what the watcher remembers having sent.
_SIGNALS = {
    method.__name__: method
    for method in (
        CaptureWorkflow.pod_scheduled,
        CaptureWorkflow.container_ready,
        CaptureWorkflow.pod_failed,
    )
}
POD_SCHEDULED, CONTAINER_READY, POD_FAILED = _SIGNALS
_FINISHED = {Phase.READY.value, Phase.FAILED.value}
_CANCEL_WAIT_SECONDS = 30.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatcherSettings:
    control_task_queue: str
    # The one login (API server, token file, TLS); no server: the service account, else
    # the kubeconfig.
    kube: Login = field(default_factory=KubeSettings)
    read_every_seconds: float = 30.0
    # How long a node step may wait for the pod's node worker before the node counts as lost.
    node_timeout_seconds: float = 120.0
    # Where captures go when a resource names no storage (None: the nodes' checkpoint root).
    storage: RemoteStorage | None = None


def connection_info(login: Login) -> kopf.ConnectionInfo:
    """kopf's credentials: those of the one login, as the `kubernetes` client has them."""
    kube = configuration(login)
    scheme, _, token = authorization(kube).partition(" ")
    return kopf.ConnectionInfo(
        server=kube.host,
        ca_path=kube.ssl_ca_cert or None,
        insecure=not kube.verify_ssl,
        scheme=scheme or None,
        token=token or None,
        certificate_path=kube.cert_file or None,
        private_key_path=kube.key_file or None,
    )


def capture_request(
    resource: Checkpoint | PodSnapshot, settings: WatcherSettings
) -> CaptureRequest:
    """The capture workflow's request for a resource."""
    meta = resource.metadata
    ref = ResourceRef.model_validate(
        {"kind": resource.kind, "namespace": meta.namespace, "name": meta.name, "uid": meta.uid}
    )
    gms = resource.spec.gpu_memory_service.enabled
    prefetch = resource.spec.prefetch if isinstance(resource, Checkpoint) else None
    if isinstance(resource, Checkpoint):
        job = resource.spec.job
        target = ClusterTarget(
            container=job.target_container_name,
            gms=gms,
            deadline_seconds=job.active_deadline_seconds,
            read_every_seconds=settings.read_every_seconds,
        )
        identity = resource.spec.identity
    else:
        pod = resource.spec.source.pod_ref
        target = ClusterTarget(
            container=pod.containers[0],
            pod_name=pod.name,
            pod_uid=pod.uid,
            gms=gms,
            read_every_seconds=settings.read_every_seconds,
        )
        identity = resource.spec.identity or _pod_identity(pod.uid, pod.containers[0])
    return CaptureRequest(
        namespace=meta.namespace,
        name=meta.name,
        identity=identity,
        checkpoint_id=resource.checkpoint_id,
        node="",
        source=ClusterCapture(resource=ref, target=target),
        control_task_queue=settings.control_task_queue,
        node_timeout_seconds=settings.node_timeout_seconds,
        storage=resource_storage(
            resource.spec.storage, namespace=meta.namespace, default=settings.storage
        ),
        prefetch_node_selectors=prefetch.node_selectors if prefetch is not None else [],
        prefetch_nodes_at_once=prefetch.nodes_at_once if prefetch is not None else 0,
        **_verified(resource),
    )


def _verified(resource: Checkpoint | PodSnapshot) -> dict[str, Any]:
    """A verified Checkpoint's request fields (decision 0045); none otherwise, so a request
    without verify is what it was before."""
    if not isinstance(resource, Checkpoint) or not resource.spec.verify:
        return {}
    return {"verify": True, "verify_answer_seconds": resource.spec.verify_timeout_seconds}


def _pod_identity(pod_uid: str, container: str) -> Any:
    """A PodSnapshot without identity is recorded under its pod (the ID hashes the pod)."""
    from api.identity import CheckpointIdentity

    return CheckpointIdentity(
        model=f"pod/{pod_uid}/{container}",
        backend_framework="vllm",
        extra_parameters={"podUID": pod_uid, "container": container},
    )


def observe(pod: dict[str, Any]) -> PodObservation:
    """What a capture pod says about its target container (the one its annotation names)."""
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    target = (meta.get("annotations") or {}).get(TARGET_CONTAINER_ANNOTATION, "main")
    ready, failure = False, ""
    for container in [
        *status.get("initContainerStatuses", []),
        *status.get("containerStatuses", []),
    ]:
        if container.get("name") == target:
            ready = bool(container.get("ready"))
        terminated = (container.get("state") or {}).get("terminated") or {}
        code = terminated.get("exitCode")
        if code not in (None, 0):
            reason = terminated.get("reason") or "Error"
            failure = f"container {container.get('name')} exited with code {code} ({reason})"
    if status.get("phase") == "Failed" and not failure:
        failure = f"pod {meta.get('name')} failed: {status.get('reason') or 'unknown reason'}"
    return PodObservation(
        pod_name=meta.get("name", ""),
        pod_uid=meta.get("uid", ""),
        node_name=spec.get("nodeName") or "",
        container_ready=ready,
        failure=failure,
    )


def signals_for(seen: PodObservation) -> list[str]:
    """The signals an observation is worth, in the order the workflow awaits them."""
    out = []
    if seen.node_name:
        out.append(POD_SCHEDULED)
    if seen.container_ready:
        out.append(CONTAINER_READY)
    if seen.failure:
        out.append(POD_FAILED)
    return out


def signalled_run(pod: dict[str, Any]) -> str:
    """The capture run a capture pod reports to: the one its annotation names, when that is
    a run of the resource its labels name (a pod cannot steer signals to another
    resource's capture); else the resource's first run."""
    meta = pod["metadata"]
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    first = capture_workflow_id(
        namespace=meta["namespace"],
        name=labels.get(CHECKPOINT_LABEL, ""),
        key=labels[CHECKPOINT_UID_LABEL],
    )
    named = annotations.get(CAPTURE_WORKFLOW_ANNOTATION, "")
    if named and is_run_of(named, first):
        return str(named)
    if named:
        log.warning(
            "pod %s/%s names capture %s, not a run of %s",
            meta["namespace"],
            meta.get("name"),
            named,
            first,
        )
    return first


def verification_run(pod: dict[str, Any]) -> str:
    """The capture run a verification pod reports to: the one its annotation names when
    that is a run of the Checkpoint that owns it, else that Checkpoint's first run; "" for
    a pod no Checkpoint owns. (The run heeds only its own pod's UID.)"""
    meta = pod.get("metadata") or {}
    owner = next(
        (o for o in meta.get("ownerReferences") or [] if o.get("kind") == "Checkpoint"), None
    )
    if owner is None or not owner.get("name") or not owner.get("uid"):
        return ""
    first = capture_workflow_id(
        namespace=meta.get("namespace", ""), name=owner["name"], key=owner["uid"]
    )
    named = (meta.get("annotations") or {}).get(CAPTURE_WORKFLOW_ANNOTATION, "")
    return str(named) if named and is_run_of(named, first) else first


def _refusal(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())


def build_registry(
    settings: WatcherSettings, connect: Callable[[], Awaitable[Client]]
) -> kopf.OperatorRegistry:
    """The watcher's handlers; `connect` makes the Temporal client in kopf's own loop."""
    registry = kopf.OperatorRegistry()
    signalled: dict[str, tuple[str, ...]] = {}  # pod UID → signals sent (no repeats)

    @kopf.on.startup(registry=registry)
    async def startup(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = CLEANUP_FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=GROUP, key="last-handled-configuration"
        )
        settings.posting.enabled = False  # Events are the workflow's
        # Our CRDs are installed before the controller starts: no watch of every CRD in the
        # cluster (nor the RBAC to list them; decision 0025). kopf looks them up at start.
        settings.scanning.disabled = True
        memo["temporal"] = await connect()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info(settings.kube)

    async def capture(
        model: type[Checkpoint] | type[PodSnapshot],
        body: kopf.Body,
        memo: kopf.Memo,
        patch: kopf.Patch,
        logger: kopf.Logger,
    ) -> None:
        try:
            resource = model.model_validate(dict(body))
        except ValidationError as err:
            if (body.get("status") or {}).get("phase") in _FINISHED:
                return  # captured or failed already: its status stays as it is
            message = _refusal(err)
            logger.warning("refused: %s", message)
            patch.status["phase"] = Phase.FAILED.value
            patch.status["message"] = message
            return
        labels = (body.get("metadata") or {}).get("labels") or {}
        if labels.get(CHECKPOINT_ID_LABEL) != resource.checkpoint_id:
            # Lets the control side list the resources of one checkpoint ID by selector
            # (decision 0047); set on resume too, so resources made before carry it.
            patch.metadata.labels[CHECKPOINT_ID_LABEL] = resource.checkpoint_id
        request = capture_request(resource, settings)
        if isinstance(resource, Checkpoint) and resource.spec.schedule is not None:
            sid = await ensure_capture_schedule(memo["temporal"], request, resource.spec.schedule)
            logger.info("capture schedule %s: %s", sid, resource.spec.schedule.cron)
        if (body.get("status") or {}).get("phase") in _FINISHED:
            return  # captured or failed already: a restart must not start it again
        try:
            handle = await start_capture(memo["temporal"], request)
        except WorkflowAlreadyStartedError:
            return  # its capture ran before (closed): never again for this UID
        logger.info("capture workflow %s", handle.id)

    async def reschedule(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger) -> None:
        """A Checkpoint's spec changed: its Schedule follows (made, updated or deleted)."""
        try:
            resource = Checkpoint.model_validate(dict(body))
        except ValidationError as err:
            logger.warning("schedule not changed, the spec is refused: %s", _refusal(err))
            return
        request = capture_request(resource, settings)
        if resource.spec.schedule is not None:
            await ensure_capture_schedule(memo["temporal"], request, resource.spec.schedule)
            logger.info("capture schedule updated: %s", resource.spec.schedule.cron)
        elif await delete_capture_schedule(memo["temporal"], request):
            logger.info("capture schedule deleted")

    async def demand(
        model: type[Checkpoint] | type[PodSnapshot],
        body: kopf.Body,
        token: str,
        memo: kopf.Memo,
        logger: kopf.Logger,
    ) -> None:
        """The `capture-now` annotation took a new value: a run for it (once per value)."""
        try:
            resource = model.model_validate(dict(body))
        except ValidationError as err:
            logger.warning("capture-now refused, the spec is refused: %s", _refusal(err))
            return
        try:
            handle = await capture_now(memo["temporal"], capture_request(resource, settings), token)
        except WorkflowAlreadyStartedError:
            logger.info("capture-now %r ran already", token)
            return
        logger.info("capture workflow %s (capture-now %r)", handle.id, token)

    for model, plural in ((Checkpoint, "checkpoints"), (PodSnapshot, "podsnapshots")):

        @kopf.on.resume(GROUP, VERSION, plural, registry=registry)
        @kopf.on.create(GROUP, VERSION, plural, registry=registry)
        async def on_resource(
            body: kopf.Body,
            memo: kopf.Memo,
            patch: kopf.Patch,
            logger: kopf.Logger,
            model: type[Checkpoint] | type[PodSnapshot] = model,
            **_: Any,
        ) -> None:
            await capture(model, body, memo, patch, logger)

        @kopf.on.update(
            GROUP,
            VERSION,
            plural,
            field=("metadata", "annotations", CAPTURE_NOW_ANNOTATION),
            registry=registry,
        )
        async def on_capture_now(
            body: kopf.Body,
            old: Any,
            new: Any,
            memo: kopf.Memo,
            logger: kopf.Logger,
            model: type[Checkpoint] | type[PodSnapshot] = model,
            **_: Any,
        ) -> None:
            if new and new != old:
                await demand(model, body, str(new), memo, logger)

        @kopf.on.update(GROUP, VERSION, plural, field="spec.identity", registry=registry)
        async def on_identity_change(
            old: Any, new: Any, patch: kopf.Patch, logger: kopf.Logger, **_: Any
        ) -> None:
            if old is not None and old != new:
                logger.warning("refused: %s", IDENTITY_IMMUTABLE)
                patch.status["phase"] = Phase.FAILED.value
                patch.status["message"] = IDENTITY_IMMUTABLE

        @kopf.on.delete(GROUP, VERSION, plural, registry=registry)
        async def on_delete(
            namespace: str | None, name: str, uid: str, memo: Any, logger: kopf.Logger, **_: Any
        ) -> None:
            await _cancel_and_wait(memo["temporal"], namespace or "default", name, uid, logger)

    @kopf.on.update(GROUP, VERSION, "checkpoints", field="spec", registry=registry)
    async def on_checkpoint_spec(
        body: kopf.Body, old: Any, new: Any, memo: kopf.Memo, logger: kopf.Logger, **_: Any
    ) -> None:
        if (old or {}).get("identity") != (new or {}).get("identity"):
            return  # refused (on_identity_change): its schedule keeps the identity it had
        await reschedule(body, memo, logger)

    @kopf.on.event("", "v1", "pods", labels={CHECKPOINT_UID_LABEL: kopf.PRESENT}, registry=registry)
    async def on_capture_pod(
        event: kopf.RawEvent, memo: Any, logger: kopf.Logger, **_: Any
    ) -> None:
        pod: dict[str, Any] = dict(event["object"])
        if event.get("type") == "DELETED":
            signalled.pop(pod["metadata"].get("uid", ""), None)
            return
        seen = observe(pod)
        wanted = tuple(signals_for(seen))
        if signalled.get(seen.pod_uid) == wanted:
            return
        workflow_id = signalled_run(pod)
        handle = memo["temporal"].get_workflow_handle_for(CaptureWorkflow.run, workflow_id)
        for signal in wanted:
            if signal not in signalled.get(seen.pod_uid, ()):
                try:
                    await handle.signal(_SIGNALS[signal], seen)
                except RPCError as err:
                    if err.status != RPCStatusCode.NOT_FOUND:
                        raise
                    logger.info("no running capture %s for pod signal %s", workflow_id, signal)
        signalled[seen.pod_uid] = wanted

    verified: dict[str, VerificationObservation] = {}  # pod UID → last observation sent

    @kopf.on.event("", "v1", "pods", labels={VERIFICATION_LABEL: "true"}, registry=registry)
    async def on_verification_pod(
        event: kopf.RawEvent, memo: Any, logger: kopf.Logger, **_: Any
    ) -> None:
        """A verified capture's verification pod (decision 0045): what it says, signalled
        to the capture run that made it, once per change."""
        pod: dict[str, Any] = dict(event["object"])
        uid = (pod.get("metadata") or {}).get("uid", "")
        if event.get("type") == "DELETED":
            verified.pop(uid, None)
            return
        seen = verification_observation(pod)
        workflow_id = verification_run(pod)
        if verified.get(uid) == seen or not workflow_id:
            return
        handle = memo["temporal"].get_workflow_handle_for(CaptureWorkflow.run, workflow_id)
        try:
            await handle.signal(CaptureWorkflow.verification_seen, seen)
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
            logger.info("no running capture %s for its verification pod", workflow_id)
        verified[uid] = seen

    register_drain(registry, settings.kube)  # capture before a drain (decision 0044)
    return registry


async def _cancel_and_wait(
    client: Client, namespace: str, name: str, uid: str, logger: kopf.Logger
) -> None:
    """Delete the resource's Schedule, cancel its capture runs and wait until they closed
    (their cleanup ran)."""
    first = capture_workflow_id(namespace=namespace, name=name, key=uid)
    with contextlib.suppress(RPCError):  # none, or never made: nothing to stop
        await client.get_schedule_handle(
            capture_schedule_id(namespace=namespace, name=name, key=uid)
        ).delete()
    running = await _running_runs(client, namespace, first)
    if not running:
        return
    for workflow_id in running:
        logger.info("cancelling capture %s", workflow_id)
        with contextlib.suppress(RPCError):  # closed meanwhile
            await client.get_workflow_handle(workflow_id).cancel()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _CANCEL_WAIT_SECONDS
    while loop.time() < deadline:
        if not await _running_runs(client, namespace, first, among=running):
            return
        await asyncio.sleep(0.5)
    raise kopf.TemporaryError(f"capture {first} is still cleaning up", delay=5)


async def _running_runs(
    client: Client, namespace: str, first: str, *, among: Sequence[str] = ()
) -> list[str]:
    """The running captures that are runs of `first`: its own (described: visibility may
    lag its start) and the later ones visibility lists, or those of `among` still running."""
    candidates = list(among) or [first]
    if not among:
        query = (
            f"WorkflowType = '{CAPTURE_WORKFLOW}' AND ExecutionStatus = 'Running' "
            f"AND {visibility.NAMESPACE.name} = '{namespace}'"
        )
        async for execution in client.list_workflows(query):
            if execution.id != first and is_run_of(execution.id, first):
                candidates.append(execution.id)
    running = []
    for workflow_id in candidates:
        try:
            description = await client.get_workflow_handle(workflow_id).describe()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                continue  # never started (refused spec)
            raise
        if description.status == WorkflowExecutionStatus.RUNNING:
            running.append(workflow_id)
    return running


_TLS_SHUTDOWN_GRACE_SECONDS = 0.25  # aiohttp's own advice for a graceful client shutdown


class KopfThread:
    """kopf in its own thread and loop (it cancels other tasks of a shared loop on exit)."""

    def __init__(self, registry: kopf.OperatorRegistry) -> None:
        self._registry = registry
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kopf", daemon=True)

    def _run(self) -> None:
        asyncio.run(self._operate())

    async def _operate(self) -> None:
        try:
            await kopf.operator(
                registry=self._registry,
                standalone=True,
                clusterwide=True,
                stop_flag=self._stop,
                ready_flag=self._ready,
            )
        finally:
            # kopf closes its aiohttp sessions on the way out, but a TLS connection's socket
            # closes only after its TLS shutdown, which needs the loop a moment longer:
            # without it asyncio.run closes the loop first and each watch's socket leaks
            # (seen against a real API server: one per watched resource at every stop).
            await asyncio.sleep(_TLS_SHUTDOWN_GRACE_SECONDS)

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("kopf did not start")

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


async def run_watcher(
    settings: WatcherSettings,
    *,
    connect: Callable[[], Awaitable[Client]],
    elector: Any,
    stop: asyncio.Event,
    alongside: Sequence[Callable[[asyncio.Event], Awaitable[None]]] = (),
) -> None:
    """Wait for the Lease, run kopf while it is held, stop kopf when it is lost (and give
    the Lease up when kopf ended by itself); again, until `stop`. `elector` is a
    `workers.leader.LeaseElector`. Each of `alongside` also runs while the Lease is held
    (the webhook's certificate: decision 0032): the event it is given is set, and it is
    cancelled, when the hold ends; one that ends by itself ends the hold as kopf would."""
    registry = build_registry(settings, connect)
    while await elector.acquire(stop):
        operator = KopfThread(registry)
        await asyncio.to_thread(operator.start)
        held = asyncio.Event()
        others = [asyncio.ensure_future(work(held)) for work in alongside]

        def alive(kopf: KopfThread = operator, tasks: list[Any] = others) -> bool:
            return kopf.alive and not any(task.done() for task in tasks)

        ended = False
        try:
            await elector.hold(stop, alive=alive)
            ended = not alive()  # ended by itself: a fresh start, by any replica
        finally:
            held.set()
            for task in others:  # the Lease may be another's now: not one more write
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            await asyncio.to_thread(operator.stop)
        for task in others:
            if not task.cancelled() and task.exception() is not None:
                log.error("work under the Lease failed", exc_info=task.exception())
        if stop.is_set() or ended:
            await elector.release()
