"""The watcher's capture before a drain (decision 0044): kopf handlers over Nodes and the
pods that opted in, registered into the watcher's registry by `register_drain`.

When a node is cordoned, each pod on it that opted in (`api.drain`) and is running with its
container Ready gets its drain PodSnapshot; so does such a pod that becomes Ready on a node
already cordoned. The PodSnapshot handler of `workers.watcher` then starts its capture, and
the webhook holds the pod's evictions until it ends (`workers.eviction`). Two kopf indices
hold what the handlers need (opted-in pods by node, cordoned nodes), so a cordon costs one
create per pod and no reads; kopf fills both before any handler runs, so a restarted watcher
finds every cordoned node's pods again. A create answered AlreadyExists is the PodSnapshot
of an earlier event, replica or cordon: nothing is made twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf
from kubernetes import client

from activities.kube.client import ApiCall, Login, api_client, call
from api.drain import (
    CAPTURE_ON_DRAIN_ANNOTATION,
    DrainCapture,
    capturable,
    drain_capture,
    snapshot_for,
)
from api.errors import ConflictError, ForbiddenError, InvalidSpecError, WarmstartError
from api.resources import GROUP, VERSION

_OPTED_IN = {CAPTURE_ON_DRAIN_ANNOTATION: kopf.PRESENT}


def register_drain(registry: kopf.OperatorRegistry, login: Login) -> None:
    """Add the capture-before-drain handlers to `registry`; PodSnapshots are created with
    the watcher's one login."""
    # Pods (namespace, UID) whose PodSnapshot this process made or found, or whose create was
    # refused, during their node's cordon: node status updates then cost no create. Dropped
    # when the node is uncordoned (a later cordon looks again) or the pod is deleted.
    made: set[tuple[str, str]] = set()
    apis: list[client.ApiClient] = []  # made in kopf's loop on first use, closed at its end

    def custom() -> client.CustomObjectsApi:
        if not apis:
            apis.append(api_client(login))
        return client.CustomObjectsApi(apis[0])

    @kopf.on.cleanup(registry=registry)
    def close(**_: Any) -> None:
        while apis:
            apis.pop().close()  # type: ignore[no-untyped-call]

    @kopf.index("", "v1", "pods", id="drain_pods", annotations=_OPTED_IN, registry=registry)
    def drain_pods(body: kopf.Body, spec: kopf.Spec, **_: Any) -> dict[str, Any]:
        return {spec.get("nodeName") or "": dict(body)}

    @kopf.index("", "v1", "nodes", id="cordoned_nodes", registry=registry)
    def cordoned_nodes(name: str, spec: kopf.Spec, **_: Any) -> dict[str, bool]:
        return {name: bool(spec.get("unschedulable"))}

    async def capture(pod: dict[str, Any], logger: kopf.Logger) -> None:
        try:
            wanted = drain_capture(pod)
        except InvalidSpecError as err:
            logger.warning("not captured before drain: %s", err)
            return
        if wanted is None or not capturable(pod, wanted):
            return
        key = (wanted.namespace, wanted.pod_uid)
        if key in made:
            return
        try:
            await _create(custom(), wanted)
        except ConflictError as err:
            if not err.exists:
                raise
        except ForbiddenError as err:  # a namespace that did not apply tenant.yaml
            logger.error("capture before drain of pod %s: %s", wanted.pod_name, err)
            made.add(key)  # said once per cordon; the webhook's hold ends at the deadline
            return
        except WarmstartError as err:  # the API server away: the next event tries again
            logger.warning("capture before drain of pod %s: %s", wanted.pod_name, err)
            return
        made.add(key)
        logger.info(
            "capture before drain: PodSnapshot %s/%s for pod %s",
            wanted.namespace,
            wanted.snapshot_name,
            wanted.pod_name,
        )

    @kopf.on.event("", "v1", "nodes", registry=registry)
    async def on_node(
        event: kopf.RawEvent,
        name: str,
        spec: kopf.Spec,
        logger: kopf.Logger,
        **kwargs: Any,
    ) -> None:
        pods: kopf.Index[str, dict[str, Any]] = kwargs["drain_pods"]  # the index above
        on_node = list(pods.get(name, []))
        if event.get("type") == "DELETED" or not spec.get("unschedulable"):
            made.difference_update(_key(pod) for pod in on_node)
            return
        for pod in on_node:
            await capture(pod, logger)

    @kopf.on.event("", "v1", "pods", annotations=_OPTED_IN, registry=registry)
    async def on_drain_pod(
        event: kopf.RawEvent,
        body: kopf.Body,
        spec: kopf.Spec,
        logger: kopf.Logger,
        **kwargs: Any,
    ) -> None:
        node = spec.get("nodeName") or ""
        if event.get("type") == "DELETED":
            made.discard(_key(body))
            return
        if not node:
            return
        nodes: kopf.Index[str, bool] = kwargs["cordoned_nodes"]  # the index above
        if any(nodes.get(node, [])):
            await capture(dict(body), logger)


def _key(pod: Mapping[str, Any]) -> tuple[str, str]:
    meta = pod.get("metadata") or {}
    return meta.get("namespace") or "default", meta.get("uid") or ""


async def _create(custom: client.CustomObjectsApi, wanted: DrainCapture) -> None:
    body = snapshot_for(wanted)
    await call(
        custom.create_namespaced_custom_object,
        GROUP,
        VERSION,
        wanted.namespace,
        "podsnapshots",
        body,
        on=ApiCall("create", "PodSnapshot", wanted.namespace, wanted.snapshot_name),
    )
