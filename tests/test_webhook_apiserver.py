"""The admission webhook called by a real kube-apiserver (tests/apiserver.py): the webhook
configurations of the install (`kubectl apply -k deploy/kubernetes`), pointed at the webhook
on 127.0.0.1 with the caBundle of its certificate."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from api.jobs import JobSettings
from api.resources import LOADER_ON_CHECKPOINT, SAVER_WITHOUT_GMS
from api.restore_pods import STANDBY_SCRIPT, RestoreSettings
from tests.apiserver import ApiServer, installed, needs_apiserver, running_apiserver
from tests.kube import Cluster, checkpoint_body
from tests.kustomize import webhook_configurations
from tests.tls import make_pki
from workers.checkpoints import checkpoint_reader
from workers.settings import WebhookSettings
from workers.webhook import (
    admission_app,
    self_signed_certificate,
    server_ssl_context,
    serving,
)

pytestmark = [needs_apiserver, pytest.mark.timeout(120)]
NAMESPACE = "inference"
TEMPLATE = {"spec": {"containers": [{"name": "main", "image": "vllm/vllm-openai:v0.8.0"}]}}
CKPT_ID, VERSION = "96429b2725761a09", "20261127T120000Z-abcdef"


@dataclass
class Webhook:
    cluster: Cluster
    stop: Callable[[], Awaitable[None]]


@pytest.fixture(scope="module")
def apiserver() -> Iterator[ApiServer]:
    yield from running_apiserver()


@pytest_asyncio.fixture(scope="module")
async def webhook(
    apiserver: ApiServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Webhook]:
    """The webhook serving, registered with the API server and in effect."""
    cluster = await installed(apiserver, (NAMESPACE,))
    base = tmp_path_factory.mktemp("webhook-tls")
    cert, key = self_signed_certificate(hosts=["127.0.0.1"])
    (base / "tls.crt").write_bytes(cert)
    (base / "tls.key").write_bytes(key)
    settings = WebhookSettings(
        host="127.0.0.1", port=0, cert_file=str(base / "tls.crt"), key_file=str(base / "tls.key")
    )
    app = admission_app(
        read=checkpoint_reader(cluster.custom, timeout_seconds=2),
        settings=RestoreSettings(jobs=JobSettings(checkpoint_claim="ckpts")),
    )
    async with contextlib.AsyncExitStack() as stack:
        port = await stack.enter_async_context(
            serving(app, settings=settings, context=server_ssl_context(settings))
        )
        await register(cluster, url=f"https://127.0.0.1:{port}", ca=cert)
        await in_effect(cluster)
        yield Webhook(cluster=cluster, stop=stack.aclose)
    cluster.close()


async def register(cluster: Cluster, *, url: str, ca: bytes) -> None:
    """The deployed webhook configurations, calling `url` instead of the Service."""
    admission = client.AdmissionregistrationV1Api(cluster.api)
    create = {
        "ValidatingWebhookConfiguration": admission.create_validating_webhook_configuration,
        "MutatingWebhookConfiguration": admission.create_mutating_webhook_configuration,
    }
    for doc in webhook_configurations():
        if doc["kind"] in create:
            for hook in doc["webhooks"]:
                path = hook["clientConfig"]["service"]["path"]
                hook["clientConfig"] = {
                    "url": f"{url}{path}",
                    "caBundle": base64.b64encode(ca).decode(),
                }
            await cluster.run(create[doc["kind"]], doc)


async def in_effect(cluster: Cluster) -> None:
    """Wait (dry runs, with a deadline) until the API server calls both webhooks."""
    bad = checkpoint("probe", gpuMemoryService={"checkpoint": {"saver": {}}})
    deadline = asyncio.get_running_loop().time() + 30
    validating = mutating = False
    while not (validating and mutating):
        assert asyncio.get_running_loop().time() < deadline, "the webhooks never took effect"
        if not validating:
            try:
                await create_checkpoint(cluster, bad, dry_run="All")
            except ApiException as err:
                validating = SAVER_WITHOUT_GMS in str(err.body)
        if not mutating:
            created = await create_pod(cluster, pod("nowhere"), dry_run="All")
            mutating = "warmstart.dev/restore-status" in (created.metadata.annotations or {})
        await asyncio.sleep(0.1)


def checkpoint(name: str, **spec: Any) -> dict[str, Any]:
    return checkpoint_body(name, TEMPLATE, **spec)


async def create_checkpoint(cluster: Cluster, body: dict[str, Any], **kwargs: Any) -> None:
    await cluster.run(
        cluster.custom.create_namespaced_custom_object,
        "warmstart.dev",
        "v1alpha1",
        NAMESPACE,
        "checkpoints",
        body,
        **kwargs,
    )


async def create_pod(cluster: Cluster, body: dict[str, Any], **kwargs: Any) -> Any:
    return await cluster.run(cluster.core.create_namespaced_pod, NAMESPACE, body, **kwargs)


def pod(restore_from: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"worker-{uuid.uuid4().hex[:6]}",
            "annotations": {"warmstart.dev/restore-from": restore_from},
        },
        "spec": {
            "containers": [
                {"name": "main", "image": "vllm/vllm-openai:v0.8.0", "command": ["vllm", "serve"]}
            ]
        },
    }


async def ready_checkpoint(cluster: Cluster, name: str) -> None:
    await create_checkpoint(cluster, checkpoint(name))
    await cluster.run(
        cluster.custom.patch_namespaced_custom_object_status,
        "warmstart.dev",
        "v1alpha1",
        NAMESPACE,
        "checkpoints",
        name,
        {"status": {"phase": "Ready", "checkpointID": CKPT_ID, "version": VERSION}},
    )


async def test_the_api_server_refuses_a_bad_checkpoint_with_the_exact_message(
    webhook: Webhook,
) -> None:
    bad = checkpoint("bad", gpuMemoryService={"enabled": True, "checkpoint": {"loader": {}}})
    with pytest.raises(ApiException) as err:
        await create_checkpoint(webhook.cluster, bad)
    message = yaml.safe_load(err.value.body)["message"]
    assert message == (
        f'admission webhook "resources.warmstart.dev" denied the request: {LOADER_ON_CHECKPOINT}'
    )
    await create_checkpoint(webhook.cluster, checkpoint("good"))  # a good one passes


async def test_a_pod_created_through_the_api_server_comes_back_shaped(webhook: Webhook) -> None:
    await ready_checkpoint(webhook.cluster, "llama")
    created = await create_pod(webhook.cluster, pod("llama"))
    assert created.metadata.labels == {
        "warmstart.dev/restore-target": "true",
        "warmstart.dev/checkpoint-id": CKPT_ID,
    }
    assert created.metadata.annotations["warmstart.dev/checkpoint-version"] == VERSION
    [main] = created.spec.containers
    assert main.command == ["/bin/sh", "-c", STANDBY_SCRIPT, "warmstart-standby", "vllm", "serve"]
    assert main.startup_probe.failure_threshold == 1800
    assert created.spec.security_context.seccomp_profile.type == "Localhost"
    assert {v.name for v in created.spec.volumes} >= {"snapshot-control", "podinfo"}
    # Only nodes that run a node worker can take it (the API server kept the affinity).
    node_affinity = created.spec.affinity.node_affinity
    required = node_affinity.required_during_scheduling_ignored_during_execution
    [term] = required.node_selector_terms
    assert [(e.key, e.operator, e.values) for e in term.match_expressions] == [
        ("nvidia.com/gpu.present", "In", ["true"])
    ]


async def test_a_pod_whose_checkpoint_is_missing_comes_back_cold(webhook: Webhook) -> None:
    body = pod("missing")
    created = await create_pod(webhook.cluster, body)
    assert created.metadata.annotations == {
        "warmstart.dev/restore-from": "missing",
        "warmstart.dev/restore-status": "cold: checkpoint missing not found",
    }
    assert created.spec.containers[0].command == ["vllm", "serve"]
    assert not created.metadata.labels


async def test_with_a_client_ca_the_webhook_answers_the_api_server_alone(tmp_path: Path) -> None:
    """The API server configured to present a client certificate to webhooks (its admission
    configuration's kubeconfig) gets its reviews answered; a review posted by anything else
    to the same port gets 401 and nothing of the namespace it names."""
    pki = make_pki(tmp_path / "pki")
    kubeconfig = tmp_path / "webhook-client.kubeconfig"
    user = {"client-certificate": str(pki.client_cert), "client-key": str(pki.client_key)}
    kubeconfig.write_text(
        yaml.safe_dump(
            {"apiVersion": "v1", "kind": "Config", "users": [{"name": "*", "user": user}]}
        )
    )
    plugin = {
        "apiVersion": "apiserver.config.k8s.io/v1",
        "kind": "WebhookAdmissionConfiguration",
        "kubeConfigFile": str(kubeconfig),
    }
    admission = tmp_path / "admission.yaml"
    admission.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "apiserver.config.k8s.io/v1",
                "kind": "AdmissionConfiguration",
                "plugins": [
                    {"name": name, "configuration": plugin}
                    for name in ("ValidatingAdmissionWebhook", "MutatingAdmissionWebhook")
                ],
            }
        )
    )
    flags = (f"--admission-control-config-file={admission}",)
    for server in running_apiserver(extra_args=flags):
        cluster = await installed(server, (NAMESPACE,))
        settings = WebhookSettings(
            host="127.0.0.1",
            port=0,
            cert_file=str(pki.server_cert),
            key_file=str(pki.server_key),
            client_ca_file=str(pki.ca),
        )
        app = admission_app(
            read=checkpoint_reader(cluster.custom, timeout_seconds=2),
            settings=RestoreSettings(jobs=JobSettings(checkpoint_claim="ckpts")),
            client_certificate=True,
        )
        try:
            async with serving(
                app, settings=settings, context=server_ssl_context(settings)
            ) as port:
                url = f"https://127.0.0.1:{port}"
                await register(cluster, url=url, ca=pki.ca.read_bytes())
                await in_effect(cluster)  # the API server's calls are answered
                await ready_checkpoint(cluster, "llama")
                created = await create_pod(cluster, pod("llama"))
                assert created.metadata.labels["warmstart.dev/checkpoint-id"] == CKPT_ID
                review = {
                    "apiVersion": "admission.k8s.io/v1",
                    "kind": "AdmissionReview",
                    "request": {
                        "uid": "forged",
                        "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "namespace": NAMESPACE,
                        "operation": "CREATE",
                        "object": pod("llama"),
                    },
                }
                anyone = ssl.create_default_context(cafile=str(pki.ca))
                async with (
                    aiohttp.ClientSession() as session,
                    session.post(f"{url}/mutate", json=review, ssl=anyone) as answer,
                ):
                    assert answer.status == 401
                    assert CKPT_ID not in await answer.text()
        finally:
            cluster.close()


async def test_with_the_webhook_stopped_pods_are_still_created(webhook: Webhook) -> None:
    """Last in this module: it stops the webhook."""
    await ready_checkpoint(webhook.cluster, "llama-later")
    await webhook.stop()
    created = await create_pod(webhook.cluster, pod("llama-later"))
    assert created.metadata.annotations == {"warmstart.dev/restore-from": "llama-later"}
    assert created.spec.containers[0].command == ["vllm", "serve"]
