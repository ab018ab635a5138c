"""One active watcher replica: a coordination.k8s.io/v1 Lease elector.

kopf's own peering pauses every replica of equal priority, so the watcher runs kopf
standalone under this elector: a replica acquires the Lease (create, or take over one whose
holder stopped renewing), renews it every third of its duration, and stops kopf as soon as
a renewal fails or another holder appears. Writes carry the read `resourceVersion`, so two
replicas taking over at once cannot both win.

Its calls go through the one stack (`activities.kube.client.call`): a conflict or a Lease
gone means another replica moved first; an API server away while waiting for the Lease is
waited out (logged), while holding it ends the hold; a forbidden call is raised, naming the
Lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client

from activities.kube.client import ApiCall, call
from api.errors import ConflictError, NotFoundError, UnavailableError, WarmstartError

log = logging.getLogger(__name__)


def _micro(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _version(lease: client.V1Lease) -> str | None:
    """The read resourceVersion a write carries (optimistic concurrency)."""
    return lease.metadata.resource_version if lease.metadata else None


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

    def _on(self, verb: str) -> ApiCall:
        return ApiCall(verb, "Lease", self.namespace, self.name)

    async def _read(self) -> client.V1Lease:
        lease: client.V1Lease = await call(
            self._leases.read_namespaced_lease, self.name, self.namespace, on=self._on("read")
        )
        return lease

    async def _patch(self, body: dict[str, Any], verb: str) -> None:
        await call(
            self._leases.patch_namespaced_lease,
            self.name,
            self.namespace,
            body,
            on=self._on(verb),
        )

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
            await call(
                self._leases.create_namespaced_lease, self.namespace, body, on=self._on("create")
            )
            return True
        except ConflictError:
            pass  # there already: held, or free to take over?
        try:
            lease = await self._read()
        except NotFoundError:
            return False  # released and deleted meanwhile: the next attempt creates it
        spec = lease.spec
        holder = spec.holder_identity if spec else None
        renewed: datetime | None = spec.renew_time if spec else None
        duration = (spec.lease_duration_seconds if spec else None) or self.duration
        held = holder not in (None, "", self.identity)
        if held and renewed is not None and renewed + timedelta(seconds=duration) > now:
            return False  # held, and renewed recently
        transitions = ((spec.lease_transitions if spec else None) or 0) + (holder != self.identity)
        take = {
            "metadata": {"resourceVersion": _version(lease)},
            "spec": self._spec(now, transitions=transitions, acquired=now),
        }
        try:
            await self._patch(take, "take over")
        except (ConflictError, NotFoundError):
            return False  # someone else moved first
        log.info("%s took the lease %s over from %s", self.identity, self.name, holder)
        return True

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this replica holds the Lease (True) or `stop` is set (False)."""
        while not stop.is_set():
            try:
                if await self.try_acquire():
                    return True
            except UnavailableError as err:  # the API server is away: wait it out
                log.warning("%s waits for the lease: %s", self.identity, err)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.duration / 3)
        return False

    async def renew(self) -> bool:
        """Renew the Lease; False if it is no longer ours."""
        try:
            lease = await self._read()
        except NotFoundError:
            return False
        if lease.spec is None or lease.spec.holder_identity != self.identity:
            return False
        body = {
            "metadata": {"resourceVersion": _version(lease)},
            "spec": {"renewTime": _micro(datetime.now(UTC))},
        }
        try:
            await self._patch(body, "renew")
        except (ConflictError, NotFoundError):
            return False
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
            except WarmstartError as err:
                log.warning("%s could not renew the lease: %s", self.identity, err)
                return

    async def release(self) -> None:
        """Give the Lease up so another replica need not wait for it to expire."""
        try:
            lease = await self._read()
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            body = {
                "metadata": {"resourceVersion": _version(lease)},
                "spec": {"holderIdentity": None, "renewTime": None, "acquireTime": None},
            }
            await self._patch(body, "release")
        except WarmstartError as err:  # it expires by itself
            log.warning("%s could not release the lease: %s", self.identity, err)
