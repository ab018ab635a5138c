"""The webhook's certificate made and kept for the user (decision 0032): the controller's
Lease holder keeps a CA and a serving certificate for the webhook's Service in the TLS
Secret `warmstart-webhook-tls`, and that Secret's CA as the caBundle of the webhook
configurations it owns (`warmstart-validate`, `warmstart-restore-pods`).

One round (`WebhookCertificate.reconcile`), then again every `check_seconds`:

- the Secret missing: created; holding no pair that loads, a certificate not for the
  Service's name, not issued by its CA, or within `renew_days` of its or its CA's end:
  replaced (a patch carrying the read resourceVersion, so a write raced by another fails
  and the next round decides again; its type is left as it is, since it cannot change);
- each webhook of both configurations whose caBundle is not the Secret's `ca.crt`:
  patched (a configuration not there yet is waited for).

A round that finds everything right writes nothing. API errors are logged and the next
round tries again; the webhook pods load the files once the kubelet has updated them
(`workers.webhook.RotatingCertificate`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import logging
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes import client

from activities.kube.client import ApiCall, call
from api.access import (
    MUTATING_WEBHOOK,
    VALIDATING_WEBHOOK,
    WEBHOOK_SERVICE,
    WEBHOOK_TLS_SECRET,
)
from api.errors import ConflictError, InvalidSpecError, NotFoundError, WarmstartError
from workers.certificates import CA_KEY, judge, renewed, service_hosts
from workers.settings import CertificateSettings

log = logging.getLogger(__name__)
TLS_SECRET_TYPE = "kubernetes.io/tls"
CALL_TIMEOUT = 10.0


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _encoded(data: dict[str, bytes]) -> dict[str, str]:
    return {key: base64.b64encode(value).decode() for key, value in data.items()}


def _decoded(data: Mapping[str, bytes | str] | None) -> dict[str, bytes]:
    found = {}
    for key, value in (data or {}).items():
        with contextlib.suppress(ValueError):
            found[key] = base64.b64decode(value, validate=True)
    return found


class WebhookCertificate:
    """The Secret and the caBundles of the webhook in `namespace`, kept right."""

    def __init__(
        self,
        api: client.ApiClient,
        *,
        namespace: str,
        settings: CertificateSettings,
        clock: Callable[[], datetime.datetime] = _utc_now,
    ) -> None:
        if not 0 <= settings.renew_days < settings.validity_days:
            raise InvalidSpecError(
                "WARMSTART_CERTIFICATE__RENEW_DAYS must be at least 0 and less than "
                f"__VALIDITY_DAYS ({settings.renew_days}, {settings.validity_days})"
            )
        self._core = client.CoreV1Api(api)
        self._admission = client.AdmissionregistrationV1Api(api)
        self._sanitize = api.sanitize_for_serialization
        self.namespace, self.settings, self._clock = namespace, settings, clock
        self.hosts = service_hosts(WEBHOOK_SERVICE, namespace)

    def _on(self, verb: str, kind: str, name: str, namespace: str = "") -> ApiCall:
        return ApiCall(verb, kind, namespace, name)

    async def reconcile(self) -> bytes:
        """One round; returns the CA bundle (PEM) the configurations now carry."""
        bundle = await self._secret()
        await self._bundle(bundle)
        return bundle

    async def run(self, stop: asyncio.Event) -> None:
        """A round now, then every `check_seconds`, until `stop` is set."""
        while not stop.is_set():
            try:
                await self.reconcile()
            except WarmstartError as err:
                log.warning("webhook certificate in %s: %s", self.namespace, err)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.check_seconds)

    # --- the Secret --------------------------------------------------------------------

    async def _secret(self) -> bytes:
        """The Secret made right; its `ca.crt`."""
        on = self._on("read", "Secret", WEBHOOK_TLS_SECRET, self.namespace)
        try:
            secret = await call(
                self._core.read_namespaced_secret,
                WEBHOOK_TLS_SECRET,
                self.namespace,
                on=on,
                timeout=CALL_TIMEOUT,
            )
        except NotFoundError:
            return await self._create()
        now = self._clock()
        data = _decoded(secret.data)
        verdict = judge(
            data,
            host=self.hosts[-1],
            now=now,
            renew_before=datetime.timedelta(days=self.settings.renew_days),
        )
        if verdict.renew is None:
            return data[CA_KEY]
        log.info(
            "webhook certificate %s/%s is replaced: %s",
            self.namespace,
            WEBHOOK_TLS_SECRET,
            verdict.renew,
        )
        fresh = self._issue(verdict.previous_ca)
        stale: dict[str, str | None] = {key: None for key in data if key not in fresh}
        body = {
            "metadata": {"resourceVersion": secret.metadata and secret.metadata.resource_version},
            "data": {**stale, **_encoded(fresh)},
        }
        on = self._on("renew", "Secret", WEBHOOK_TLS_SECRET, self.namespace)
        await call(
            self._core.patch_namespaced_secret,
            WEBHOOK_TLS_SECRET,
            self.namespace,
            body,
            on=on,
            timeout=CALL_TIMEOUT,
        )
        return fresh[CA_KEY]

    async def _create(self) -> bytes:
        fresh = self._issue(b"")
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": TLS_SECRET_TYPE,
            "metadata": {
                "name": WEBHOOK_TLS_SECRET,
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/name": "warmstart"},
            },
            "data": _encoded(fresh),
        }
        on = self._on("create", "Secret", WEBHOOK_TLS_SECRET, self.namespace)
        try:
            await call(
                self._core.create_namespaced_secret,
                self.namespace,
                body,
                on=on,
                timeout=CALL_TIMEOUT,
            )
        except ConflictError:  # made meanwhile (by a replica that held the Lease before us)
            return await self._secret()
        log.info("webhook certificate %s/%s made", self.namespace, WEBHOOK_TLS_SECRET)
        return fresh[CA_KEY]

    def _issue(self, previous_ca: bytes) -> dict[str, bytes]:
        validity = datetime.timedelta(days=self.settings.validity_days)
        return renewed(previous_ca, hosts=self.hosts, now=self._clock(), validity=validity)

    # --- the caBundles -----------------------------------------------------------------

    async def _bundle(self, bundle: bytes) -> None:
        wanted = base64.b64encode(bundle).decode()
        configurations = (
            (
                "ValidatingWebhookConfiguration",
                VALIDATING_WEBHOOK,
                self._admission.read_validating_webhook_configuration,
                self._admission.patch_validating_webhook_configuration,
            ),
            (
                "MutatingWebhookConfiguration",
                MUTATING_WEBHOOK,
                self._admission.read_mutating_webhook_configuration,
                self._admission.patch_mutating_webhook_configuration,
            ),
        )
        for kind, name, read, patch in configurations:
            try:
                found = await call(
                    read, name, on=self._on("read", kind, name), timeout=CALL_TIMEOUT
                )
            except NotFoundError:
                log.warning("webhook certificate: %s %s is not there (yet)", kind, name)
                continue
            raw = self._sanitize(found)  # type: ignore[no-untyped-call]
            body = self._with_bundle(raw, wanted)
            if body is not None:
                on = self._on("patch", kind, name)
                await call(patch, name, body, on=on, timeout=CALL_TIMEOUT)
                log.info("webhook certificate: caBundle of %s %s written", kind, name)

    @staticmethod
    def _with_bundle(found: dict[str, Any], wanted: str) -> dict[str, Any] | None:
        """The patch giving every webhook of `found` the caBundle `wanted` (None: they all
        have it). The whole list, with the read resourceVersion: the list keyed by name
        (strategic merge), or replaced as a whole (a plain merge), comes out the same."""
        webhooks = found.get("webhooks") or []
        if all((w.get("clientConfig") or {}).get("caBundle") == wanted for w in webhooks):
            return None
        for webhook in webhooks:
            webhook.setdefault("clientConfig", {})["caBundle"] = wanted
        version = (found.get("metadata") or {}).get("resourceVersion")
        return {"metadata": {"resourceVersion": version}, "webhooks": webhooks}
