"""One active watcher replica: a coordination.k8s.io/v1 Lease elector that judges the Lease
as client-go's leaderelection does (decisions 0011, 0026).

kopf's own peering pauses every replica of equal priority, so the watcher runs kopf
standalone under this elector. Its rules:

- **Expiry on this replica's own clock.** A replica keeps the Lease record it last read and
  the local monotonic time at which it saw that record change. It may take the Lease over
  only when `leaseDurationSeconds` have passed on that clock without a change. The holder's
  `renewTime` is never compared with this replica's wall clock: a holder whose clock is far
  off keeps the Lease for as long as it renews, and loses it one lease duration after it
  stopped. (`renewTime` and `acquireTime` are written for people reading the Lease.)
- **Renewals have a deadline.** The holder renews every `retry_period`. Each attempt (read,
  then a write carrying the read resourceVersion) is bounded by what is left of
  `renew_deadline`, counted from the start of the last attempt that succeeded; a failed one
  (transport error, timeout, 429, 5xx, conflict, refusal) is retried with a capped backoff
  until then. Past the deadline the holder steps down (`hold` returns and kopf stops): since
  `renew_deadline` < the lease duration, it has stopped before any other replica may take
  over. A record naming another holder ends the hold at once.
- **Candidates wait out the API server.** A candidate tries every `retry_period` (jittered);
  transport errors, timeouts, 429 and 5xx are logged and retried with backoff. A forbidden
  call is raised, naming the Lease (retrying cannot help).
- Writes carry the read resourceVersion: two replicas taking over at once cannot both win.
  A clean stop releases the Lease (holder emptied): a candidate takes it at its next try.
  So does a holder whose work (kopf) ended by itself: it steps down and releases, and the
  next holder starts that work afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes import client

from activities.kube.client import ApiCall, call
from activities.kube.watch import Backoff
from api.errors import (
    ConflictError,
    InvalidSpecError,
    NotFoundError,
    UnavailableError,
    WarmstartError,
)

log = logging.getLogger(__name__)

JITTER = 1.2  # client-go's JitterFactor: a candidate waits retry_period * [1, 1.2)
# client-go's defaults (15 s, 10 s, 2 s) as parts of the lease duration.
RENEW_DEADLINE_PART, RETRY_PERIOD_PART = 2 / 3, 2 / 15


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _micro(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _Outcome(enum.Enum):
    HELD = "held"  # this replica holds the Lease now (acquired or renewed)
    TAKEN = "taken"  # another replica holds it, and has renewed within its duration
    RACED = "raced"  # another writer moved first: read again


def _record(lease: client.V1Lease) -> tuple[Any, ...]:
    """What a change of the Lease is judged by: its spec and its resourceVersion."""
    spec, meta = lease.spec, lease.metadata
    return (
        spec.holder_identity if spec else None,
        spec.lease_duration_seconds if spec else None,
        spec.acquire_time if spec else None,
        spec.renew_time if spec else None,
        spec.lease_transitions if spec else None,
        meta.resource_version if meta else None,
    )


def _version(lease: client.V1Lease) -> str | None:
    """The read resourceVersion a write carries (optimistic concurrency)."""
    return lease.metadata.resource_version if lease.metadata else None


async def _stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Wait `seconds` or until `stop` is set; True if it is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(seconds, 0.0))
    return stop.is_set()


class LeaseElector:
    def __init__(
        self,
        api: client.ApiClient,
        *,
        namespace: str,
        identity: str,
        name: str = "warmstart-watcher",
        duration_seconds: int = 15,
        renew_deadline_seconds: float | None = None,
        retry_period_seconds: float | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        """`clock`: the wall clock written into `acquireTime` and `renewTime` (never read
        back to judge expiry). Without a renew deadline and retry period they are client-go's
        defaults scaled to the duration (15 s: 10 s and 2 s)."""
        self._leases = client.CoordinationV1Api(api)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.duration = duration_seconds
        self.renew_deadline = renew_deadline_seconds or duration_seconds * RENEW_DEADLINE_PART
        self.retry_period = retry_period_seconds or duration_seconds * RETRY_PERIOD_PART
        if not self.duration > self.renew_deadline > self.retry_period * JITTER > 0:
            raise InvalidSpecError(
                f"lease {name}: needs duration ({self.duration} s) > renew deadline "
                f"({self.renew_deadline} s) > {JITTER} * retry period ({self.retry_period} s)"
            )
        self._clock = clock
        self._backoff = Backoff(initial=self.retry_period / 4, cap=self.retry_period)
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0  # time.monotonic() when `_observed` was first seen
        self._renewed_at: float | None = None  # monotonic start of the last attempt held

    def _on(self, verb: str) -> ApiCall:
        return ApiCall(verb, "Lease", self.namespace, self.name)

    # --- one attempt -----------------------------------------------------------------

    async def _attempt(self, deadline: float) -> _Outcome:
        """client-go's tryAcquireOrRenew: read the Lease (create it if there is none), and
        write this replica in as holder if it is ours, free, or unchanged for a lease
        duration on our clock. Each call ends by `deadline` (monotonic) or raises
        UnavailableError."""
        started = time.monotonic()
        now = self._clock()

        def left() -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UnavailableError(
                    f"Lease {self.namespace}/{self.name}: no answer within the renew deadline"
                )
            return remaining

        try:
            lease: client.V1Lease = await call(
                self._leases.read_namespaced_lease,
                self.name,
                self.namespace,
                on=self._on("read"),
                timeout=left(),
            )
        except NotFoundError:
            return await self._create(now, started, left())
        record = _record(lease)
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        spec = lease.spec
        holder = (spec.holder_identity if spec else None) or ""
        duration = (spec.lease_duration_seconds if spec else None) or self.duration
        if holder not in ("", self.identity) and time.monotonic() < self._observed_at + duration:
            return _Outcome.TAKEN  # changed within a lease duration, on our clock
        ours = holder == self.identity
        acquired = (spec.acquire_time if spec and ours else None) or now
        transitions = (spec.lease_transitions if spec else None) or 0
        body = {
            "metadata": {"resourceVersion": _version(lease)},
            "spec": self._spec(now, acquired=acquired, transitions=transitions + (not ours)),
        }
        try:
            written: client.V1Lease = await call(
                self._leases.patch_namespaced_lease,
                self.name,
                self.namespace,
                body,
                on=self._on("renew" if ours else "take over"),
                timeout=left(),
            )
        except (ConflictError, NotFoundError):
            return _Outcome.RACED  # someone else wrote (or deleted) it meanwhile
        if not ours:
            log.info("%s took the lease %s over from %s", self.identity, self.name, holder or "-")
        return self._held(written, started)

    async def _create(self, now: datetime, started: float, timeout: float) -> _Outcome:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": self._spec(now, acquired=now, transitions=0),
        }
        try:
            created: client.V1Lease = await call(
                self._leases.create_namespaced_lease,
                self.namespace,
                body,
                on=self._on("create"),
                timeout=timeout,
            )
        except ConflictError:
            return _Outcome.RACED  # another replica created it first
        return self._held(created, started)

    def _held(self, lease: client.V1Lease, started: float) -> _Outcome:
        self._observed, self._observed_at = _record(lease), time.monotonic()
        self._renewed_at = started
        return _Outcome.HELD

    def _spec(self, now: datetime, *, acquired: datetime, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.duration,
            "acquireTime": _micro(acquired),
            "renewTime": _micro(now),
            "leaseTransitions": transitions,
        }

    async def try_acquire(self) -> bool:
        """One attempt to acquire or renew: True if this replica holds the Lease now."""
        outcome = await self._attempt(time.monotonic() + self.renew_deadline)
        return outcome is _Outcome.HELD

    async def renew(self) -> bool:
        """One renewal (the same attempt): False if the Lease is another's or moved meanwhile."""
        return await self.try_acquire()

    # --- candidate and holder --------------------------------------------------------

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this replica holds the Lease (True) or `stop` is set (False). An API
        server away is waited out with backoff; a forbidden or refused call is raised."""
        log.info("%s is a candidate for the lease %s", self.identity, self.name)
        failures = 0
        while not stop.is_set():
            try:
                if await self.try_acquire():
                    return True
                failures, delay = 0, self.retry_period * random.uniform(1.0, JITTER)
            except UnavailableError as err:
                failures += 1
                delay = self._backoff.delay(failures)
                log.warning("%s waits for the lease: %s", self.identity, err)
            if await _stopped(stop, delay):
                break
        return False

    async def hold(self, stop: asyncio.Event, alive: Callable[[], bool] = lambda: True) -> None:
        """Renew every retry period until `stop` is set, or until this replica must step
        down: another holder in the record, no renewal held within the renew deadline of
        the last one that did, or `alive()` false (the work it leads has ended)."""
        while not await _stopped(stop, self.retry_period):
            if not alive():
                log.warning("%s steps down: the work it leads has ended", self.identity)
                return
            if not await self._renew_by_deadline(stop):
                return

    async def _renew_by_deadline(self, stop: asyncio.Event) -> bool:
        """Renew, retrying until the renew deadline; False: step down."""
        deadline = (self._renewed_at or time.monotonic()) + self.renew_deadline
        failures = 0
        while time.monotonic() < deadline:
            try:
                outcome = await self._attempt(deadline)
            except WarmstartError as err:
                failures += 1
                log.warning(
                    "%s could not renew the lease (attempt %d): %s", self.identity, failures, err
                )
            else:
                if outcome is _Outcome.HELD:
                    if failures:
                        log.info("%s renewed the lease after %d failures", self.identity, failures)
                    return True
                if outcome is _Outcome.TAKEN:
                    holder = self._observed[0] if self._observed else "?"
                    log.warning("%s lost the lease %s to %s", self.identity, self.name, holder)
                    return False
                failures += 1  # raced: read again after a short pause
            pause = min(self._backoff.delay(failures), deadline - time.monotonic())
            if await _stopped(stop, pause):
                return True  # stopping: the caller releases
        log.warning(
            "%s steps down: no renewal of the lease %s held within %.1f s",
            self.identity,
            self.name,
            self.renew_deadline,
        )
        return False

    async def release(self) -> None:
        """Give the Lease up so another replica need not wait for it to expire."""
        self._renewed_at = None
        timeout = self.renew_deadline
        try:
            lease: client.V1Lease = await call(
                self._leases.read_namespaced_lease,
                self.name,
                self.namespace,
                on=self._on("read"),
                timeout=timeout,
            )
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            body = {
                "metadata": {"resourceVersion": _version(lease)},
                "spec": {"holderIdentity": None, "renewTime": None, "acquireTime": None},
            }
            await call(
                self._leases.patch_namespaced_lease,
                self.name,
                self.namespace,
                body,
                on=self._on("release"),
                timeout=timeout,
            )
        except WarmstartError as err:  # it expires by itself
            log.warning("%s could not release the lease: %s", self.identity, err)
