"""The webhook's certificate made and kept by the controller (decision 0032): against a real
kube-apiserver (tests/apiserver.py) holding the install's webhook configurations, the Secret
made, the caBundles written, a TLS client trusting that caBundle served by the webhook from
the Secret's files; an ending certificate and a damaged Secret replaced; nothing written
when all is right. The judgement of a Secret's data on its own, without an API server."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cryptography import x509
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from activities.kube.client import api_client
from api.access import MUTATING_WEBHOOK, VALIDATING_WEBHOOK, WEBHOOK_TLS_SECRET
from api.errors import InvalidSpecError
from api.jobs import JobSettings
from api.restore_pods import RestoreSettings
from tests.apiserver import APISERVER_SKIP, ApiServer, installed, running_apiserver
from tests.kube import Cluster
from tests.kustomize import webhook_configurations
from workers.certificates import (
    CA_KEY,
    CERT_KEY,
    KEY_KEY,
    issue,
    judge,
    self_signed_certificate,
    service_hosts,
)
from workers.settings import CertificateSettings, KubeSettings, WebhookSettings
from workers.webhook import admission_app, server_ssl_context, serving
from workers.webhook_certificate import WebhookCertificate

pytestmark = pytest.mark.timeout(120)
NAMESPACE = "warmstart-system"
HOSTS = service_hosts("warmstart-webhook", NAMESPACE)
HOST = HOSTS[-1]  # warmstart-webhook.warmstart-system.svc: what the API server calls
YEAR, MONTH = datetime.timedelta(days=365), datetime.timedelta(days=30)
OK = "HTTP/1.0 200 OK"  # the answer to the HTTP/1.0 request of `handshake`


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# --- a Secret's data judged ------------------------------------------------------------


def verdict(data: dict[str, bytes]) -> str | None:
    return judge(data, host=HOST, now=_now(), renew_before=MONTH).renew


def test_a_fresh_pair_serves_and_what_does_not_is_named() -> None:
    fresh = issue(hosts=HOSTS, now=_now(), validity=YEAR)
    assert verdict(fresh) is None
    other = issue(hosts=HOSTS, now=_now(), validity=YEAR)
    cert, key = self_signed_certificate(hosts=[HOST])
    cases = {
        "no tls.crt": {KEY_KEY: fresh[KEY_KEY], CA_KEY: fresh[CA_KEY]},
        "does not load": {**fresh, CERT_KEY: b"garbage"},
        "its key is not the certificate's": {**fresh, KEY_KEY: other[KEY_KEY]},
        "its CA did not issue its certificate": {**fresh, CA_KEY: other[CA_KEY]},
        "it is not for": issue(hosts=["elsewhere.svc"], now=_now(), validity=YEAR),
        "its certificate expires at": issue(
            hosts=HOSTS, now=_now() - YEAR + MONTH / 2, validity=YEAR
        ),
        "its certificate is not valid yet": issue(hosts=HOSTS, now=_now() + MONTH, validity=YEAR),
    }
    for reason, data in cases.items():
        found = verdict(data)
        assert found is not None and found.startswith(reason), (reason, found)
    # A self-signed certificate for the name is its own CA: it serves.
    assert verdict({CERT_KEY: cert, KEY_KEY: key, CA_KEY: cert}) is None


def test_the_renewal_window_must_lie_within_the_validity() -> None:
    api = client.ApiClient()
    try:
        with pytest.raises(InvalidSpecError, match="RENEW_DAYS"):
            WebhookCertificate(
                api,
                namespace=NAMESPACE,
                settings=CertificateSettings(validity_days=30, renew_days=30),
            )
    finally:
        api.close()  # type: ignore[no-untyped-call]


# --- against the real API server -------------------------------------------------------


@pytest.fixture(scope="module")
def apiserver() -> Iterator[ApiServer]:
    if APISERVER_SKIP is not None:
        pytest.skip(APISERVER_SKIP)
    yield from running_apiserver()


@pytest_asyncio.fixture(scope="module")
async def kube(apiserver: ApiServer) -> AsyncIterator[Cluster]:
    cluster = await installed(apiserver, (NAMESPACE,))
    yield cluster
    cluster.close()


@pytest_asyncio.fixture
async def cluster(kube: Cluster) -> AsyncIterator[Cluster]:
    """No Secret yet; the install's webhook configurations as `kubectl apply -k` makes
    them (no caBundle)."""
    admission = client.AdmissionregistrationV1Api(kube.api)
    kinds = {
        "ValidatingWebhookConfiguration": (
            admission.create_validating_webhook_configuration,
            admission.delete_validating_webhook_configuration,
        ),
        "MutatingWebhookConfiguration": (
            admission.create_mutating_webhook_configuration,
            admission.delete_mutating_webhook_configuration,
        ),
    }
    await _absent(kube.run(kube.core.delete_namespaced_secret, WEBHOOK_TLS_SECRET, NAMESPACE))
    for doc in webhook_configurations():
        create, delete = kinds[doc["kind"]]
        await _absent(kube.run(delete, doc["metadata"]["name"]))
        await kube.run(create, doc)
    yield kube


async def _absent(deleting: Any) -> None:
    try:
        await deleting
    except ApiException as err:
        assert err.status == 404, err


@pytest.fixture
def keeper(apiserver: ApiServer) -> Iterator[Callable[..., WebhookCertificate]]:
    """The controller's certificate step, as the controller builds it (its clients closed
    after the test)."""
    login = KubeSettings(
        server=apiserver.url, token_file=str(apiserver.token_file), insecure_skip_tls_verify=True
    )
    made: list[client.ApiClient] = []

    def build(**kwargs: Any) -> WebhookCertificate:
        made.append(api_client(login))
        settings = CertificateSettings()
        return WebhookCertificate(made[-1], namespace=NAMESPACE, settings=settings, **kwargs)

    yield build
    for api in made:
        api.close()  # type: ignore[no-untyped-call]


async def secret(cluster: Cluster) -> client.V1Secret:
    found: client.V1Secret = await cluster.run(
        cluster.core.read_namespaced_secret, WEBHOOK_TLS_SECRET, NAMESPACE
    )
    return found


def data(found: client.V1Secret) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (found.data or {}).items()}


async def bundles(cluster: Cluster) -> dict[str, list[str | None]]:
    """Each configuration's webhooks' caBundles (base64), and its resourceVersion."""
    admission = client.AdmissionregistrationV1Api(cluster.api)
    found = {}
    for name, read in (
        (VALIDATING_WEBHOOK, admission.read_validating_webhook_configuration),
        (MUTATING_WEBHOOK, admission.read_mutating_webhook_configuration),
    ):
        configuration = await cluster.run(read, name)
        found[name] = [configuration.metadata.resource_version] + [
            hook.client_config.ca_bundle for hook in configuration.webhooks
        ]
    return found


async def handshake(tmp_path: Path, served: dict[str, bytes], trusted: bytes) -> str:
    """The webhook serving `served` (the Secret's files, as the kubelet mounts them) on
    127.0.0.1, asked for /healthz by a client that trusts `trusted` (PEM) only and checks
    the name the API server calls it by; the answer's first line."""
    folder = tmp_path / f"tls-{x509.load_pem_x509_certificate(served[CERT_KEY]).serial_number}"
    folder.mkdir(exist_ok=True)
    for name in (CERT_KEY, KEY_KEY):
        (folder / name).write_bytes(served[name])
    settings = WebhookSettings(
        host="127.0.0.1", port=0, cert_file=str(folder / CERT_KEY), key_file=str(folder / KEY_KEY)
    )

    async def no_checkpoint(namespace: str, name: str) -> None:
        return None

    app = admission_app(
        read=no_checkpoint, settings=RestoreSettings(jobs=JobSettings(checkpoint_claim="c"))
    )
    context = ssl.create_default_context(cadata=trusted.decode())
    async with serving(app, settings=settings, context=server_ssl_context(settings)) as port:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname=HOST
        )
        try:
            writer.write(f"GET /healthz HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode())
            await writer.drain()
            return (await reader.readline()).decode().strip()
        finally:
            writer.close()
            await writer.wait_closed()


async def test_the_secret_is_made_and_its_ca_is_the_bundle_the_webhook_is_trusted_by(
    keeper: Callable[..., WebhookCertificate], cluster: Cluster, tmp_path: Path
) -> None:
    step = keeper()
    bundle = await step.reconcile()
    made = await secret(cluster)
    assert made.type == "kubernetes.io/tls"
    assert data(made)[CA_KEY] == bundle
    assert verdict(data(made)) is None
    encoded = base64.b64encode(bundle).decode()
    for found in (await bundles(cluster)).values():
        assert found[1:] == [encoded] * (len(found) - 1) and len(found) > 1
    assert await handshake(tmp_path, data(made), bundle) == OK
    # A client trusting another CA is refused: the handshake proves the bundle.
    other = issue(hosts=HOSTS, now=_now(), validity=YEAR)
    with pytest.raises(ssl.SSLCertVerificationError):
        await handshake(tmp_path, data(made), other[CA_KEY])


async def test_a_second_round_with_a_valid_certificate_writes_nothing(
    keeper: Callable[..., WebhookCertificate], cluster: Cluster
) -> None:
    step = keeper()
    await step.reconcile()
    before = ((await secret(cluster)).metadata.resource_version, await bundles(cluster))
    await step.reconcile()
    after = ((await secret(cluster)).metadata.resource_version, await bundles(cluster))
    assert after == before
    # A caBundle put back by hand (or by an older manifest) is written again.
    admission = client.AdmissionregistrationV1Api(cluster.api)
    stale = {"webhooks": [{"name": "resources.warmstart.dev", "clientConfig": {"caBundle": ""}}]}
    await cluster.run(admission.patch_validating_webhook_configuration, VALIDATING_WEBHOOK, stale)
    await step.reconcile()
    again = await bundles(cluster)
    assert again[VALIDATING_WEBHOOK][1:] == before[1][VALIDATING_WEBHOOK][1:]
    assert again[MUTATING_WEBHOOK] == before[1][MUTATING_WEBHOOK]


async def test_an_almost_expired_certificate_is_replaced_and_the_bundle_written(
    keeper: Callable[..., WebhookCertificate], cluster: Cluster, tmp_path: Path
) -> None:
    """Made 360 days ago (a year long: 5 days left, inside the 30-day window)."""
    await keeper(clock=lambda: _now() - datetime.timedelta(days=360)).reconcile()
    old = await secret(cluster)
    assert verdict(data(old)) is not None
    bundle = await keeper().reconcile()
    new = await secret(cluster)
    assert verdict(data(new)) is None
    assert data(new)[CERT_KEY] != data(old)[CERT_KEY]
    # The new CA, then the old one while it lasts: pods still serving the old files are
    # trusted until the kubelet brings them the new ones.
    assert data(new)[CA_KEY] == bundle
    assert [c.subject for c in x509.load_pem_x509_certificates(bundle)] == [
        x509.load_pem_x509_certificates(data(new)[CA_KEY])[0].subject,
        x509.load_pem_x509_certificates(data(old)[CA_KEY])[0].subject,
    ]
    encoded = base64.b64encode(bundle).decode()
    for found in (await bundles(cluster)).values():
        assert found[1:] == [encoded] * (len(found) - 1)
    assert await handshake(tmp_path, data(new), bundle) == OK
    assert await handshake(tmp_path, data(old), bundle) == OK


async def test_a_secret_holding_garbage_is_replaced(
    keeper: Callable[..., WebhookCertificate], cluster: Cluster, tmp_path: Path
) -> None:
    damaged = {
        "metadata": {"name": WEBHOOK_TLS_SECRET, "namespace": NAMESPACE},
        "type": "Opaque",
        "data": {
            CERT_KEY: base64.b64encode(b"garbage").decode(),
            "left-over": base64.b64encode(b"x").decode(),
        },
    }
    await cluster.run(cluster.core.create_namespaced_secret, NAMESPACE, damaged)
    bundle = await keeper().reconcile()
    replaced = await secret(cluster)
    assert replaced.type == "Opaque"  # a Secret's type cannot change; the files are what count
    assert set(data(replaced)) == {CERT_KEY, KEY_KEY, CA_KEY}
    assert verdict(data(replaced)) is None and data(replaced)[CA_KEY] == bundle
    assert await handshake(tmp_path, data(replaced), bundle) == OK


async def test_the_configurations_not_there_yet_are_waited_for(
    keeper: Callable[..., WebhookCertificate], cluster: Cluster
) -> None:
    """Installed in another order: the Secret is made, and the bundles written by the
    round after the configurations appear."""
    admission = client.AdmissionregistrationV1Api(cluster.api)
    await cluster.run(admission.delete_mutating_webhook_configuration, MUTATING_WEBHOOK)
    step = keeper()
    bundle = await step.reconcile()
    [mutating] = [d for d in webhook_configurations() if d["metadata"]["name"] == MUTATING_WEBHOOK]
    await cluster.run(admission.create_mutating_webhook_configuration, mutating)
    assert await step.reconcile() == bundle
    encoded = base64.b64encode(bundle).decode()
    assert (await bundles(cluster))[MUTATING_WEBHOOK][1:] == [encoded]
