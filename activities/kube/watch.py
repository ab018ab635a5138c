"""The one watch of Kubernetes objects: list, then watch from the list's resourceVersion,
until told to stop.

- The list (page by page) records its resourceVersion and hands over what changed against
  what the watch knew: ADDED and MODIFIED for new and changed objects, DELETED for those
  gone (nothing for the unchanged, so a list again repeats nothing).
- The watch asks for bookmarks (`allowWatchBookmarks`); every event and every bookmark moves
  the resourceVersion on. A watch the server ends (`timeoutSeconds`) or a broken stream is
  followed by the next from where it stood: nothing lost, nothing twice.
- 410 Gone (the answer, or an ERROR event in the stream): the resourceVersion is too old;
  list again.
- Any other failure (connection, timeout, 5xx, 403, an unreadable line) is logged and
  retried after an exponential backoff with a cap; a success resets it. The loop never ends
  by itself: `Watch.health` says how it stands (state, resourceVersion, failures in a row,
  the last error) for whoever checks, and each failure and recovery is logged.
- The handler's own failures are logged; they never end the watch.

The requests are aiohttp's (cancelling the watch closes its stream), with the credentials of
the one login (`activities.kube.client.configuration`); failures map as its calls' do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes import client as kube

from activities.kube.client import (
    TRANSPORT_ERRORS,
    ApiCall,
    api_error,
    authorization,
    transport_error,
)
from api.errors import ExpiredError, UnavailableError, WarmstartError

log = logging.getLogger(__name__)

_CHANGES = ("ADDED", "MODIFIED", "DELETED")
_LOUD_AFTER = 5  # failures in a row past which each is logged as an error
_AT_ONCE_SECONDS = 1.0  # a watch ended this soon, empty, is counted as a failure


@dataclass(frozen=True)
class WatchEvent:
    """One change: `type` ADDED, MODIFIED or DELETED, and the object as the API server
    sent it (DELETED: its last state)."""

    type: str
    object: Mapping[str, Any]


Handler = Callable[[WatchEvent], Awaitable[None]]


@dataclass
class WatchHealth:
    """How a watch stands, for whoever checks (a readiness probe, a test)."""

    state: str = "starting"  # listing, watching, backing off, stopped
    resource_version: str = ""
    failures: int = 0  # in a row: 0 again once a list or a watch is answered
    relists: int = 0  # lists after a 410
    bookmarks: int = 0
    events: int = 0  # handed to the handler
    last_error: str = ""

    @property
    def healthy(self) -> bool:
        return self.failures == 0 and self.state in ("listing", "watching")


@dataclass(frozen=True)
class Backoff:
    """Exponential: `initial` seconds after the first failure, times `factor` after each
    further one, never over `cap`; jittered down by up to a fifth so that replicas spread."""

    initial: float = 0.5
    factor: float = 2.0
    cap: float = 30.0

    def delay(self, failures: int) -> float:
        base = min(self.cap, self.initial * self.factor ** max(failures - 1, 0))
        return base * random.uniform(0.8, 1.0)


class Watch:
    """A list and watch of `path` (e.g. `/api/v1/pods`) on the API server of
    `configuration`, handing each change to `handler`."""

    def __init__(
        self,
        configuration: kube.Configuration,
        *,
        path: str,
        kind: str,
        handler: Handler,
        namespace: str = "",
        label_selector: str = "",
        field_selector: str = "",
        timeout_seconds: int = 60,
        backoff: Backoff | None = None,
        page_size: int = 500,
    ) -> None:
        """`kind` and `namespace` name what is watched in messages; the selectors go to the
        API server with every list and watch."""
        self._configuration = configuration
        self._url = configuration.host.rstrip("/") + path
        self._on = ApiCall("watch", kind, namespace)
        self._list_on = ApiCall("list", kind, namespace)
        self._tls: ssl.SSLContext | bool | None = None  # read at the first request
        self._handler = handler
        selectors = (("labelSelector", label_selector), ("fieldSelector", field_selector))
        self._selectors = {key: value for key, value in selectors if value}
        self._timeout = timeout_seconds
        self._backoff = backoff or Backoff()
        self._page_size = page_size
        self._known: dict[tuple[str, str], Mapping[str, Any]] = {}
        self.health = WatchHealth()

    async def run(self, stop: asyncio.Event) -> None:
        """Watch until `stop` is set. The loop retries every failure itself; should it end
        all the same (a bug), that is logged and raised here, never passed over."""
        looping = asyncio.ensure_future(self._loop())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({looping, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (looping, stopping):
                task.cancel()
            await asyncio.gather(looping, stopping, return_exceptions=True)
            self.health.state = "stopped"
        if not looping.cancelled() and looping.exception() is not None:
            log.error("%s ended: %r", self._on, looping.exception())
            raise looping.exception()  # type: ignore[misc]

    async def _loop(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self._timeout + 30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                try:
                    if not self.health.resource_version:
                        await self._list(session)
                    await self._watch(session)
                except ExpiredError as err:
                    self.health.relists += 1
                    self.health.resource_version = ""
                    log.info("%s: %s; listing again", self._on, err)
                except Exception as err:  # never end silently: say so, wait, try again
                    await self._back_off(err)

    async def _back_off(self, err: Exception) -> None:
        if isinstance(err, (*TRANSPORT_ERRORS, ValueError)) and not isinstance(err, WarmstartError):
            err = transport_error(self._on, err)
        ours = isinstance(err, WarmstartError)
        health = self.health
        health.failures += 1
        health.state = "backing off"
        health.last_error = str(err) if ours else f"{self._on}: {err!r}"
        delay = self._backoff.delay(health.failures)
        log.log(
            logging.WARNING if health.failures < _LOUD_AFTER else logging.ERROR,
            "%s (failure %d in a row; trying again in %.1f s)",
            health.last_error,
            health.failures,
            delay,
            exc_info=not ours,
        )
        await asyncio.sleep(delay)

    def _answered(self) -> None:
        if self.health.failures:
            log.info("%s answered again after %d failures", self._on, self.health.failures)
        self.health.failures, self.health.last_error = 0, ""

    # --- the list --------------------------------------------------------------------

    async def _list(self, session: aiohttp.ClientSession) -> None:
        self.health.state = "listing"
        params = {**self._selectors, "limit": str(self._page_size)}
        listed: dict[tuple[str, str], Mapping[str, Any]] = {}
        version = ""
        while True:
            try:
                page = await self._get(session, params)
            except ExpiredError as err:  # a continue token too old: a failure, not a relist
                raise UnavailableError(str(err)) from err
            for item in page.get("items") or []:
                listed[_key(item)] = item
            meta = page.get("metadata") or {}
            version = version or str(meta.get("resourceVersion") or "")
            if not meta.get("continue"):
                break
            params["continue"] = str(meta["continue"])
        self._answered()
        changes = _changes(self._known, listed)
        self._known = listed
        self.health.resource_version = version
        for change in changes:
            await self._deliver(change)

    async def _get(self, session: aiohttp.ClientSession, params: dict[str, str]) -> Any:
        async with session.get(
            self._url,
            params=params,
            headers=self._headers(),
            ssl=self._ssl(),
            timeout=aiohttp.ClientTimeout(total=self._timeout),
        ) as reply:
            if reply.status != 200:
                raise api_error(self._list_on, reply.status, await reply.text(), reply.reason)
            return await reply.json(content_type=None)

    # --- the watch -------------------------------------------------------------------

    async def _watch(self, session: aiohttp.ClientSession) -> None:
        """One watch from the current resourceVersion, until the server ends it."""
        self.health.state = "watching"
        params = {
            **self._selectors,
            "watch": "true",
            "resourceVersion": self.health.resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self._timeout),
        }
        loop = asyncio.get_running_loop()
        began, received = loop.time(), 0
        async with session.get(
            self._url, params=params, headers=self._headers(), ssl=self._ssl()
        ) as reply:
            if reply.status != 200:
                raise api_error(self._on, reply.status, await reply.text(), reply.reason)
            # Answered: once an event arrives, or the stream has stayed open a while (a
            # server that ends each watch at once is still failing).
            settled = loop.call_later(_AT_ONCE_SECONDS, self._answered)
            try:
                pending = b""
                async for chunk in reply.content.iter_any():
                    *lines, pending = (pending + chunk).split(b"\n")
                    for line in lines:
                        if line.strip():
                            received += 1
                            self._answered()
                            await self._receive(json.loads(line))
                if pending.strip():  # the last line, without its newline
                    received += 1
                    await self._receive(json.loads(pending))
            finally:
                settled.cancel()
        if not received and loop.time() - began < _AT_ONCE_SECONDS:
            raise UnavailableError(f"{self._on}: the API server ended the watch at once")

    async def _receive(self, event: Mapping[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            raise api_error(self._on, obj.get("code"), obj, obj.get("reason"))
        version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if kind == "BOOKMARK":
            self.health.bookmarks += 1
        elif kind in _CHANGES:
            fresh = self._remember(str(kind), obj)
            if fresh:
                await self._deliver(WatchEvent(str(kind), obj))
        else:
            log.warning("%s: an event of unknown type %r left out", self._on, kind)
        if version:
            self.health.resource_version = version

    def _remember(self, kind: str, obj: Mapping[str, Any]) -> bool:
        """Record the change; False if it tells nothing new (seen already)."""
        key = _key(obj)
        known = self._known.get(key)
        if kind == "DELETED":
            return self._known.pop(key, None) is not None
        self._known[key] = obj
        return known is None or _version(known) != _version(obj)

    async def _deliver(self, event: WatchEvent) -> None:
        self.health.events += 1
        try:
            await self._handler(event)
        except Exception:  # one object's trouble must not end the watch for all
            namespace, name = _key(event.object)
            log.exception("%s: %s %s/%s not handled", self._on, event.type, namespace, name)

    def _ssl(self) -> ssl.SSLContext | bool:
        if self._tls is None:
            self._tls = _ssl(self._configuration)
        return self._tls

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = authorization(self._configuration)
        if token:
            headers["Authorization"] = token
        return headers


def _changes(
    known: Mapping[tuple[str, str], Mapping[str, Any]],
    listed: Mapping[tuple[str, str], Mapping[str, Any]],
) -> list[WatchEvent]:
    """What a list shows against what was known: gone, new, changed (a new UID under a known
    name is the old object gone and a new one added)."""
    changes = []
    for key, gone in known.items():
        now = listed.get(key)
        if now is None or _uid(now) != _uid(gone):
            changes.append(WatchEvent("DELETED", gone))
    for key, new in listed.items():
        old = known.get(key)
        if old is None or _uid(new) != _uid(old):
            changes.append(WatchEvent("ADDED", new))
        elif _version(new) != _version(old):
            changes.append(WatchEvent("MODIFIED", new))
    return changes


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _uid(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("uid") or "")


def _version(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def _ssl(configuration: kube.Configuration) -> ssl.SSLContext | bool:
    """TLS as the login has it: verified against its CA (and a client certificate where it
    has one), or not verified where it says so."""
    if not configuration.verify_ssl:
        return False
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file or None)
    return context
