"""The node worker's watch of restore-target pods bound to its own node: the node starts
`restore/<ns>/<pod>/<podUID>` itself, eagerly, on its own queue (the restore then runs here
with no matching hop on its critical path): as soon as the pod is scheduled here when its
standby announces itself (the restore prepares, then restores once the standby writes
`standby-waiting`, without waiting for the kubelet's status), else once the kubelet reports
the standby running. A pod deleted before its standby ran has its restore cancelled.

The watch is the one watch of `activities.kube.watch` (list, then watch from the list's
resourceVersion with bookmarks, 410 lists again, failures backed off and logged, its
`health` for whoever checks). It asks the API server for this node's restore targets only
(label selector `warmstart.dev/restore-target=true`, field selector
`spec.nodeName=<node>`), never for a cluster-wide list; what arrives is checked again here,
so an API without server-side selectors gives the same result. A restarted node worker sees
every target again: the workflow ID (the pod's UID) and REJECT_DUPLICATE start one restore
per pod, ever.

Nothing a pod says is trusted: any pod may carry these labels and annotations. What the node
restores comes from the Checkpoint the pod's `restore-from` annotation names, read from the
pod's own namespace (`api.restore_claims.check_claims`). A pod whose labels or annotations
say anything else (another namespace's checkpoint ID, a storage location of its own
choosing, a target copied from another namespace's pod) is refused: its workflow reads
nothing and starts the pod cold with the reason and an Event. The Checkpoint is read when
the pod is scheduled here, before its standby runs (`CheckpointViews.read_ahead`), so that
the restore starts without a round trip once the standby runs.

A verified capture's verification pod (decision 0045) restores the version its Checkpoint's
`status.verifying` names for that pod's UID, held back on this node (`unverified`); its
capture names it there right after creating it, so a verification pod whose claims do not
hold yet is read again for up to VERIFICATION_READ_SECONDS before it is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client as kube
from temporalio.client import Client
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from activities.contracts import ContainerTarget
from activities.kube.watch import Backoff, Watch, WatchEvent, WatchHealth
from api.errors import WarmstartError
from api.naming import restore_workflow_id
from api.resources import VERIFICATION_LABEL
from api.restore_claims import RestoreClaims, check_claims, restore_source
from api.restore_pods import (
    ANNOUNCE_ENV,
    GMS_LOAD_COMPLETE_FILE,
    GMS_LOADER,
    IMAGE_STANDBY,
    OUR_STANDBY,
    RESTORE_STATUS_ANNOTATION,
    RESTORE_TARGET_LABEL,
    STANDBY_ENV,
)
from workers.checkpoints import CheckpointViews, ReadCheckpoint
from workers.operations import start_restore
from workers.settings import Settings
from workflows.contracts import Refusal, RestoreRequest

log = logging.getLogger(__name__)
_WATCH_SECONDS = 60  # the server ends each watch; the next goes on from its resourceVersion
_READ_SECONDS = 10.0  # a Checkpoint read, the client's retries included
# How long a verification pod's claims are read again before it is refused (decision 0045):
# its capture publishes the pod's UID on the Checkpoint's status right after creating it.
VERIFICATION_READ_SECONDS = 15.0


@dataclass(frozen=True)
class RestoreTarget:
    """A restore-target pod of this node whose standby runs, as the pod says it."""

    container: ContainerTarget
    gms_sentinel: str
    pod: Mapping[str, Any]  # its labels and annotations are claims: checked, never trusted


def restore_target(pod: Mapping[str, Any], *, node: str) -> RestoreTarget | None:
    """The restore `pod` asks for on `node`: as soon as it is scheduled here when its standby
    announces itself (`standby-waiting`: the node prepares meanwhile), else once the kubelet
    reports its standby running; None while it is not (yet) one: not a target, elsewhere,
    already published, or not running."""
    if not _bound_here(pod, node=node):
        return None
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    standby = _standby_container(spec)
    if standby is None:
        return None
    env = _env(standby)
    status = _status(pod, standby["name"]) or {}
    running = (status.get("state") or {}).get("running") is not None
    announces = env.get(STANDBY_ENV) == OUR_STANDBY and env.get(ANNOUNCE_ENV) == "1"
    if not (running or announces):
        return None
    target = ContainerTarget(
        namespace=meta.get("namespace", ""),
        pod_name=meta.get("name", ""),
        pod_uid=meta.get("uid", ""),
        container=standby["name"],
        container_id=(status.get("containerID") or "").partition("://")[2] if running else "",
        standby="image" if env.get(STANDBY_ENV) == IMAGE_STANDBY else "warmstart",
        announces=announces,
    )
    return RestoreTarget(
        container=target, gms_sentinel=_gms_sentinel(spec, standby, target.pod_uid), pod=pod
    )


def scheduled_source(pod: Mapping[str, Any], *, node: str) -> tuple[str, str] | None:
    """(namespace, Checkpoint name) of a restore target bound to `node` that names one: the
    Checkpoint its restore will be checked against, worth reading before its standby runs."""
    if not _bound_here(pod, node=node):
        return None
    try:
        name = restore_source(pod)
    except WarmstartError:
        return None
    namespace = (pod.get("metadata") or {}).get("namespace", "")
    return (namespace, name) if name and namespace else None


def _bound_here(pod: Mapping[str, Any], *, node: str) -> bool:
    """A restore target on `node` whose restore was not published yet."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    labels, notes = meta.get("labels") or {}, meta.get("annotations") or {}
    return (
        labels.get(RESTORE_TARGET_LABEL) == "true"
        and spec.get("nodeName") == node
        and RESTORE_STATUS_ANNOTATION not in notes
    )


def _verification(pod: Mapping[str, Any]) -> bool:
    """Whether the pod says it is a verification pod (a claim like any: only its Checkpoint's
    status, naming its UID, lets it restore anything)."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return labels.get(VERIFICATION_LABEL) == "true"


def _standby_container(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    for container in spec.get("containers") or []:
        if _env(container).get(STANDBY_ENV) in (OUR_STANDBY, IMAGE_STANDBY):
            return dict(container)
    return None


def _env(container: Mapping[str, Any]) -> dict[str, Any]:
    """The container's literal environment values by name."""
    return {e.get("name"): e.get("value") for e in container.get("env") or []}


def _status(pod: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == name:
            return dict(status)
    return None


def _gms_sentinel(spec: Mapping[str, Any], standby: Mapping[str, Any], pod_uid: str) -> str:
    """Intra-pod GMS: the pod's own loader writes `gms-load-complete-<podUID>`; inter-pod:
    the shared `gms-load-complete` named by the standby's environment."""
    if any(c.get("name") == GMS_LOADER for c in spec.get("containers") or []):
        return f"gms-load-complete-{pod_uid}"
    shared = _env(standby).get("GMS_LOAD_COMPLETE_FILE", "")
    return shared.rsplit("/", 1)[-1] if shared == GMS_LOAD_COMPLETE_FILE else ""


@contextlib.asynccontextmanager
async def watching_restore_targets(client: Client, settings: Settings) -> AsyncIterator[None]:
    """The node's watch of its restore targets, for as long as the context lasts."""
    from activities.kube.client import api_client, configuration
    from workers.checkpoints import checkpoint_reader

    api = api_client(settings.kube)
    watcher = RestoreTargetWatch(
        configuration=configuration(settings.kube),
        client=client,
        node=settings.node.name,
        control_task_queue=settings.node.control_task_queue,
        deadline_seconds=settings.node.restore_deadline_seconds,
        read_checkpoint=checkpoint_reader(
            kube.CustomObjectsApi(api), timeout_seconds=_READ_SECONDS
        ),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop), name="restore-targets")
    try:
        yield
    finally:
        stop.set()
        await task
        api.close()  # type: ignore[no-untyped-call]


class RestoreTargetWatch:
    """Starts one RestoreWorkflow per restore-target pod of this node: a restore of what
    the pod's own Checkpoint says, or a refusal."""

    def __init__(
        self,
        *,
        configuration: kube.Configuration,
        client: Client,
        node: str,
        control_task_queue: str,
        deadline_seconds: float,
        read_checkpoint: ReadCheckpoint,
        backoff: Backoff | None = None,
    ) -> None:
        """`configuration`: the API server and credentials of the one login
        (`activities.kube.client.configuration`); `read_checkpoint`: a Checkpoint by
        namespace and name through the same stack (`workers.checkpoints`)."""
        self._client = client
        self._node = node
        self._control_task_queue = control_task_queue
        self._deadline = deadline_seconds
        self._started: set[str] = set()
        self._early: set[str] = set()  # started before the standby ran
        self._starting: set[asyncio.Task[None]] = set()
        self.checkpoints = CheckpointViews(read_checkpoint)
        self.considered = 0  # pods seen so far (the watch's progress, for whoever waits)
        self.watch = Watch(
            configuration,
            path="/api/v1/pods",
            kind=f"pods on node {node} (all namespaces)",
            handler=self._changed,
            label_selector=f"{RESTORE_TARGET_LABEL}=true",
            field_selector=f"spec.nodeName={node}",
            timeout_seconds=_WATCH_SECONDS,
            backoff=backoff,
        )

    @property
    def health(self) -> WatchHealth:
        return self.watch.health

    async def run(self, stop: asyncio.Event) -> None:
        """Watch until `stop` is set (the watch retries every failure itself); restores
        being started then may finish starting."""
        try:
            await self.watch.run(stop)
            if self._starting:
                await asyncio.wait(set(self._starting), timeout=_READ_SECONDS + 5)
        finally:
            for task in list(self._starting):
                task.cancel()
            self.checkpoints.close()

    async def _changed(self, event: WatchEvent) -> None:
        if event.type in ("ADDED", "MODIFIED"):
            await self.consider(event.object)
        elif event.type == "DELETED":
            self._forget(event.object)

    def _forget(self, pod: Mapping[str, Any]) -> None:
        """A deleted pod whose restore started before its standby ran: that restore may
        still wait for a standby that will never run, so it is cancelled (one that already
        ended ignores the cancel)."""
        meta = pod.get("metadata") or {}
        uid = meta.get("uid", "")
        if uid not in self._early:
            return
        self._early.discard(uid)
        key = restore_workflow_id(
            namespace=meta.get("namespace", ""), name=meta.get("name", ""), key=uid
        )
        task = asyncio.create_task(self._cancel(key), name=f"cancel {key}")
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _cancel(self, workflow_id: str) -> None:
        try:
            await self._client.get_workflow_handle(workflow_id).cancel()
        except RPCError as err:  # ended already (restored, fallen back) or never started
            log.debug("restore %s not cancelled: %s", workflow_id, err)
        else:
            log.info(
                "restore %s cancelled: its pod was deleted before its standby ran", workflow_id
            )

    async def consider(self, pod: Mapping[str, Any]) -> None:
        self.considered += 1
        target = restore_target(pod, node=self._node)
        if target is None:
            source = scheduled_source(pod, node=self._node)
            if source is not None:
                self.checkpoints.read_ahead(*source)  # scheduled here: read before it runs
            return
        uid = target.container.pod_uid
        if uid in self._started:
            return
        self._started.add(uid)
        if not target.container.container_id:
            self._early.add(uid)
        # A task of its own: a Checkpoint not read ahead must not hold up other pods' events.
        task = asyncio.create_task(self._start(target), name=f"restore {uid}")
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _start(self, target: RestoreTarget) -> None:
        pod = target.container
        try:
            claims = await self._checked(target)
        except WarmstartError as err:
            log.warning("pod %s/%s refused: %s: %s", pod.namespace, pod.pod_name, err.reason, err)
            request = self._request(target, refusal=Refusal(reason=err.reason, message=str(err)))
        else:
            request = self._request(target, claims=claims)
        try:
            handle = await start_restore(self._client, request, key=pod.pod_uid)
        except WorkflowAlreadyStartedError:
            return  # restored (or fell back) before this worker started
        except Exception:
            where = f"{pod.namespace}/{pod.pod_name}"
            log.exception("pod %s: its restore could not be started", where)
            self._started.discard(pod.pod_uid)  # its next event tries again
            return
        log.info("restore of pod %s/%s started: %s", pod.namespace, pod.pod_name, handle.id)

    async def _checked(self, target: RestoreTarget) -> RestoreClaims:
        """What the pod's own Checkpoint says it restores, from the read made when the pod
        was scheduled here (no round trip); read again once when the pod does not agree with
        that read, which may be older than the pod (a verification pod: again every half
        second for up to VERIFICATION_READ_SECONDS)."""
        pod = target.container
        try:
            name = restore_source(target.pod)
        except WarmstartError:
            name = None
        if name is None:
            return check_claims(target.pod, None)  # refused: it names no Checkpoint
        checkpoint, kept = await self.checkpoints.get(pod.namespace, name)
        try:
            return check_claims(target.pod, checkpoint)
        except WarmstartError:
            if not kept and not _verification(target.pod):
                raise
        checkpoint, _ = await self.checkpoints.get(pod.namespace, name, fresh=True)
        if not _verification(target.pod):
            return check_claims(target.pod, checkpoint)
        # A verification pod is named on its Checkpoint's status right after it is created:
        # a read that came first is read again for a little while before the pod is refused.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + VERIFICATION_READ_SECONDS
        while True:
            try:
                return check_claims(target.pod, checkpoint)
            except WarmstartError:
                if loop.time() >= deadline:
                    raise
            await asyncio.sleep(0.5)
            checkpoint, _ = await self.checkpoints.get(pod.namespace, name, fresh=True)

    def _request(
        self,
        target: RestoreTarget,
        *,
        claims: RestoreClaims | None = None,
        refusal: Refusal | None = None,
    ) -> RestoreRequest:
        return RestoreRequest(
            namespace=target.container.namespace,
            name=target.container.pod_name,
            checkpoint_id=claims.checkpoint_id if claims is not None else "",
            version=claims.version if claims is not None else "",
            node=self._node,
            deadline_seconds=self._deadline,
            control_task_queue=self._control_task_queue,
            pod=target.container,
            gms_sentinel=target.gms_sentinel,
            storage=claims.storage if claims is not None else None,
            manifest_sha256=claims.manifest_sha256 if claims is not None else "",
            refusal=refusal,
            unverified=claims.unverified if claims is not None else False,
        )
