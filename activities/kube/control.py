"""Control activities on a cluster, through the official `kubernetes` client: checkpoint ID
claims, the capture Job, the Job's pod, status and Events on the resource (with the
quarantines of its checkpoint in effect, read from the store the controller mounts), and
what retention must keep.

Every call goes through `activities.kube.client.call` (in a thread, its failures mapped
once: 5xx, 429 and connection failures are `Unavailable`, retried by the step's policy;
401/403 `Forbidden`; other refusals `InvalidSpec`). Here a resource that is gone becomes
`CheckpointNotFound`, a conflict is read again, a Job or pod that is gone is an observation.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import quote

from kubernetes import client
from temporalio import activity

from activities.contracts import (
    ClaimInput,
    ContainerTarget,
    JobInput,
    JobRef,
    NodeSelectorInput,
    PodObservation,
    PodQuery,
    ResourceRef,
    StatusInput,
    VerificationObservation,
    VerificationPod,
    VerificationPodInput,
    VerificationQuery,
)
from activities.kube.client import ApiCall, call
from activities.steps import ClusterControlSteps
from activities.storage.quarantine import Quarantine
from api.errors import (
    CheckpointNotFoundError,
    ConflictError,
    IdentityConflictError,
    InvalidSpecError,
    NotFoundError,
    UnavailableError,
    WarmstartError,
)
from api.jobs import JobSettings, capture_job
from api.reasons import Phase, Reason
from api.resources import (
    CHECKPOINT_ID_LABEL,
    GROUP,
    TARGET_CONTAINER_ANNOTATION,
    VERSION,
    CaptureStatus,
    Checkpoint,
    QuarantineStatus,
    WorkflowLink,
)
from api.restore_claims import CHECKPOINT_VERSION_ANNOTATION
from api.restore_pods import (
    CONTROL_DIR_ANNOTATION,
    RESTORE_STATUS_ANNOTATION,
    RESTORE_TARGET_LABEL,
    STANDBY_ANNOTATION,
    RestoreSettings,
    verification_pod,
)
from api.retention import ProtectedRef
from api.status import Report, event_for, next_status, quarantine_status

PLURALS = {"Checkpoint": "checkpoints", "PodSnapshot": "podsnapshots"}
CONTROLLER = f"{GROUP}/controller"
_CONFLICT_RETRIES = 8


def _now() -> datetime:
    return datetime.now(UTC)


class KubeControlActivities(ClusterControlSteps):
    """Control activities of the cluster mode (the control worker registers these)."""

    def __init__(
        self,
        api: client.ApiClient,
        *,
        claims_namespace: str,
        job_settings: JobSettings | None = None,
        ui_url: str = "",
        temporal_namespace: str = "default",
        instance: str = "",
        quarantine: Quarantine | None = None,
        restore_settings: RestoreSettings | None = None,
    ) -> None:
        """`quarantine`: the records of the store this worker mounts, shown on the status
        of the resources whose checkpoint they name (none: statuses keep what they show);
        `restore_settings`: how verification pods are shaped as restore targets (as the
        webhook shapes pods)."""
        self._quarantine = quarantine
        self._restore_settings = restore_settings or RestoreSettings(node_labels=())
        self._custom = client.CustomObjectsApi(api)
        self._batch = client.BatchV1Api(api)
        self._core = client.CoreV1Api(api)
        self._leases = client.CoordinationV1Api(api)
        self._events = client.EventsV1Api(api)
        self._claims_namespace = claims_namespace
        self._job_settings = job_settings or JobSettings()
        self._ui_url = ui_url.rstrip("/")
        self._temporal_namespace = temporal_namespace
        self._instance = instance or f"warmstart-{uuid.uuid4().hex[:8]}"

    # --- the resource ----------------------------------------------------------------

    async def _resource(self, ref: ResourceRef) -> dict[str, Any]:
        """The resource `ref` names, if it is still the same object (same UID)."""
        where = f"{ref.kind} {ref.namespace}/{ref.name}"
        try:
            raw: object = await call(
                self._custom.get_namespaced_custom_object,
                GROUP,
                VERSION,
                ref.namespace,
                PLURALS[ref.kind],
                ref.name,
                on=ApiCall("read", ref.kind, ref.namespace, ref.name),
            )
        except NotFoundError as err:
            raise CheckpointNotFoundError(f"{where} no longer exists") from err
        if not isinstance(raw, dict):
            raise CheckpointNotFoundError(f"{where}: the API server answered no object")
        obj: dict[str, Any] = raw
        if ref.uid and obj.get("metadata", {}).get("uid") != ref.uid:
            raise CheckpointNotFoundError(f"{where} was deleted and created again (new UID)")
        return obj

    # --- checkpoint ID ownership -----------------------------------------------------

    @activity.defn
    async def claim_checkpoint_id(self, request: ClaimInput) -> None:
        """One resource of a namespace owns a checkpoint ID there: a Lease
        `checkpoint-<namespace>-<id>` in the controller's namespace names it. The API
        server's create is the lock; a holder whose resource is gone or being deleted no
        longer owns the ID. The ID is a hash of the identity, the same in every namespace:
        each namespace claims its own, so none can squat another's, and a conflict names
        only a resource of the claimant's own namespace."""
        ref = _require_resource(request.resource, "claim")
        holder = f"{ref.kind}/{ref.namespace}/{ref.name}/{ref.uid}"
        name = claim_name(ref.namespace, request.checkpoint_id)
        await self._no_older_claim(request.checkpoint_id, holder=holder, namespace=ref.namespace)
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": self._claims_namespace},
            "spec": {"holderIdentity": holder},
        }
        claim = ApiCall("create", "Lease", self._claims_namespace, name)
        for _ in range(_CONFLICT_RETRIES):
            try:
                await call(
                    self._leases.create_namespaced_lease, self._claims_namespace, lease, on=claim
                )
                return
            except ConflictError:
                pass  # held already: by whom?
            current = await self._read_lease(name)
            if current is None:
                continue  # released in between: try again
            owner = (current.spec.holder_identity if current.spec else None) or ""
            if owner == holder:
                return
            if await self._holder_alive(owner, namespace=ref.namespace):
                raise _owned(request.checkpoint_id, owner)
            version = current.metadata.resource_version if current.metadata else None
            takeover = {
                "metadata": {"resourceVersion": version},
                "spec": {"holderIdentity": holder},
            }
            try:
                await call(
                    self._leases.patch_namespaced_lease,
                    name,
                    self._claims_namespace,
                    takeover,
                    on=ApiCall("take over", "Lease", self._claims_namespace, name),
                )
                return
            except (ConflictError, NotFoundError):
                pass  # another claim moved first: look again
        raise UnavailableError(f"claim {request.checkpoint_id}: the claim kept changing")

    async def _no_older_claim(self, checkpoint_id: str, *, holder: str, namespace: str) -> None:
        """A claim made before claims were per namespace (`checkpoint-<id>`) still binds its
        own namespace's resources while its holder lives; another namespace's is none of
        this claim's business (and is never named)."""
        older = await self._read_lease(f"checkpoint-{checkpoint_id}")
        owner = ((older.spec.holder_identity if older and older.spec else None) or "").strip()
        if owner and owner != holder and await self._holder_alive(owner, namespace=namespace):
            raise _owned(checkpoint_id, owner)

    async def _read_lease(self, name: str) -> client.V1Lease | None:
        try:
            lease: client.V1Lease = await call(
                self._leases.read_namespaced_lease,
                name,
                self._claims_namespace,
                on=ApiCall("read", "Lease", self._claims_namespace, name),
            )
        except NotFoundError:
            return None
        return lease

    async def _holder_alive(self, holder: str, *, namespace: str) -> bool:
        """Whether `holder`, a resource of `namespace`, still exists and is not being
        deleted; a holder of another namespace is never read (nor alive here)."""
        parts = holder.split("/")
        if len(parts) != 4 or parts[0] not in PLURALS or parts[1] != namespace:
            return False
        kind, namespace, name, uid = parts
        ref = ResourceRef.model_validate(
            {"kind": kind, "namespace": namespace, "name": name, "uid": uid}
        )
        try:
            obj = await self._resource(ref)
        except CheckpointNotFoundError:
            return False
        return not obj.get("metadata", {}).get("deletionTimestamp")

    # --- status and Events -----------------------------------------------------------

    @activity.defn
    async def publish_status(self, request: StatusInput) -> None:
        """Patch the resource's status (read, compute, patch with the read resourceVersion;
        a conflict reads again) and post an Event where the phase changed. A restore is
        published on its pod: the `restore-status` annotation and an Event."""
        if request.kind == "restore" and request.pod is not None:
            return await self._publish_restore(request, request.pod)
        ref = _require_resource(request.resource, "publish status")
        info = activity.info()
        link = WorkflowLink(id=info.workflow_id, run_id=info.workflow_run_id, url=self._link(info))
        for _ in range(_CONFLICT_RETRIES):
            obj = await self._resource(ref)
            raw = obj.get("status")
            previous = CaptureStatus.model_validate(raw) if raw else None
            report = Report(
                phase=request.phase,
                reason=request.reason,
                message=request.message,
                checkpoint_id=request.checkpoint_id,
                node_name=request.node,
                job_name=request.job_name,
                version=request.version,
                size_bytes=request.size_bytes,
                storage_uri=request.storage_uri,
                manifest_sha256=request.manifest_sha256,
                step_seconds=request.step_seconds,
                workflow=link,
                generation=int(obj.get("metadata", {}).get("generation") or 0),
                recapture=request.recapture,
                verifying=request.verifying,
            )
            status = next_status(previous, report, now=_now())
            if self._quarantine is not None and status.checkpoint_id:
                shown = await self._quarantine_shown(status.checkpoint_id, ref.namespace)
                status = status.model_copy(update={"quarantine": shown})
            body = {
                "metadata": {"resourceVersion": obj["metadata"].get("resourceVersion")},
                "status": status_patch(status),
            }
            try:
                await call(
                    self._custom.patch_namespaced_custom_object_status,
                    GROUP,
                    VERSION,
                    ref.namespace,
                    PLURALS[ref.kind],
                    ref.name,
                    body,
                    on=ApiCall("patch the status of", ref.kind, ref.namespace, ref.name),
                )
            except ConflictError:
                continue  # written meanwhile: read again
            except NotFoundError as err:
                raise CheckpointNotFoundError(
                    f"{ref.kind} {ref.namespace}/{ref.name} no longer exists"
                ) from err
            event = event_for(previous, status)
            if event is not None:
                await self._post_event(obj, *event, note=request.message or status.phase.value)
            return
        raise UnavailableError(f"status of {ref.namespace}/{ref.name} kept changing")

    async def _publish_restore(self, request: StatusInput, pod: ContainerTarget) -> None:
        restored = request.phase == Phase.RESTORED
        value = "restored" if restored else f"fell-back: {request.reason}: {request.message}"
        notes = {RESTORE_STATUS_ANNOTATION: value[:1024]}
        if not restored and pod.standby == "image":
            # The image's own standby reads these at its next start: it then starts cold.
            notes.update({STANDBY_ANNOTATION: "0", CONTROL_DIR_ANNOTATION: ""})
        body = {"metadata": {"annotations": notes}}
        where = f"pod {pod.namespace}/{pod.pod_name}"
        try:
            obj = await call(
                self._core.patch_namespaced_pod,
                pod.pod_name,
                pod.namespace,
                body,
                on=ApiCall("annotate", "Pod", pod.namespace, pod.pod_name),
            )
        except NotFoundError:  # deleted meanwhile: nobody to tell
            activity.logger.info("%s is gone; restore status not published", where)
            return
        meta = obj.metadata if obj is not None else None
        regarding = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod.pod_name,
                "namespace": pod.namespace,
                "uid": (meta.uid if meta is not None else None) or pod.pod_uid,
            },
        }
        if restored:
            event = ("Normal", "Restored")
        elif request.reason == Reason.FORBIDDEN:  # the node refused the pod: nothing was read
            event = ("Warning", "RestoreRefused")
        else:
            event = ("Warning", "RestoreFellBack")
        note = request.message or value
        await self._post_event(regarding, *event, note=note, action="Restore")
        try:  # the restore may have added this node's evidence: show where it stands
            await self.publish_quarantine(request.checkpoint_id, namespace=pod.namespace)
        except WarmstartError as err:  # a courtesy: the pod's status is written already
            activity.logger.warning("quarantine of %s not shown: %s", request.checkpoint_id, err)

    async def _quarantine_shown(self, checkpoint_id: str, namespace: str) -> list[QuarantineStatus]:
        """The quarantines of `checkpoint_id` in effect for `namespace` (and those recorded
        before namespaces): another namespace's are not shown on its resources."""
        assert self._quarantine is not None
        entries = await asyncio.to_thread(
            self._quarantine.entries, checkpoint_id, namespace=namespace
        )
        return quarantine_status(entries)

    async def publish_quarantine(self, checkpoint_id: str, *, namespace: str = "") -> None:
        """Show the quarantines of `checkpoint_id` in effect for each resource's namespace
        (none: an empty list) on the status of the Checkpoints and PodSnapshots that hold it
        (labelled with it by the watcher), in `namespace` or in every one; those that show it
        already are left alone."""
        if self._quarantine is None or not checkpoint_id:
            return
        shown_by_namespace: dict[str, list[dict[str, Any]]] = {}

        async def shown_in(ns: str) -> list[dict[str, Any]]:
            if ns not in shown_by_namespace:
                shown_by_namespace[ns] = [
                    entry.model_dump(mode="json", by_alias=True, exclude_defaults=True)
                    for entry in await self._quarantine_shown(checkpoint_id, ns)
                ]
            return shown_by_namespace[ns]

        # By the checkpoint-ID label the watcher sets: the resources of this ID, not of the
        # namespace; and from the API server's watch cache (resourceVersion 0), where a
        # quorum read would read and decode the whole namespace from etcd to filter it
        # (decision 0047). A resource cached a moment stale is at most patched once more.
        selector = f"{CHECKPOINT_ID_LABEL}={checkpoint_id}"
        for kind, plural in PLURALS.items():
            if namespace:
                listed = await call(
                    self._custom.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    namespace,
                    plural,
                    label_selector=selector,
                    resource_version="0",
                    on=ApiCall("list", plural, namespace),
                )
            else:
                listed = await call(
                    self._custom.list_cluster_custom_object,
                    GROUP,
                    VERSION,
                    plural,
                    label_selector=selector,
                    resource_version="0",
                    on=ApiCall("list", plural),
                )
            for obj in cast(dict[str, Any], listed).get("items", []):
                status, meta = obj.get("status") or {}, obj.get("metadata") or {}
                if status.get("checkpointID") != checkpoint_id:
                    continue
                name, ns = str(meta.get("name")), str(meta.get("namespace"))
                shown = await shown_in(ns)
                if (status.get("quarantine") or []) == shown:
                    continue
                # The list is ours alone and replaced whole: no resourceVersion needed.
                with contextlib.suppress(NotFoundError):  # deleted meanwhile
                    await call(
                        self._custom.patch_namespaced_custom_object_status,
                        GROUP,
                        VERSION,
                        ns,
                        plural,
                        name,
                        {"status": {"quarantine": shown}},
                        on=ApiCall("patch the status of", kind, ns, name),
                    )

    def _link(self, info: activity.Info) -> str:
        if not self._ui_url:
            return ""
        return (
            f"{self._ui_url}/namespaces/{quote(self._temporal_namespace)}/workflows/"
            f"{quote(info.workflow_id or '', safe='')}/{info.workflow_run_id}/history"
        )

    async def _post_event(
        self, obj: dict[str, Any], kind: str, reason: str, *, note: str, action: str = "Capture"
    ) -> None:
        meta = obj["metadata"]
        now = _now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        name = f"{meta['name']}.{uuid.uuid4().hex[:12]}"
        event = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {
                "name": name,
                "namespace": meta["namespace"],
            },
            "eventTime": now,
            "type": kind,
            "reason": reason,
            "action": action,
            "note": note[:1024],
            "reportingController": CONTROLLER,
            "reportingInstance": self._instance,
            "regarding": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
        }
        try:
            await call(
                self._events.create_namespaced_event,
                meta["namespace"],
                event,
                on=ApiCall("create", "Event", meta["namespace"], name),
            )
        except WarmstartError as err:  # a courtesy: the status is written already
            activity.logger.warning("event %s on %s not posted: %s", reason, meta["name"], err)

    # --- the capture Job and its pod -------------------------------------------------

    @activity.defn
    async def create_capture_job(self, request: JobInput) -> str:
        """Create the capture Job of the Checkpoint; one that exists and is ours is adopted.
        The Job names this capture workflow, the run the watcher signals. Returns the Job's
        name."""
        obj = await self._resource(request.resource)
        resource = Checkpoint.model_validate(obj)
        job = capture_job(
            resource,
            version=request.version,
            settings=self._job_settings,
            workflow_id=activity.info().workflow_id or "",
        )
        name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
        try:
            await call(
                self._batch.create_namespaced_job,
                namespace,
                job,
                on=ApiCall("create", "Job", namespace, name),
            )
            activity.logger.info("created Job %s/%s", namespace, name)
            return str(name)
        except ConflictError:
            pass  # there already: ours to adopt?
        existing = await call(
            self._batch.read_namespaced_job,
            name,
            namespace,
            on=ApiCall("read", "Job", namespace, name),
        )
        meta = existing.metadata
        owners = [o.uid for o in (meta.owner_references if meta else None) or []]
        if request.resource.uid not in owners:
            raise InvalidSpecError(
                f"Job {namespace}/{name} exists and is not this Checkpoint's (owners {owners})"
            )
        activity.logger.info("adopted Job %s/%s", namespace, name)
        return str(name)

    @activity.defn
    async def delete_capture_job(self, request: JobRef) -> None:
        """Delete the capture Job and its pod; one already gone is fine."""
        with contextlib.suppress(NotFoundError):  # gone already
            await call(
                self._batch.delete_namespaced_job,
                request.name,
                request.namespace,
                propagation_policy="Background",
                on=ApiCall("delete", "Job", request.namespace, request.name),
            )

    @activity.defn
    async def nodes_matching(self, request: NodeSelectorInput) -> list[str]:
        """Nodes selected by any label map (matched here: one list serves every map)."""
        nodes = await call(self._core.list_node, on=ApiCall("list", "nodes"))
        return sorted(
            str(node.metadata.name)
            for node in nodes.items
            if node.metadata is not None
            and any(selector.items() <= _labels(node).items() for selector in request.selectors)
        )

    @activity.defn
    async def read_capture_pod(self, request: PodQuery) -> PodObservation:
        """The capture pod as the API server has it (the fallback for missed signals)."""
        if not request.job_name:
            return await self._read_named_pod(request)
        try:
            job = await call(
                self._batch.read_namespaced_job,
                request.job_name,
                request.namespace,
                on=ApiCall("read", "Job", request.namespace, request.job_name),
            )
        except NotFoundError:
            where = f"Job {request.namespace}/{request.job_name}"
            return PodObservation(failure=f"{where} no longer exists")
        failed = (
            [c for c in (job.status.conditions or []) if c.type == "Failed" and c.status == "True"]
            if job.status
            else []
        )
        pods = await call(
            self._core.list_namespaced_pod,
            request.namespace,
            label_selector=f"job-name={request.job_name}",
            on=ApiCall("list", "pods", request.namespace),
        )
        # The selector is the API server's job; checking again costs nothing.
        mine = [p for p in pods.items if _labels(p).get("job-name") == request.job_name]
        observation = observe_pod(mine[-1], request.container) if mine else PodObservation()
        if failed and not observation.failure:
            why = failed[0]
            observation = observation.model_copy(
                update={"failure": f"Job {request.job_name} failed: {why.reason}: {why.message}"}
            )
        return observation

    async def _read_named_pod(self, request: PodQuery) -> PodObservation:
        where = f"pod {request.namespace}/{request.pod_name}"
        try:
            pod = await call(
                self._core.read_namespaced_pod,
                request.pod_name,
                request.namespace,
                on=ApiCall("read", "Pod", request.namespace, request.pod_name),
            )
        except NotFoundError:
            return PodObservation(failure=f"{where} no longer exists")
        uid = pod.metadata.uid if pod.metadata else None
        if request.pod_uid and uid != request.pod_uid:
            return PodObservation(failure=f"{where} was created again (UID {uid})")
        return observe_pod(pod, request.container)

    # --- a verified capture's verification pod (decision 0045) --------------------------

    @activity.defn
    async def create_verification_pod(self, request: VerificationPodInput) -> VerificationPod:
        """Create the verification pod of the version: the Checkpoint's template shaped as
        its restore target (`api.restore_pods.verification_pod`), owned by the Checkpoint,
        required onto the capturing node. One that exists and is this Checkpoint's, for this
        version, is adopted (a retried create); any other is refused."""
        obj = await self._resource(request.resource)
        resource = Checkpoint.model_validate(obj)
        pod = verification_pod(
            resource,
            checkpoint_id=request.checkpoint_id,
            version=request.version,
            node=request.node,
            settings=self._restore_settings,
            workflow_id=activity.info().workflow_id or "",
        )
        name, namespace = pod["metadata"]["name"], pod["metadata"]["namespace"]
        with contextlib.suppress(ConflictError):  # there already: ours to adopt?
            await call(
                self._core.create_namespaced_pod,
                namespace,
                pod,
                on=ApiCall("create", "Pod", namespace, name),
            )
        created = await call(
            self._core.read_namespaced_pod,
            name,
            namespace,
            on=ApiCall("read", "Pod", namespace, name),
        )
        meta = created.metadata
        owners = [o.uid for o in (meta.owner_references if meta else None) or []]
        said = ((meta.annotations if meta else None) or {}).get(CHECKPOINT_VERSION_ANNOTATION)
        if meta is None or request.resource.uid not in owners or said != request.version:
            raise InvalidSpecError(
                f"pod {namespace}/{name} exists and is not the verification pod of "
                f"{request.resource.name} version {request.version}"
            )
        activity.logger.info("verification pod %s/%s: uid %s", namespace, name, meta.uid)
        return VerificationPod(namespace=namespace, name=name, uid=str(meta.uid))

    @activity.defn
    async def read_verification_pod(self, request: VerificationQuery) -> VerificationObservation:
        """The verification pod's `restore-status`, its main container's readiness, and a
        failure where the pod is gone, was created again, failed or its container ended
        (`verification_observation`)."""
        where = f"verification pod {request.namespace}/{request.name}"
        try:
            pod = await call(
                self._core.read_namespaced_pod,
                request.name,
                request.namespace,
                on=ApiCall("read", "Pod", request.namespace, request.name),
            )
        except NotFoundError:
            return VerificationObservation(failure=f"{where} no longer exists")
        raw = self._core.api_client.sanitize_for_serialization(pod)
        return verification_observation(raw, uid=request.uid, container=request.container)

    @activity.defn
    async def delete_verification_pod(self, request: VerificationQuery) -> None:
        """Delete the verification pod (that one, by UID); one already gone is fine."""
        precondition = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=request.uid))
        with contextlib.suppress(NotFoundError, ConflictError):  # gone, or another by now
            await call(
                self._core.delete_namespaced_pod,
                request.name,
                request.namespace,
                body=precondition,
                on=ApiCall("delete", "Pod", request.namespace, request.name),
            )


def claim_name(namespace: str, checkpoint_id: str) -> str:
    """The Lease that says which resource of `namespace` owns `checkpoint_id` there (a
    namespace is a DNS label and the ID 16 hex digits: the name is never ambiguous)."""
    return f"checkpoint-{namespace}-{checkpoint_id}"


def _owned(checkpoint_id: str, owner: str) -> IdentityConflictError:
    kind, namespace, name = [*owner.split("/"), "", "", ""][:3]
    return IdentityConflictError(
        f"checkpoint ID {checkpoint_id} is already owned by {kind} {namespace}/{name}"
    )


def status_patch(status: CaptureStatus) -> dict[str, Any]:
    """The status as a merge patch: fields at their zero value are left out (the client
    sends an empty string as null, which a structural schema refuses), the phase always in,
    `verifying` always (null takes it off), and the quarantine list always (empty replaces
    one shown before)."""
    body = status.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    body["phase"] = status.phase.value
    body["verifying"] = (
        status.verifying.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        if status.verifying is not None
        else None
    )
    body["quarantine"] = [
        entry.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        for entry in status.quarantine
    ]
    return body


def verification_observation(
    pod: Mapping[str, Any], *, uid: str = "", container: str = ""
) -> VerificationObservation:
    """What a verification pod says (as the API server gives it, a plain dict; the watcher's
    events and the control activity's reads alike): its `restore-status`, whether its main
    container (`container`, else the one its target-container annotation names) is Ready,
    and a failure where it is not the pod of UID `uid` (created again), is being deleted,
    failed, or a container of it ended (the main one at all, another with an error)."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    notes = meta.get("annotations") or {}
    where = f"verification pod {meta.get('namespace')}/{meta.get('name')}"
    if uid and meta.get("uid") != uid:
        return VerificationObservation(failure=f"{where} was created again")
    seen = VerificationObservation(
        pod_uid=str(meta.get("uid") or ""),
        restore_status=str(notes.get(RESTORE_STATUS_ANNOTATION, "")),
    )
    if meta.get("deletionTimestamp"):
        return seen.model_copy(update={"failure": f"{where} is being deleted"})
    main = container or notes.get(TARGET_CONTAINER_ANNOTATION) or "main"
    ready, failure = False, ""
    inits, mains = status.get("initContainerStatuses"), status.get("containerStatuses")
    for each in [*(inits or []), *(mains or [])]:
        ended = (each.get("state") or {}).get("terminated")
        name = each.get("name")
        if name == main:
            ready = bool(each.get("ready"))
        if ended is None or failure or (name != main and ended.get("exitCode") in (None, 0)):
            continue
        failure = (
            f"container {name} of {where} ended with code {ended.get('exitCode')} "
            f"({ended.get('reason') or 'Completed'})"
        )
    if not failure and status.get("phase") == "Failed":
        failure = f"{where} failed: {status.get('reason') or 'unknown reason'}"
    return seen.model_copy(update={"ready": ready, "failure": failure})


def observe_pod(pod: Any, container: str) -> PodObservation:
    """What a capture pod says: node, target readiness, a container that failed."""
    failure = ""
    statuses = (
        [*(pod.status.init_container_statuses or []), *(pod.status.container_statuses or [])]
        if pod.status
        else []
    )
    ready = False
    for status in statuses:
        if status.name == container:
            ready = bool(status.ready)
        terminated = status.state.terminated if status.state else None
        if terminated is not None and terminated.exit_code not in (None, 0):
            failure = (
                f"container {status.name} exited with code {terminated.exit_code}"
                f" ({terminated.reason or 'Error'})"
            )
    return PodObservation(
        pod_name=pod.metadata.name,
        pod_uid=pod.metadata.uid or "",
        node_name=(pod.spec.node_name if pod.spec else None) or "",
        container_ready=ready,
        failure=failure,
    )


def _labels(obj: Any) -> dict[str, str]:
    return dict((obj.metadata.labels if obj.metadata else None) or {})


def _require_resource(resource: ResourceRef | None, what: str) -> ResourceRef:
    if resource is None:
        raise InvalidSpecError(f"{what}: a cluster capture needs the resource it works for")
    return resource


def in_use_references(api: Any) -> Callable[[], Awaitable[list[ProtectedRef]]]:
    """Retention's source on a cluster: the versions Ready resources reference and those
    admitted restore-target pods still wait for."""
    ready, waiting = ready_references(api), restore_target_references(api)

    async def read() -> list[ProtectedRef]:
        return [*await ready(), *await waiting()]

    return read


def restore_target_references(api: Any) -> Callable[[], Awaitable[list[ProtectedRef]]]:
    """The versions restore-target pods (in every namespace) still wait for: admitted by
    the webhook (its label and the checkpoint ID and version it set), not yet told how their
    restore went (no `restore-status`), and not finished. Such a pod may wait before its
    RestoreWorkflow starts (unscheduled, image pulling), where no running restore protects
    the version yet."""
    core = client.CoreV1Api(api)

    async def read() -> list[ProtectedRef]:
        listed = await call(
            core.list_pod_for_all_namespaces,
            label_selector=f"{RESTORE_TARGET_LABEL}=true",
            on=ApiCall("list", "pods"),
        )
        refs = []
        for pod in listed.items or []:
            meta, status = pod.metadata, pod.status
            if meta is None:
                continue
            labels, notes = (meta.labels or {}), (meta.annotations or {})
            checkpoint_id = labels.get(CHECKPOINT_ID_LABEL, "")
            if labels.get(RESTORE_TARGET_LABEL) != "true" or not checkpoint_id:
                continue  # the selector, checked again
            if RESTORE_STATUS_ANNOTATION in notes:
                continue  # restored or fell back: it waits no more
            if status is not None and status.phase in ("Succeeded", "Failed"):
                continue
            refs.append(
                ProtectedRef(
                    checkpoint_id=checkpoint_id,
                    version=notes.get(CHECKPOINT_VERSION_ANNOTATION, ""),
                    referrer=f"restore-target pod {meta.namespace}/{meta.name}",
                )
            )
        return refs

    return read


def ready_references(api: Any) -> Callable[[], Awaitable[list[ProtectedRef]]]:
    """Retention's source of the versions Ready Checkpoints and PodSnapshots reference (in
    every namespace): restore targets are shaped from them, so they are never deleted."""
    custom = client.CustomObjectsApi(api)

    async def read() -> list[ProtectedRef]:
        refs = []
        for kind, plural in PLURALS.items():
            listed = await call(
                custom.list_cluster_custom_object,
                GROUP,
                VERSION,
                plural,
                on=ApiCall("list", plural),
            )
            for obj in cast(dict[str, Any], listed).get("items", []):
                status, meta = obj.get("status") or {}, obj.get("metadata") or {}
                if status.get("phase") != Phase.READY.value or not status.get("checkpointID"):
                    continue
                refs.append(
                    ProtectedRef(
                        checkpoint_id=str(status["checkpointID"]),
                        version=str(status.get("version") or ""),
                        referrer=f"{kind} {meta.get('namespace')}/{meta.get('name')}",
                    )
                )
        return refs

    return read
