"""A Kubernetes API for fast tests: kmock's emulator, taught the semantics our code relies
on and kmock lacks (importable as `tests.kube`).

Added: `uid`, `resourceVersion`, `generation` and `creationTimestamp` on create, the
namespace from the URL, a new `resourceVersion` on every change, and optimistic
concurrency: a patch carrying a stale `metadata.resourceVersion` gets 409 Conflict, as
from a real API server.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp.web
import kmock
from kmock._internal import enums, rendering
from kmock._internal.k8s import KubernetesObjectConflictError
from kubernetes import client

T = TypeVar("T")
_versions = itertools.count(1000)


class Emulator(kmock.KubernetesEmulator):
    """`conflicts`: how many of the next patches to answer 409 whatever they carry (a
    concurrent writer, deterministically)."""

    conflicts = 0

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
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
                meta["resourceVersion"] = str(next(_versions))
            elif request.action == enums.action.UPDATE and request.name is not None:
                key = (request.resource, request.namespace, request.name)
                stored = self.objects[key] if key in self.objects else None  # noqa: SIM401
                current = stored.get("metadata", {}) if stored is not None else {}
                wanted = meta.get("resourceVersion")
                if wanted and current and wanted != current.get("resourceVersion"):
                    raise KubernetesObjectConflictError()
                meta["resourceVersion"] = str(next(_versions))
        return await super()._handle(request)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "Node"}
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
