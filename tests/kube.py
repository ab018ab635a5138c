"""A Kubernetes API for fast tests: kmock's emulator, taught the semantics our code relies
on and kmock lacks (importable as `tests.kube`).

Added: `uid`, `resourceVersion`, `generation` and `creationTimestamp` on create, the
namespace from the URL, a new `resourceVersion` on every change, and optimistic
concurrency: a patch carrying a stale `metadata.resourceVersion` gets 409 Conflict, as
from a real API server.

Lists and watches as an API server's: a list answers the resourceVersion it shows; a watch
from a resourceVersion sends every change after it (also those made before the watch began),
each event with a resourceVersion of its own (a deletion too); `allowWatchBookmarks` gets
the bookmarks `bookmark()` sends; `timeoutSeconds` ends the watch; after `compact()`, a watch
from an older resourceVersion gets the ERROR event 410 Gone ("too old resource version").
For long runs (the scale bench), it can forget the requests it answered (`forgets_requests`).

Label and field selectors are ignored, as kmock ignores them, unless `selectors` is set: the
code must work where an API server sends more than it asked for. The scale bench sets it
(fifty node watches would otherwise each receive every pod's events, which no API server
sends).
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp.web
import attrs
import kmock
from kmock._internal import aiobus, enums, rendering
from kmock._internal.k8s import KubernetesObjectConflictError
from kubernetes import client

T = TypeVar("T")


class _Clock:
    """The resourceVersions: one counter for every object, as etcd's revision."""

    last = 999

    @classmethod
    def tick(cls) -> str:
        cls.last += 1
        return str(cls.last)


_SERIAL = (enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE, enums.action.LIST)
_CHANGES = ("ADDED", "MODIFIED", "DELETED")


@attrs.mutable(weakref_slot=True)
class _HistoryBus(aiobus.Bus[Any]):
    """A resource's event bus that stamps each change with a resourceVersion of its own and
    keeps them all, for watches from a resourceVersion."""

    history: list[tuple[int, Any]] = attrs.field(factory=list)

    async def put(self, *items: Any) -> None:
        stamped = []
        for item in items:
            if isinstance(item, dict) and item.get("type") in _CHANGES:
                item = _stamped(item, after=self.history[-1][0] if self.history else 0)
                self.history.append((_version_of(item), item))
            stamped.append(item)
        await super().put(*stamped)


def _stamped(event: dict[str, Any], *, after: int) -> dict[str, Any]:
    """`event` with a resourceVersion newer than `after`: kmock keeps the old one for a
    deletion and for the finalizers' soft deletion. Set in place: the event's metadata is
    that of the stored object, which so gets the new resourceVersion too, as from an API
    server."""
    if _version_of(event) <= after:
        event["object"].setdefault("metadata", {})["resourceVersion"] = _Clock.tick()
    return event


def _version_of(event: Mapping[str, Any]) -> int:
    version = (event.get("object") or {}).get("metadata", {}).get("resourceVersion") or 0
    return int(version) if str(version).isdigit() else 0


class Emulator(kmock.KubernetesEmulator):
    """`conflicts`: how many of the next patches to answer 409 whatever they carry (a
    concurrent writer, deterministically). `compacted`: the oldest resourceVersion a watch
    may start from. `selectors`: lists and watches honour label and field selectors.
    `forgets_requests`: a request is dropped from kmock's log of requests once answered
    (kmock matches each request against every request it has logged, so a long-running
    emulator slows down with every request served; tests read the log, the scale bench
    does not)."""

    conflicts = 0
    compacted = 0
    selectors = False
    forgets_requests = False

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._buses = collections.defaultdict(_HistoryBus)
        # Writes and lists one at a time: a list's resourceVersion then covers every change
        # it shows, and none it does not.
        self._serial = asyncio.Lock()

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        try:
            if request.action not in _SERIAL:
                return await self._handle_one(request)
            async with self._serial:
                return await self._handle_one(request)
        finally:
            if self.forgets_requests:
                self._requests[:] = [r for r in self._requests if r is not request]

    async def _handle_one(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        data = request.data if isinstance(request.data, dict) else None
        if request.action == enums.action.UPDATE and self.conflicts > 0:
            self.conflicts -= 1
            raise KubernetesObjectConflictError()
        if request.resource is not None and data is not None:
            meta = data.setdefault("metadata", {})
            if request.action == enums.action.CREATE:
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("generation", 1)
                meta.setdefault("creationTimestamp", _now())
                if request.namespace and not meta.get("namespace"):
                    meta["namespace"] = request.namespace
                meta["resourceVersion"] = _Clock.tick()
            elif request.action == enums.action.UPDATE and request.name is not None:
                key = (request.resource, request.namespace, request.name)
                stored = self.objects[key] if key in self.objects else None  # noqa: SIM401
                current = stored.get("metadata", {}) if stored is not None else {}
                wanted = meta.get("resourceVersion")
                if wanted and current and wanted != current.get("resourceVersion"):
                    raise KubernetesObjectConflictError()
                meta["resourceVersion"] = _Clock.tick()
        return await super()._handle(request)

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        listed = await super()._serve_list(request)
        assert isinstance(listed, dict)
        if self.selectors:
            listed["items"] = [i for i in listed["items"] if _selected(request.params, i)]
        return {**listed, "metadata": {"resourceVersion": str(_Clock.last)}}

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        yield b""  # the headers: streaming has begun
        params = request.params
        since = params.get("resourceVersion") or ""
        if since not in ("", "0") and int(since) < self.compacted:
            yield _gone(since, self.compacted)
            return
        assert request.resource is not None
        bus = self._buses[request.resource]
        mark = await bus.mark()  # before the backlog is read: nothing falls in between
        try:
            if since in ("", "0"):  # no list before it: every object, as added
                backlog, floor = await self._current(request), 0
            else:
                floor = int(since)
                backlog = [event for version, event in bus.history if version > floor]
                floor = max([floor, *(_version_of(event) for event in backlog)])
            for event in backlog:
                if self._matches(request, event):
                    yield event
            bookmarks = params.get("allowWatchBookmarks") == "true"
            timeout = float(params.get("timeoutSeconds") or 0) or None
            async for event in _until(bus.stream(since=mark), timeout):
                if event.get("type") == "BOOKMARK":
                    if bookmarks:
                        yield event
                elif _version_of(event) > floor and self._matches(request, event):
                    yield event
        finally:
            await bus.unmark(mark)

    async def _current(self, request: rendering.Request) -> list[dict[str, Any]]:
        async with self._lock:
            return [
                {"type": "ADDED", "object": obj.raw}
                for (resource, _, _), obj in self.objects.items()
                if resource == request.resource and not obj.deleted
            ]

    async def bookmark(self, plural: str) -> str:
        """A bookmark to every watch of `plural` that asked for them; its resourceVersion."""
        version = _Clock.tick()
        event = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": version}}}
        for resource, bus in list(self._buses.items()):
            if resource.plural == plural:
                await bus.put(event)
        return version

    def compact(self) -> None:
        """Forget the history so far: a watch from an older resourceVersion gets 410."""
        self.compacted = _Clock.last

    def _matches(self, request: rendering.Request, event: Mapping[str, Any]) -> bool:
        if not _matches(request, event):
            return False
        return not self.selectors or _selected(request.params, event.get("object") or {})


def _gone(since: str, compacted: int) -> dict[str, Any]:
    message = f"too old resource version: {since} ({compacted})"
    status = {"status": "Failure", "message": message, "reason": "Expired", "code": 410}
    return {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", **status}}


def _matches(request: rendering.Request, event: Mapping[str, Any]) -> bool:
    meta = (event.get("object") or {}).get("metadata") or {}
    namespace_ok = request.namespace is None or meta.get("namespace") == request.namespace
    return namespace_ok and (request.name is None or meta.get("name") == request.name)


def _selected(params: Mapping[str, str], obj: Mapping[str, Any]) -> bool:
    """Whether `obj` passes the `labelSelector` and `fieldSelector` of a request: terms
    `key=value`, `key==value`, `key!=value`, and for labels `key` and `!key` (what this code
    sends; set-based terms are refused)."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, params.get("labelSelector", "").split(",")):
        if term.startswith("!") or not any(op in term for op in "=!"):
            if " " in term:
                raise NotImplementedError(f"label selector term {term!r}")
            if (term.lstrip("!") in labels) == term.startswith("!"):
                return False
        elif not _holds(term, labels.get):
            return False
    for term in filter(None, params.get("fieldSelector", "").split(",")):
        if not _holds(term, lambda path: _field(obj, path)):
            return False
    return True


def _holds(term: str, value_of: Callable[[str], Any]) -> bool:
    """An equality term (`k=v`, `k==v`, `k!=v`) against `value_of(k)` (None: absent)."""
    negated = "!=" in term
    key, _, wanted = term.replace("!=", "=", 1).replace("==", "=", 1).partition("=")
    found = value_of(key.strip())
    return (found is not None and str(found) == wanted.strip()) != negated


def _field(obj: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted field path (`spec.nodeName`), None where there is none."""
    found: Any = obj
    for part in path.split("."):
        found = found.get(part) if isinstance(found, Mapping) else None
    return found


async def _until(stream: AsyncIterator[Any], timeout: float | None) -> AsyncIterator[Any]:
    """The items of `stream` until `timeout` seconds have passed (None: for ever)."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        left = None if deadline is None else deadline - loop.time()
        if left is not None and left <= 0:
            return
        try:
            yield await asyncio.wait_for(anext(stream), left)
        except (TimeoutError, StopAsyncIteration):
            return


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_CLUSTER_SCOPED = {
    "Namespace",
    "CustomResourceDefinition",
    "Node",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
}
_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}
# Declared for discovery (kopf watches what discovery lists as watchable) and listed empty
# before any object of theirs exists: (key, kind, subresources).
RESOURCES = (
    ("v1/namespaces", "Namespace", {"status"}),
    ("apiextensions.k8s.io/v1/customresourcedefinitions", "CustomResourceDefinition", set()),
    ("v1/nodes", "Node", {"status"}),
    ("v1/pods", "Pod", {"status"}),
    ("v1/secrets", "Secret", set()),
    ("batch/v1/jobs", "Job", {"status"}),
    ("events.k8s.io/v1/events", "Event", set()),
    ("coordination.k8s.io/v1/leases", "Lease", set()),
    (
        "admissionregistration.k8s.io/v1/validatingwebhookconfigurations",
        "ValidatingWebhookConfiguration",
        set(),
    ),
    (
        "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
        "MutatingWebhookConfiguration",
        set(),
    ),
    ("warmstart.dev/v1alpha1/checkpoints", "Checkpoint", {"status"}),
    ("warmstart.dev/v1alpha1/podsnapshots", "PodSnapshot", {"status"}),
)


class Cluster:
    """An emulated API server and a real client configured for it."""

    def __init__(self, emulator: Emulator | None, url: str, token: str | None = None) -> None:
        """`emulator`: kmock's (declared here), or None for a real API server (with its
        bearer `token` and a self-signed certificate)."""
        self.emulator = emulator
        self.url, self.token = url.rstrip("/"), token
        for key, kind, subresources in RESOURCES if emulator is not None else ():
            emulator.resources[key] = kmock.ResourceInfo(  # type: ignore[union-attr]
                kind=kind,
                namespaced=kind not in _CLUSTER_SCOPED,
                verbs=_VERBS,
                subresources=subresources,
            )
        configuration = client.Configuration()
        configuration.host = self.url
        if token is not None:
            configuration.api_key = {"authorization": f"Bearer {token}"}
            configuration.verify_ssl = False
        self.api = client.ApiClient(configuration)
        self.custom = client.CustomObjectsApi(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.core = client.CoreV1Api(self.api)
        self.events = client.EventsV1Api(self.api)
        self.leases = client.CoordinationV1Api(self.api)

    def close(self) -> None:
        """Close the client's connection pool (its sockets would otherwise be left to GC)."""
        self.api.close()

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A call of the synchronous client, off the loop the emulator serves on."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def create(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        ns = body["metadata"].get("namespace", "default")
        await self.run(
            self.custom.create_namespaced_custom_object,
            "warmstart.dev",
            "v1alpha1",
            ns,
            plural,
            body,
        )
        # kmock answers a create with 200, for which the client returns nothing: read it.
        return await self.get(plural, ns, body["metadata"]["name"])

    async def get(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        found: dict[str, Any] = await self.run(
            self.custom.get_namespaced_custom_object,
            "warmstart.dev",
            "v1alpha1",
            namespace,
            plural,
            name,
        )
        return found


async def start_cluster() -> AsyncIterator[Cluster]:
    async with Emulator() as emulator, kmock.Server(emulator) as server:
        cluster = Cluster(emulator, str(server.url))
        try:
            yield cluster
        finally:
            cluster.close()


def checkpoint_body(name: str, template: dict[str, Any], **spec: Any) -> dict[str, Any]:
    """A Checkpoint in namespace `inference` whose identity is named after it."""
    return {
        "apiVersion": "warmstart.dev/v1alpha1",
        "kind": "Checkpoint",
        "metadata": {"name": name, "namespace": "inference"},
        "spec": {
            "identity": {"model": f"meta-llama/{name}", "backendFramework": "vllm"},
            "job": {"podTemplateSpec": template},
            **spec,
        },
    }
