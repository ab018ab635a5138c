"""The node's side of remote storage: a backend for the location a request names (of its
kind, `backends`), and transfers run in a thread while the activity heartbeats progress.

Each kind is opened once per worker and keeps what its backends share (an S3 client takes
tens of milliseconds to build, and its connection pool is what keeps parallel parts
fast). Credentials never come with a request: the kind's standard chain, or a Secret the
request names, read through `SecretReader` (the kube API on a cluster node).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from temporalio import activity

from activities.contracts import Heartbeat, RemoteStorage
from activities.storage.backends import BackendKind, KindContext, SecretReader, kind_factory
from activities.storage.objectstore import Backend
from activities.storage.objectstore.transfer import (
    ProgressCallback,
    TransferProgress,
    TransferSettings,
)
from api.errors import WarmstartError
from api.reasons import Reason

__all__ = ["RemoteStores", "SecretReader", "heartbeating", "in_thread"]
T = TypeVar("T")
HEARTBEAT_EVERY_SECONDS = 1.0


class RemoteStores:
    """Backends for the locations requests name, of whichever kind they are."""

    def __init__(
        self,
        *,
        transfer: TransferSettings,
        own_endpoints: Mapping[str, tuple[str, str]] | None = None,
        read_secret: SecretReader | None = None,
    ) -> None:
        """`own_endpoints`: kind → this worker's (endpoint, region), for locations of that
        kind that name none."""
        self._context = KindContext(transfer=transfer, read_secret=read_secret)
        self._own = dict(own_endpoints or {})
        self._kinds: dict[str, BackendKind] = {}
        self._lock = threading.Lock()

    def resolved(self, storage: RemoteStorage) -> RemoteStorage:
        """`storage` as this worker reaches it: its own endpoint and region where it names
        none (no I/O)."""
        endpoint, region = self._own.get(storage.kind, ("", ""))
        if (endpoint and not storage.endpoint) or (region and not storage.region):
            update = {"endpoint": storage.endpoint or endpoint, "region": storage.region or region}
            storage = storage.model_copy(update=update)
        return storage

    def backend(self, storage: RemoteStorage) -> Backend:
        storage = self.resolved(storage)
        with self._lock:
            kind = self._kinds.get(storage.kind)
            if kind is None:
                kind = self._kinds[storage.kind] = kind_factory(storage.kind)(self._context)
        return kind.open(storage)


class TransferStopped(WarmstartError):
    """The activity was cancelled: the transfer's threads stop at their next block."""

    default_reason = Reason.CANCELLED


class TransferBeat:
    """A transfer's progress callback (called from its threads): keeps the latest report
    for the activity's heartbeat, and stops the transfer once the activity is cancelled."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.latest: TransferProgress | None = None
        self._stopped = threading.Event()

    def __call__(self, progress: TransferProgress) -> None:
        if self._stopped.is_set():
            raise TransferStopped(f"{self.stage} stopped: the activity was cancelled")
        self.latest = progress

    def stop(self) -> None:
        self._stopped.set()

    def heartbeat(self) -> Heartbeat:
        latest = self.latest
        if latest is None:
            return Heartbeat(stage=self.stage)
        return Heartbeat(
            stage=self.stage,
            bytes=latest.bytes_done,
            bytes_total=latest.bytes_total,
            rate=round(latest.rate, 1),
        )


async def heartbeating(stage: str, work: Callable[[ProgressCallback], Awaitable[T]]) -> T:
    """Await `work(progress)` while heartbeating its progress every second; a cancel stops
    the transfer and waits for its threads, so nothing is written after the activity ends."""
    beat = TransferBeat(stage)
    task = asyncio.ensure_future(work(beat))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=HEARTBEAT_EVERY_SECONDS)
            if done:
                return task.result()
            activity.heartbeat(beat.heartbeat())
    except asyncio.CancelledError:
        beat.stop()
        await asyncio.wait({task})
        raise


async def in_thread(stage: str, call: Callable[[ProgressCallback], T]) -> T:
    """`call(progress)`, a blocking transfer, in a thread, heartbeated as `heartbeating`."""

    async def run(progress: ProgressCallback) -> T:
        return await asyncio.to_thread(call, progress)

    return await heartbeating(stage, run)
