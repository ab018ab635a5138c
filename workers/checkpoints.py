"""Checkpoints read through the one Kubernetes stack: by the webhook when a pod asks to be
restored, and by a node when a restore target is scheduled on it, kept a short while
(`CheckpointViews`) so that the restore starts without a round trip once its standby runs.

Reads are by namespace and name, never by checkpoint ID: the ID is a hash anyone can compute,
the namespace is what a pod cannot choose.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from activities.kube.client import ApiCall, call
from api.errors import NotFoundError, WarmstartError
from api.resources import GROUP, VERSION

log = logging.getLogger(__name__)

ReadCheckpoint = Callable[[str, str], Awaitable[Mapping[str, Any] | None]]
Key = tuple[str, str]  # (namespace, name)


def checkpoint_reader(custom: Any, *, timeout_seconds: float) -> ReadCheckpoint:
    """Reads a Checkpoint through `custom` (a kubernetes CustomObjectsApi) and the one
    stack; None when there is none. Past `timeout_seconds` (the client's retries included)
    it raises UnavailableError and leaves the call to finish in its thread."""

    async def read(namespace: str, name: str) -> Mapping[str, Any] | None:
        try:
            found: Mapping[str, Any] = await call(
                custom.get_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                "checkpoints",
                name,
                on=ApiCall("read", "Checkpoint", namespace, name),
                timeout=timeout_seconds,
            )
        except NotFoundError:
            return None
        return found

    return read


class CheckpointViews:
    """Checkpoints as this node read them lately, by namespace and name: at most one read of
    each in flight, an answer (found or not) kept `ttl_seconds`, at most `max_entries`.
    A failed read is not kept."""

    def __init__(
        self,
        read: ReadCheckpoint,
        *,
        ttl_seconds: float = 30.0,
        max_entries: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._ttl = ttl_seconds
        self._max = max_entries
        self._clock = clock
        self._kept: dict[Key, tuple[float, Mapping[str, Any] | None]] = {}
        self._flights: dict[Key, asyncio.Task[Mapping[str, Any] | None]] = {}
        self.reads = 0  # reads sent to the API server (for whoever checks the round trips)

    def read_ahead(self, namespace: str, name: str) -> None:
        """Start reading the Checkpoint unless a fresh answer is kept or a read is under way
        (a restore target was scheduled here: its standby is not running yet)."""
        key = (namespace, name)
        if self._fresh(key) is None and key not in self._flights:
            self._flight(key)

    async def get(
        self, namespace: str, name: str, *, fresh: bool = False
    ) -> tuple[Mapping[str, Any] | None, bool]:
        """The Checkpoint (None: not found) and whether it was kept from an earlier read;
        `fresh`: read it again whatever is kept. WarmstartError when it cannot be read."""
        key = (namespace, name)
        if not fresh:
            kept = self._fresh(key)
            if kept is not None:
                return kept[1], True
        flight = self._flights.get(key) if not fresh else None
        if flight is None:
            flight = self._flight(key)
        return await asyncio.shield(flight), False

    def close(self) -> None:
        """Cancel the reads under way."""
        for flight in list(self._flights.values()):
            flight.cancel()

    def _fresh(self, key: Key) -> tuple[float, Mapping[str, Any] | None] | None:
        kept = self._kept.get(key)
        if kept is not None and self._clock() - kept[0] > self._ttl:
            del self._kept[key]
            return None
        return kept

    def _flight(self, key: Key) -> asyncio.Task[Mapping[str, Any] | None]:
        self.reads += 1

        async def read() -> Mapping[str, Any] | None:
            return await self._read(*key)

        flight = asyncio.create_task(read(), name=f"read checkpoint {key[0]}/{key[1]}")
        self._flights[key] = flight
        began = self._clock()
        flight.add_done_callback(lambda done: self._landed(key, done, began))
        return flight

    def _landed(self, key: Key, done: asyncio.Task[Mapping[str, Any] | None], began: float) -> None:
        """Keep what a read found, stamped when it began (its age is the answer's); a read
        that began before the one kept is not kept."""
        if self._flights.get(key) is done:
            del self._flights[key]
        if done.cancelled():
            return
        err = done.exception()
        if err is not None:
            if not isinstance(err, WarmstartError):
                log.warning("checkpoint %s/%s: read failed: %r", *key, err)
            return  # not kept: the next look reads again
        kept = self._kept.pop(key, None)
        if kept is not None and kept[0] > began:
            self._kept[key] = kept  # a later read landed first
            return
        if len(self._kept) >= self._max:
            with contextlib.suppress(StopIteration):
                del self._kept[next(iter(self._kept))]  # the oldest
        self._kept[key] = (began, done.result())
