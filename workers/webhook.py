"""The admission webhook (`warmstart webhook`): AdmissionReview v1 over HTTPS.

- `POST /validate` — Checkpoint and PodSnapshot: the `api.resources` models' validation
  (the CRD's CEL rules included, with their messages); on UPDATE, `spec.identity` is
  immutable, and an update that leaves the spec as it was is allowed (finalizers and
  annotations of a resource written before a rule existed still move).
- `POST /mutate` — pods annotated `warmstart.dev/restore-from`: shaped as restore targets
  by `api.restore_pods` with a JSONPatch; the Checkpoint is read through the one
  Kubernetes stack (`workers.checkpoints`), and one that cannot be read (the API
  server away, slow or refusing) makes the pod start cold, with the reason.
- `POST /evict` — evictions (`pods/eviction` CREATE) of pods that opted in to capture
  before a drain: refused with HTTP 429, which `kubectl drain` retries, while the pod's
  capture runs, until its deadline (`workers.eviction`, decision 0044). Its configuration
  fails open: a webhook that is not there never blocks a drain.
- `GET /healthz`.

Anything that can reach the webhook's port can post a review (a NetworkPolicy can open the
port to the API server only where its address is known), so answers say nothing of any
namespace but the one the review is about: a review whose object is not in the review's
namespace is refused without details, only a Checkpoint of the pod's own namespace is ever
read, and where a restore target's version is stored is not written on the pod (nodes derive
it from the Checkpoint). With `WARMSTART_WEBHOOK__CLIENT_CA_FILE` the webhook answers reviews
only from a client presenting a certificate of that CA: the API server, configured to
authenticate to webhooks (docs/decisions/0024-the-webhook-answers-the-api-server.md).

A plain aiohttp server rather than kopf's admission server: every replica serves it,
whether or not it holds the watcher's Lease, with one certificate from a Secret (a rotated
Secret is served from the next handshake on, without a restart), and the
webhook configurations are deployed, not rewritten by each replica
(docs/decisions/0013-admission-webhook.md). dryRun requests are answered like any other:
reviews have no side effects.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import os
import signal
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jsonpatch
from aiohttp import web
from pydantic import ValidationError

from api.errors import InvalidSpecError, WarmstartError
from api.jobs import JobSettings
from api.resources import (
    IDENTITY_IMMUTABLE,
    Checkpoint,
    PodSnapshot,
    ResourceIdentity,
    identity_unchanged,
)
from api.restore_claims import restore_source, validation_message
from api.restore_pods import RestoreSettings, cold, loader_override, restore_pod
from workers.certificates import self_signed_certificate
from workers.checkpoints import ReadCheckpoint, checkpoint_reader
from workers.eviction import DrainReads, Evictions, eviction_wait
from workers.settings import Settings, WebhookSettings

logger = logging.getLogger(__name__)

VALIDATE_PATH, MUTATE_PATH, HEALTH_PATH = "/validate", "/mutate", "/healthz"
EVICT_PATH = "/evict"
ADMISSION_API_VERSION = "admission.k8s.io/v1"
_MODELS: dict[str, type[Checkpoint] | type[PodSnapshot]] = {
    "Checkpoint": Checkpoint,
    "PodSnapshot": PodSnapshot,
}
Review = dict[str, Any]  # an AdmissionResponse without its uid


# The one refusal of a review that an API server does not send: it says nothing more.
FOREIGN_OBJECT = "the review's object is not in the review's namespace"


def foreign(request: Mapping[str, Any]) -> bool:
    """Whether a review of a namespaced object does not hold together: no namespace, or an
    object (old or new) of another namespace than the review's. An API server never sends
    one; answering it would tell the sender about a namespace of its choosing."""
    namespace = request.get("namespace") or ""
    if not namespace:
        return True
    for obj in (request.get("object"), request.get("oldObject")):
        found = ((obj or {}).get("metadata") or {}).get("namespace")
        if found and found != namespace:
            return True
    return False


def review_resource(request: Mapping[str, Any]) -> Review:
    """The answer to a Checkpoint or PodSnapshot CREATE or UPDATE (anything else passes)."""
    model = _MODELS.get((request.get("kind") or {}).get("kind", ""))
    new, old = request.get("object"), request.get("oldObject")
    if model is None or request.get("operation") not in ("CREATE", "UPDATE") or new is None:
        return allowed()
    if foreign(request):
        return denied(FOREIGN_OBJECT)
    if old is not None:
        changed = _identity_change(old, new)
        if changed is not None:
            return denied(changed)
        if (old.get("spec") or {}) == (new.get("spec") or {}):
            return allowed()
    try:
        model.model_validate(new)
    except ValidationError as err:
        return denied(validation_message(err))
    return allowed()


def _identity_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """IDENTITY_IMMUTABLE when the update changes `spec.identity`, else None."""
    raw_old = (old.get("spec") or {}).get("identity")
    raw_new = (new.get("spec") or {}).get("identity")
    try:
        identity_unchanged(_identity(raw_old), _identity(raw_new))
    except ValidationError:  # one of them is not an identity: compare them as written
        if raw_old is not None and raw_old != raw_new:
            return IDENTITY_IMMUTABLE
    except ValueError as err:
        return str(err)
    return None


def _identity(raw: Any) -> ResourceIdentity | None:
    return None if raw is None else ResourceIdentity.model_validate(raw)


async def review_pod(
    request: Mapping[str, Any], *, read: ReadCheckpoint, settings: RestoreSettings
) -> Review:
    """The answer to a pod CREATE: no patch unless it asks to be restored; then the patch
    that shapes it as a restore target, or marks it cold; denied when it asks wrongly."""
    pod = request.get("object") or {}
    if (request.get("kind") or {}).get("kind") != "Pod" or request.get("operation") != "CREATE":
        return allowed()
    if foreign(request):
        return denied(FOREIGN_OBJECT)
    meta = pod.get("metadata") or {}
    namespace = str(request["namespace"])  # the pod's: its Checkpoint is read there only
    who = f"pod {namespace}/{meta.get('name') or meta.get('generateName', '') + '*'}"
    try:
        name = restore_source(pod)
        if name is None:
            return allowed()
        loader_override(pod)  # refused before anything is read
    except InvalidSpecError as err:
        logger.info("%s refused: %s", who, err)
        return denied(str(err))
    try:
        checkpoint = await read(namespace, name)
    except WarmstartError as err:  # the API server slow, away or refusing: the pod starts cold
        logger.warning("%s: %s", who, err)
        shaped = cold(
            copy.deepcopy(dict(pod)), f"checkpoint {name} could not be read ({err.reason})"
        )
    else:
        try:
            shaped = restore_pod(pod, checkpoint=checkpoint, settings=settings)
        except InvalidSpecError as err:
            return denied(str(err))
    patch = json_patch(pod, shaped)
    logger.info("%s from checkpoint %s: %d patch operations", who, name, len(patch))
    return allowed(patch=patch)


async def review_eviction(request: Mapping[str, Any], *, evictions: Evictions) -> Review:
    """The answer to an eviction: refused with 429 while the pod's capture before drain
    holds it (decision 0044); anything else passes."""
    resource = request.get("resource") or {}
    is_eviction = (resource.get("resource"), request.get("subResource")) == ("pods", "eviction")
    if not is_eviction or request.get("operation") != "CREATE" or not request.get("name"):
        return allowed()
    if foreign(request):
        return denied(FOREIGN_OBJECT)
    namespace, name = str(request["namespace"]), str(request["name"])
    dry_run = bool(request.get("dryRun"))
    wait = await eviction_wait(namespace, name, evictions=evictions, dry_run=dry_run)
    if wait is None:
        return allowed()
    logger.info("eviction of pod %s/%s held: %s", namespace, name, wait)
    return {
        "allowed": False,
        "status": {"code": 429, "reason": "TooManyRequests", "message": wait},
    }


def allowed(*, patch: list[dict[str, Any]] | None = None) -> Review:
    if not patch:
        return {"allowed": True}
    encoded = base64.b64encode(json.dumps(patch).encode()).decode()
    return {"allowed": True, "patchType": "JSONPatch", "patch": encoded}


def denied(message: str) -> Review:
    return {"allowed": False, "status": {"code": 422, "reason": "Invalid", "message": message}}


def json_patch(old: Any, new: Any) -> list[dict[str, Any]]:
    """RFC 6902 operations turning `old` into `new` (jsonpatch's diff: objects member by
    member, lists element by element)."""
    operations: list[dict[str, Any]] = jsonpatch.make_patch(old, new).patch
    return operations


def admission_app(
    *,
    read: ReadCheckpoint,
    settings: RestoreSettings,
    client_certificate: bool = False,
    drain: Evictions | None = None,
) -> web.Application:
    """The webhook's routes; with `client_certificate`, reviews are answered only to a
    client whose certificate the TLS context verified (`server_ssl_context`); evictions
    are reviewed with `drain`'s reads (without, that route is not served)."""

    async def resource(review: Mapping[str, Any]) -> Review:
        return review_resource(review)

    async def pod(review: Mapping[str, Any]) -> Review:
        return await review_pod(review, read=read, settings=settings)

    async def validate(request: web.Request) -> web.Response:
        _authenticated(request, required=client_certificate)
        return await _answer(request, resource)

    async def mutate(request: web.Request) -> web.Response:
        _authenticated(request, required=client_certificate)
        return await _answer(request, pod)

    async def evict(request: web.Request) -> web.Response:
        _authenticated(request, required=client_certificate)
        assert drain is not None

        async def eviction(review: Mapping[str, Any]) -> Review:
            return await review_eviction(review, evictions=drain)

        return await _answer(request, eviction)

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post(VALIDATE_PATH, validate)
    app.router.add_post(MUTATE_PATH, mutate)
    if drain is not None:
        app.router.add_post(EVICT_PATH, evict)
    app.router.add_get(HEALTH_PATH, health)
    return app


def _authenticated(request: web.Request, *, required: bool) -> None:
    """With client certificates required: 401, and nothing read, unless the TLS handshake
    verified one (a client presenting a certificate of another CA never gets this far)."""
    if not required:
        return
    transport = request.transport
    if transport is None or not transport.get_extra_info("peercert"):
        raise web.HTTPUnauthorized(text="a client certificate is required")


async def _answer(
    request: web.Request, review: Callable[[Mapping[str, Any]], Awaitable[Review]]
) -> web.Response:
    """Unwrap an AdmissionReview, review it, wrap the response with the request's uid."""
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="expected an AdmissionReview (JSON)") from None
    inner = body.get("request") if isinstance(body, dict) else None
    if not isinstance(inner, dict) or not inner.get("uid"):
        raise web.HTTPBadRequest(text="expected an AdmissionReview with request.uid")
    response = {"uid": inner["uid"], **(await review(inner))}
    return web.json_response(
        {"apiVersion": ADMISSION_API_VERSION, "kind": "AdmissionReview", "response": response}
    )


def _tls_context(
    cert_file: str | Path | None, key_file: str | Path | None, client_ca_file: str = ""
) -> ssl.SSLContext:
    """With `client_ca_file`, a client certificate is verified against that CA when one is
    presented (required by the review routes, not by `/healthz`, which kubelet probes).
    Without files, a context with no certificate (one is chosen per handshake)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_ca_file:
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cafile=client_ca_file)
    if cert_file is not None and key_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context


class RotatingCertificate:
    """The certificate and key files, served as they are now: each TLS handshake looks at
    the files (two stats; a mounted Secret is rotated by swapping a link, so the files'
    identity changes) and, when they changed, loads them into a fresh context, which that
    handshake and the later ones use. A pair that does not load (caught mid-rotation, or
    damaged) leaves the last good one serving, and is tried again once the files change
    again. Until a pair has loaded (the Secret not made yet: its volume is optional, and
    the kubelet fills it once the controller has made it) each handshake is refused, so the
    pod starts, is not ready, and serves from the first handshake after the files appear.
    Every context verifies clients against `client_ca_file`, if any."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = "") -> None:
        self._files = (cert_file, key_file)
        self._client_ca = client_ca_file
        self._stamp: tuple[tuple[int, ...], ...] | None = None
        self._current: ssl.SSLContext | None = None
        self._refused: tuple[tuple[int, ...], ...] | None = None
        if self.current() is None:
            logger.warning("webhook: waiting for the certificate files %s", ", ".join(self._files))

    def server_context(self) -> ssl.SSLContext:
        """The context to serve with: it hands each handshake the current certificate."""
        context = _tls_context(None, None, self._client_ca)
        context.sni_callback = self._choose
        return context

    def _look(self) -> tuple[tuple[int, ...], ...]:
        stamps = []
        for name in self._files:
            info = os.stat(name)  # through links: the files the names now lead to
            stamps.append((info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns))
        return tuple(stamps)

    def current(self) -> ssl.SSLContext | None:
        """The context of the files as they are now (the last good one if they do not load;
        None while none has)."""
        try:
            stamp = self._look()
        except OSError:
            return self._current  # a name missing (mid-rotation, or not made yet): serve on
        if stamp in (self._stamp, self._refused):
            return self._current
        try:
            fresh = _tls_context(*self._files, self._client_ca)
        except (OSError, ssl.SSLError) as err:
            self._refused = stamp
            logger.warning("webhook: the certificate files do not load (%s); serving on", err)
            return self._current
        loaded = "the rotated certificate" if self._current else "the certificate"
        self._stamp, self._current = stamp, fresh
        logger.info("webhook: serving %s of %s", loaded, self._files[0])
        return fresh

    def _choose(self, connection: Any, _server_name: str | None, _context: Any) -> int | None:
        """Called by OpenSSL on each ClientHello (with or without a server name)."""
        current = self.current()
        if current is None:
            return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE  # no certificate yet
        connection.context = current
        return None


def server_ssl_context(settings: WebhookSettings) -> ssl.SSLContext:
    """TLS with the configured certificate files (loaded again when they are rotated), else
    with a self-signed certificate; with `client_ca_file`, a client certificate is verified
    against that CA when one is presented (required by the review routes, not by
    `/healthz`, which kubelet probes)."""
    if settings.cert_file or settings.key_file:
        if not (settings.cert_file and settings.key_file):
            raise InvalidSpecError(
                "WARMSTART_WEBHOOK__CERT_FILE and WARMSTART_WEBHOOK__KEY_FILE go together"
            )
        return RotatingCertificate(
            settings.cert_file, settings.key_file, settings.client_ca_file
        ).server_context()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.client_ca_file:
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cafile=settings.client_ca_file)
    hosts = [h.strip() for h in settings.hosts.split(",") if h.strip()] or ["localhost"]
    cert, key = self_signed_certificate(hosts=hosts)
    logger.warning("webhook: no certificate configured, serving a self-signed one for %s", hosts)
    with tempfile.TemporaryDirectory() as scratch:  # load_cert_chain reads files only
        (Path(scratch) / "tls.crt").write_bytes(cert)
        (Path(scratch) / "tls.key").write_bytes(key)
        context.load_cert_chain(Path(scratch) / "tls.crt", Path(scratch) / "tls.key")
    return context


@asynccontextmanager
async def serving(
    app: web.Application, *, settings: WebhookSettings, context: ssl.SSLContext
) -> AsyncIterator[int]:
    """`app` served over HTTPS on the settings' host and port; yields the bound port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.create_server((settings.host, settings.port))
    try:
        await web.SockSite(runner, sock, ssl_context=context).start()
        yield int(sock.getsockname()[1])
    finally:
        await runner.cleanup()
        sock.close()


async def run_webhook(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Serve the webhook until `stop` is set (default: until SIGINT or SIGTERM)."""
    from kubernetes import client

    from activities.kube.client import api_client

    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    hook = settings.webhook
    api = api_client(settings.kube)
    try:
        read = checkpoint_reader(
            client.CustomObjectsApi(api), timeout_seconds=hook.read_timeout_seconds
        )
        restore = RestoreSettings(
            jobs=JobSettings(checkpoint_claim=settings.kube.checkpoint_claim),
            node_labels=hook.node_label_pairs(),
        )
        reads = DrainReads(
            core=client.CoreV1Api(api),
            custom=client.CustomObjectsApi(api),
            timeout_seconds=hook.read_timeout_seconds,
        )
        app = admission_app(
            read=read,
            settings=restore,
            client_certificate=bool(hook.client_ca_file),
            drain=Evictions(reads),
        )
        async with serving(app, settings=hook, context=server_ssl_context(hook)) as port:
            print(f"webhook: https on {hook.host}:{port}", flush=True)
            await stop.wait()
    finally:
        api.close()  # type: ignore[no-untyped-call]
