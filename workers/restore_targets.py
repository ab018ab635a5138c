"""The node worker's watch of restore-target pods bound to its own node: as soon as a pod's
standby container runs, the node starts `restore/<ns>/<pod>/<podUID>` itself, eagerly, on
its own queue (the restore then runs here with no matching hop on its critical path).

The watch is the one watch of `activities.kube.watch` (list, then watch from the list's
resourceVersion with bookmarks, 410 lists again, failures backed off and logged, its
`health` for whoever checks). It asks the API server for this node's restore targets only
(label selector `warmstart.dev/restore-target=true`, field selector
`spec.nodeName=<node>`), never for a cluster-wide list; what arrives is checked again here,
so an API without server-side selectors gives the same result. Each event is considered as
it arrives: no call of its own on the way to the restore. A restarted node worker sees
every target again: the workflow ID (the pod's UID) and REJECT_DUPLICATE start one restore
per pod, ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client as kube
from pydantic import ValidationError
from temporalio.client import Client
from temporalio.exceptions import WorkflowAlreadyStartedError

from activities.contracts import ContainerTarget
from activities.kube.watch import Backoff, Watch, WatchEvent, WatchHealth
from api.resources import CHECKPOINT_ID_LABEL
from api.restore_pods import (
    CHECKPOINT_VERSION_ANNOTATION,
    GMS_LOAD_COMPLETE_FILE,
    GMS_LOADER,
    IMAGE_STANDBY,
    OUR_STANDBY,
    RESTORE_STATUS_ANNOTATION,
    RESTORE_TARGET_LABEL,
    STANDBY_ENV,
    STORAGE_ANNOTATION,
)
from api.storage import RemoteStorage
from workers.operations import start_restore
from workers.settings import Settings
from workflows.contracts import RestoreRequest

log = logging.getLogger(__name__)
_WATCH_SECONDS = 60  # the server ends each watch; the next goes on from its resourceVersion


@dataclass(frozen=True)
class RestoreTarget:
    """What a restore-target pod asks of its node."""

    container: ContainerTarget
    checkpoint_id: str
    version: str
    gms_sentinel: str
    storage: RemoteStorage | None = None


def restore_target(pod: Mapping[str, Any], *, node: str) -> RestoreTarget | None:
    """The restore `pod` asks for once its standby container runs on `node`; None while
    it is not (yet) one: not a target, elsewhere, already published, or not running."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    labels, notes = meta.get("labels") or {}, meta.get("annotations") or {}
    checkpoint_id = labels.get(CHECKPOINT_ID_LABEL, "")
    if labels.get(RESTORE_TARGET_LABEL) != "true" or not checkpoint_id:
        return None
    if spec.get("nodeName") != node or RESTORE_STATUS_ANNOTATION in notes:
        return None
    standby = _standby_container(spec)
    status = _status(pod, standby["name"]) if standby is not None else None
    if standby is None or status is None or (status.get("state") or {}).get("running") is None:
        return None
    target = ContainerTarget(
        namespace=meta.get("namespace", ""),
        pod_name=meta.get("name", ""),
        pod_uid=meta.get("uid", ""),
        container=standby["name"],
        container_id=(status.get("containerID") or "").partition("://")[2],
        standby="image" if _env(standby).get(STANDBY_ENV) == IMAGE_STANDBY else "warmstart",
    )
    return RestoreTarget(
        container=target,
        checkpoint_id=checkpoint_id,
        version=notes.get(CHECKPOINT_VERSION_ANNOTATION, ""),
        gms_sentinel=_gms_sentinel(spec, standby, target.pod_uid),
        storage=_storage(notes, target),
    )


def _storage(notes: Mapping[str, str], target: ContainerTarget) -> RemoteStorage | None:
    """Where to fetch the version from (the webhook's annotation). One that does not parse
    is left out: a node without the version then fails the restore as not found, and the
    pod starts cold with that reason."""
    raw = notes.get(STORAGE_ANNOTATION)
    if not raw:
        return None
    try:
        return RemoteStorage.model_validate_json(raw)
    except ValidationError as err:
        log.warning(
            "pod %s/%s: %s is not a storage location: %s",
            target.namespace,
            target.pod_name,
            STORAGE_ANNOTATION,
            err.errors()[0]["msg"],
        )
        return None


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
    from activities.kube.client import configuration

    watcher = RestoreTargetWatch(
        configuration=configuration(settings.kube),
        client=client,
        node=settings.node.name,
        control_task_queue=settings.node.control_task_queue,
        deadline_seconds=settings.node.restore_deadline_seconds,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop), name="restore-targets")
    try:
        yield
    finally:
        stop.set()
        await task


class RestoreTargetWatch:
    """Starts one RestoreWorkflow per restore-target pod of this node."""

    def __init__(
        self,
        *,
        configuration: kube.Configuration,
        client: Client,
        node: str,
        control_task_queue: str,
        deadline_seconds: float,
        backoff: Backoff | None = None,
    ) -> None:
        """`configuration`: the API server and credentials of the one login
        (`activities.kube.client.configuration`)."""
        self._client = client
        self._node = node
        self._control_task_queue = control_task_queue
        self._deadline = deadline_seconds
        self._started: set[str] = set()
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
        """Watch until `stop` is set (the watch retries every failure itself)."""
        await self.watch.run(stop)

    async def _changed(self, event: WatchEvent) -> None:
        if event.type in ("ADDED", "MODIFIED"):
            await self.consider(event.object)

    async def consider(self, pod: Mapping[str, Any]) -> None:
        self.considered += 1
        target = restore_target(pod, node=self._node)
        if target is None or target.container.pod_uid in self._started:
            return
        self._started.add(target.container.pod_uid)
        request = RestoreRequest(
            namespace=target.container.namespace,
            name=target.container.pod_name,
            checkpoint_id=target.checkpoint_id,
            version=target.version,
            node=self._node,
            deadline_seconds=self._deadline,
            control_task_queue=self._control_task_queue,
            pod=target.container,
            gms_sentinel=target.gms_sentinel,
            storage=target.storage,
        )
        try:
            handle = await start_restore(self._client, request, key=target.container.pod_uid)
        except WorkflowAlreadyStartedError:
            return  # restored (or fell back) before this worker started
        log.info("restore of pod %s/%s started: %s", request.namespace, request.name, handle.id)
