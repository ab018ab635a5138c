"""The webhook's side of capture before a drain (decision 0044): the reads an eviction's
review makes through the one Kubernetes stack, and why the eviction waits, if it does.

The pod is read first; only a pod that opted in costs more: its drain PodSnapshot, and,
while that is not made yet, its node. A read that fails lets the eviction go ahead, as a
webhook that is not there does (failurePolicy Ignore): a drain is never blocked by
warmstart being away. Before the PodSnapshot is made, the hold is counted from the cordon
as the node's managedFields date it, else from the first eviction of the pod this replica
held (`FirstHolds`): a controller that never makes it holds a drain no longer than the
pod's deadline (a little more across replicas, which each count from their first).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from activities.kube.client import ApiCall, call
from api.drain import MAX_DEADLINE_SECONDS, drain_capture, eviction_hold
from api.errors import InvalidSpecError, NotFoundError, WarmstartError
from api.resources import GROUP, VERSION

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DrainReads:
    """Reads of a pod, a node and a PodSnapshot (`kubernetes` CoreV1Api and
    CustomObjectsApi), each within `timeout_seconds`; None when not found."""

    core: Any
    custom: Any
    timeout_seconds: float

    async def pod(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        return await self._read(
            self.core.read_namespaced_pod,
            name,
            namespace,
            on=ApiCall("read", "Pod", namespace, name),
        )

    async def node(self, name: str) -> Mapping[str, Any] | None:
        return await self._read(self.core.read_node, name, on=ApiCall("read", "Node", "", name))

    async def snapshot(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        try:
            snapshot: Mapping[str, Any] = await call(
                self.custom.get_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                "podsnapshots",
                name,
                on=ApiCall("read", "PodSnapshot", namespace, name),
                timeout=self.timeout_seconds,
            )
        except NotFoundError:
            return None
        return snapshot

    async def _read(self, fn: Any, *args: Any, on: ApiCall) -> Mapping[str, Any] | None:
        try:
            obj = await call(fn, *args, on=on, timeout=self.timeout_seconds)
        except NotFoundError:
            return None
        found: Mapping[str, Any] = self.core.api_client.sanitize_for_serialization(obj)
        return found


class FirstHolds:
    """When this replica first held each pod's eviction before its PodSnapshot was made,
    by pod UID; kept the longest deadline, at most `max_entries` (the oldest dropped)."""

    def __init__(self, *, max_entries: int = 10_000) -> None:
        self._first: OrderedDict[str, datetime] = OrderedDict()
        self._max = max_entries

    def get(self, uid: str, now: datetime) -> datetime | None:
        while self._first:
            oldest_uid, oldest = next(iter(self._first.items()))
            if (now - oldest).total_seconds() <= MAX_DEADLINE_SECONDS:
                break
            del self._first[oldest_uid]
        return self._first.get(uid)

    def held(self, uid: str, now: datetime) -> None:
        if uid not in self._first:
            self._first[uid] = now
            while len(self._first) > self._max:
                self._first.popitem(last=False)


@dataclass
class Evictions:
    """What the webhook needs to answer evictions: its reads, and its first holds."""

    reads: DrainReads
    first_holds: FirstHolds = field(default_factory=FirstHolds)


async def eviction_wait(
    namespace: str,
    pod_name: str,
    *,
    evictions: Evictions,
    now: datetime | None = None,
    dry_run: bool = False,
) -> str | None:
    """Why the eviction of pod `namespace/pod_name` waits, or None: it may go ahead. A dry
    run is answered alike but starts no count (`FirstHolds`)."""
    reads, now = evictions.reads, now or datetime.now(UTC)
    try:
        pod = await reads.pod(namespace, pod_name)
        if pod is None:
            return None
        try:
            capture = drain_capture(pod)
        except InvalidSpecError as err:
            log.warning("eviction not held: %s", err)
            return None
        if capture is None:
            return None
        snapshot = await reads.snapshot(namespace, capture.snapshot_name)
        node_name = (pod.get("spec") or {}).get("nodeName") or ""
        node = await reads.node(node_name) if snapshot is None and node_name else None
    except WarmstartError as err:
        log.warning("eviction of pod %s/%s not held: %s", namespace, pod_name, err)
        return None
    uid = capture.pod_uid
    since = evictions.first_holds.get(uid, now) if snapshot is None else None
    hold = eviction_hold(pod, node=node, snapshot=snapshot, now=now, held_since=since)
    if hold is not None and snapshot is None and not dry_run:
        evictions.first_holds.held(uid, now)
    return hold
