"""One active watcher replica: a coordination.k8s.io/v1 Lease elector.

kopf's own peering pauses every replica of equal priority, so the watcher runs kopf
standalone under this elector: a replica acquires the Lease (create, or take over one whose
holder stopped renewing), renews it every third of its duration, and stops kopf as soon as
a renewal fails or another holder appears. Writes carry the read `resourceVersion`, so two
replicas taking over at once cannot both win.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)


def _micro(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    def __init__(
        self,
        api: client.ApiClient,
        *,
        namespace: str,
        identity: str,
        name: str = "warmstart-watcher",
        duration_seconds: int = 15,
    ) -> None:
        self._leases = client.CoordinationV1Api(api)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.duration = duration_seconds

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    def _spec(self, now: datetime, *, transitions: int, acquired: datetime) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.duration,
            "acquireTime": _micro(acquired),
            "renewTime": _micro(now),
            "leaseTransitions": transitions,
        }

    async def try_acquire(self) -> bool:
        """One attempt: True if this replica holds the Lease now."""
        now = datetime.now(UTC)
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": self._spec(now, transitions=0, acquired=now),
        }
        try:
            await self._call(self._leases.create_namespaced_lease, self.namespace, body)
            return True
        except ApiException as err:
            if err.status != 409:
                raise
        lease = await self._call(self._leases.read_namespaced_lease, self.name, self.namespace)
        spec = lease.spec
        holder = spec.holder_identity if spec else None
        renewed: datetime | None = spec.renew_time if spec else None
        duration = (spec.lease_duration_seconds if spec else None) or self.duration
        held = holder not in (None, "", self.identity)
        if held and renewed is not None and renewed + timedelta(seconds=duration) > now:
            return False  # held, and renewed recently
        transitions = ((spec.lease_transitions if spec else None) or 0) + (holder != self.identity)
        take = {
            "metadata": {"resourceVersion": lease.metadata.resource_version},
            "spec": self._spec(now, transitions=transitions, acquired=now),
        }
        try:
            await self._call(self._leases.patch_namespaced_lease, self.name, self.namespace, take)
        except ApiException as err:
            if err.status in (404, 409):
                return False  # someone else moved first
            raise
        log.info("%s took the lease %s over from %s", self.identity, self.name, holder)
        return True

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this replica holds the Lease (True) or `stop` is set (False)."""
        while not stop.is_set():
            if await self.try_acquire():
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.duration / 3)
        return False

    async def renew(self) -> bool:
        """Renew the Lease; False if it is no longer ours."""
        lease = await self._call(self._leases.read_namespaced_lease, self.name, self.namespace)
        if lease.spec is None or lease.spec.holder_identity != self.identity:
            return False
        body = {
            "metadata": {"resourceVersion": lease.metadata.resource_version},
            "spec": {"renewTime": _micro(datetime.now(UTC))},
        }
        try:
            await self._call(self._leases.patch_namespaced_lease, self.name, self.namespace, body)
        except ApiException as err:
            if err.status in (404, 409):
                return False
            raise
        return True

    async def hold(self, stop: asyncio.Event) -> None:
        """Renew until `stop` is set or the Lease is lost (then return)."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.duration / 3)
                return
            except TimeoutError:
                pass
            try:
                if not await self.renew():
                    log.warning("%s lost the lease %s", self.identity, self.name)
                    return
            except (ApiException, OSError) as err:
                log.warning("%s could not renew the lease: %s", self.identity, err)
                return

    async def release(self) -> None:
        """Give the Lease up so another replica need not wait for it to expire."""
        try:
            lease = await self._call(self._leases.read_namespaced_lease, self.name, self.namespace)
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            body = {
                "metadata": {"resourceVersion": lease.metadata.resource_version},
                "spec": {"holderIdentity": None, "renewTime": None, "acquireTime": None},
            }
            await self._call(self._leases.patch_namespaced_lease, self.name, self.namespace, body)
        except (ApiException, OSError) as err:
            log.warning("%s could not release the lease: %s", self.identity, err)
