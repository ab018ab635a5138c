"""The admission webhook, sent AdmissionReviews over HTTPS as an API server sends them; the
Checkpoints it reads live in an emulated API server (tests/kube.py). Pod patches are
applied to the pod as the API server would apply them."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import socket
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest
import pytest_asyncio
from kubernetes import client
from kubernetes.client import ApiClient

from activities.kube.client import api_client
from api.jobs import (
    CONTROL_DIR,
    GMS_SAVER,
    GMS_SERVER,
    SECCOMP_PROFILE,
    JobSettings,
    capture_job,
)
from api.resources import (
    IDENTITY_IMMUTABLE,
    LOADER_ON_CHECKPOINT,
    SAVER_WITHOUT_GMS,
    Checkpoint,
)
from api.restore_pods import GMS_LOADER, STANDBY_SCRIPT, STARTUP_TEST, RestoreSettings
from tests.kube import Cluster, start_cluster
from tests.tls import Pki, make_pki
from workers.checkpoints import checkpoint_reader
from workers.settings import KubeSettings, WebhookSettings
from workers.webhook import (
    FOREIGN_OBJECT,
    admission_app,
    review_pod,
    self_signed_certificate,
    server_ssl_context,
    serving,
)

pytestmark = pytest.mark.timeout(60)
NAMESPACE = "inference"
IMAGE = "vllm/vllm-openai:v0.8.0"
MAIN = {
    "name": "main",
    "image": IMAGE,
    "command": ["vllm", "serve"],
    "args": ["meta-llama/Llama-2-7b-hf", "--port", "8000"],
    "env": [{"name": "HF_HOME", "value": "/models"}],
}
TEMPLATE = {"spec": {"containers": [{"name": "main", "image": IMAGE}]}}
CKPT_ID, VERSION = "96429b2725761a09", "20261127T120000Z-abcdef"
SETTINGS = RestoreSettings(jobs=JobSettings(checkpoint_claim="ckpts"))
LOADER_ENV = [
    {"name": "GMS_SOCKET_DIR", "value": "/gms-intrapod-control"},
    {"name": "GMS_CHECKPOINT_DIR", "value": f"/checkpoints/gms/{CKPT_ID}/versions/{VERSION}"},
    {"name": "GMS_POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
    {"name": "GMS_LOAD_WORKERS", "value": "8"},
]
DEFAULT_LOADER = {
    "name": "gms-loader",
    "image": IMAGE,
    "command": ["python3", "-m", "gpu_memory_service.cli.snapshot.loader"],
    "env": LOADER_ENV,
    "volumeMounts": [
        {"name": "gms-intrapod-control", "mountPath": "/gms-intrapod-control"},
        {"name": "checkpoint-storage", "mountPath": "/checkpoints", "readOnly": True},
        {"name": "snapshot-control", "mountPath": CONTROL_DIR, "subPath": "main"},
    ],
}


@dataclass
class Webhook:
    url: str
    context: ssl.SSLContext
    cluster: Cluster
    pki: Pki | None = None


@pytest_asyncio.fixture(scope="module")
async def webhook(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Webhook]:
    base = tmp_path_factory.mktemp("webhook-tls")
    cert, key = self_signed_certificate(hosts=["127.0.0.1"])
    (base / "tls.crt").write_bytes(cert)
    (base / "tls.key").write_bytes(key)
    settings = WebhookSettings(
        host="127.0.0.1", port=0, cert_file=str(base / "tls.crt"), key_file=str(base / "tls.key")
    )
    client_context = ssl.create_default_context(cafile=str(base / "tls.crt"))
    async for cluster in start_cluster():
        app = admission_app(
            read=checkpoint_reader(cluster.custom, timeout_seconds=5), settings=SETTINGS
        )
        async with serving(app, settings=settings, context=server_ssl_context(settings)) as port:
            yield Webhook(f"https://127.0.0.1:{port}", client_context, cluster)


async def send(hook: Webhook, path: str, request: dict[str, Any]) -> dict[str, Any]:
    """POST an AdmissionReview; the response, checked to answer this request."""
    uid = str(uuid.uuid4())
    body = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {"uid": uid, "dryRun": False, **request},
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{hook.url}{path}", json=body, ssl=hook.context) as answer,
    ):
        assert answer.status == 200, await answer.text()
        review = await answer.json()
    assert (review["apiVersion"], review["kind"]) == ("admission.k8s.io/v1", "AdmissionReview")
    response: dict[str, Any] = review["response"]
    assert response["uid"] == uid
    return response


def resource_request(
    obj: dict[str, Any], *, old: dict[str, Any] | None = None, dry_run: bool = False
) -> dict[str, Any]:
    plural = "checkpoints" if obj["kind"] == "Checkpoint" else "podsnapshots"
    return {
        "kind": {"group": "warmstart.dev", "version": "v1alpha1", "kind": obj["kind"]},
        "resource": {"group": "warmstart.dev", "version": "v1alpha1", "resource": plural},
        "name": obj["metadata"]["name"],
        "namespace": NAMESPACE,
        "operation": "CREATE" if old is None else "UPDATE",
        "object": obj,
        "oldObject": old,
        "dryRun": dry_run,
    }


def checkpoint(name: str = "llama", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "warmstart.dev/v1alpha1",
        "kind": "Checkpoint",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "identity": {"model": "meta-llama/Llama-2-7b-hf", "backendFramework": "vllm"},
            "job": {"podTemplateSpec": TEMPLATE},
            **spec,
        },
    }


def pod_snapshot(containers: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "warmstart.dev/v1alpha1",
        "kind": "PodSnapshot",
        "metadata": {"name": "snap", "namespace": NAMESPACE},
        "spec": {"source": {"podRef": {"name": "p", "uid": "u", "containers": containers}}},
    }


async def validate(hook: Webhook, obj: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return await send(hook, "/validate", resource_request(obj, **kwargs))


def refusal(response: dict[str, Any]) -> str:
    assert response["allowed"] is False, response
    message: str = response["status"]["message"]
    return message


async def test_a_valid_checkpoint_and_pod_snapshot_are_allowed(webhook: Webhook) -> None:
    response = await validate(webhook, checkpoint())
    assert response == {"uid": response["uid"], "allowed": True}
    assert (await validate(webhook, pod_snapshot(["main"])))["allowed"] is True


async def test_a_loader_on_a_checkpoint_is_refused_with_the_exact_message(
    webhook: Webhook,
) -> None:
    body = checkpoint(gpuMemoryService={"enabled": True, "checkpoint": {"loader": {}}})
    assert refusal(await validate(webhook, body)) == LOADER_ON_CHECKPOINT


async def test_a_verified_checkpoint_is_admitted(webhook: Webhook) -> None:
    assert (await validate(webhook, checkpoint(verify=True)))["allowed"] is True
    assert (await validate(webhook, checkpoint(verify=False)))["allowed"] is True
    bad = checkpoint(verify=True, verifyTimeoutSeconds=0)
    assert "verifyTimeoutSeconds" in refusal(await validate(webhook, bad))


async def test_a_saver_without_gms_is_refused_with_the_exact_message(webhook: Webhook) -> None:
    body = checkpoint(gpuMemoryService={"checkpoint": {"saver": {"image": "gms:1"}}})
    assert refusal(await validate(webhook, body)) == SAVER_WITHOUT_GMS


async def test_an_empty_gms_checkpoint_is_accepted(webhook: Webhook) -> None:
    body = checkpoint(gpuMemoryService={"checkpoint": {}})
    assert (await validate(webhook, body))["allowed"] is True


async def test_the_models_other_rules_name_their_field(webhook: Webhook) -> None:
    bad_backend = checkpoint()
    bad_backend["spec"]["identity"]["backendFramework"] = "tgi"
    assert refusal(await validate(webhook, bad_backend)).startswith(
        "spec.identity.backendFramework: "
    )
    no_target = checkpoint()
    no_target["spec"]["job"]["targetContainerName"] = "server"
    message = refusal(await validate(webhook, no_target))
    assert "targetContainerName 'server' is not a container of podTemplateSpec" in message
    message = refusal(await validate(webhook, pod_snapshot(["a", "b"])))
    assert message.startswith("spec.source.podRef.containers: ")
    bad_cron = checkpoint(schedule={"cron": "0 3 * *"})
    message = refusal(await validate(webhook, bad_cron))
    assert message.startswith("spec.schedule.cron: ") and "has 4 fields; it needs 5" in message


async def test_dry_run_is_answered_the_same(webhook: Webhook) -> None:
    bad = checkpoint(gpuMemoryService={"checkpoint": {"saver": {}}})
    assert refusal(await validate(webhook, bad, dry_run=True)) == SAVER_WITHOUT_GMS
    assert (await validate(webhook, checkpoint(), dry_run=True))["allowed"] is True


async def test_an_update_may_not_change_the_identity(webhook: Webhook) -> None:
    old = checkpoint()
    new = copy.deepcopy(old)
    new["spec"]["identity"]["model"] = "meta-llama/Llama-3-8b"
    assert refusal(await validate(webhook, new, old=old)) == IDENTITY_IMMUTABLE
    # Equal identities written differently (defaults spelt out) are no change.
    same = copy.deepcopy(old)
    same["spec"]["identity"]["tensorParallelSize"] = 1
    assert (await validate(webhook, same, old=old))["allowed"] is True
    # Other spec changes are validated like a create.
    deadline = copy.deepcopy(old)
    deadline["spec"]["job"]["activeDeadlineSeconds"] = 10
    assert "activeDeadlineSeconds" in refusal(await validate(webhook, deadline, old=old))
    # An identity the models would not even read is compared as written.
    odd = copy.deepcopy(old)
    odd["spec"]["identity"] = {"model": "m", "backendFramework": "tgi"}
    assert refusal(await validate(webhook, new_identity(odd), old=odd)) == IDENTITY_IMMUTABLE


def new_identity(body: dict[str, Any]) -> dict[str, Any]:
    changed = copy.deepcopy(body)
    changed["spec"]["identity"]["model"] = "another"
    return changed


async def test_an_update_that_keeps_an_old_invalid_spec_is_allowed(webhook: Webhook) -> None:
    """A resource written before a rule existed can still get and lose finalizers."""
    old = checkpoint(gpuMemoryService={"checkpoint": {"saver": {}}})
    new = copy.deepcopy(old)
    new["metadata"]["finalizers"] = ["warmstart.dev/cleanup"]
    assert (await validate(webhook, new, old=old))["allowed"] is True


async def test_what_is_not_an_admission_review_is_a_bad_request(webhook: Webhook) -> None:
    async with aiohttp.ClientSession() as session:
        for data in (b"not json", b'{"request": {}}'):
            async with session.post(
                f"{webhook.url}/validate", data=data, ssl=webhook.context
            ) as answer:
                assert answer.status == 400


# --- pods ---------------------------------------------------------------------------------


async def ready_checkpoint(hook: Webhook, name: str, *, storage_uri: str = "", **spec: Any) -> None:
    body = checkpoint(name, **spec)
    body["status"] = {"phase": "Ready", "checkpointID": CKPT_ID, "version": VERSION}
    if storage_uri:
        body["status"]["storageURI"] = storage_uri
    await hook.cluster.create("checkpoints", body)


def pod(
    *containers: dict[str, Any],
    restore_from: str | None = "llama",
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    notes = dict(annotations or {})
    if restore_from is not None:
        notes["warmstart.dev/restore-from"] = restore_from
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "llama-", "labels": {"app": "llama"}, "annotations": notes},
        "spec": {"containers": [copy.deepcopy(c) for c in containers or (MAIN,)]},
    }


async def admit(
    hook: Webhook, body: dict[str, Any], *, namespace: str = NAMESPACE
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The webhook's response to creating `body` in `namespace`, and the pod its patch
    makes."""
    request = {
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": namespace,
        "operation": "CREATE",
        "object": body,
    }
    response = await send(hook, "/mutate", request)
    if "patch" not in response:
        return response, body
    assert response["patchType"] == "JSONPatch"
    return response, apply_patch(body, json.loads(base64.b64decode(response["patch"])))


def apply_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """The patch applied as the API server applies it (RFC 6902, by jsonpatch)."""
    patched: dict[str, Any] = jsonpatch.apply_patch(doc, ops)
    return patched


def named(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(i for i in items if i["name"] == name)


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


async def test_a_pod_without_the_annotation_passes_without_a_patch(webhook: Webhook) -> None:
    response, _ = await admit(webhook, pod(restore_from=None))
    assert response == {"uid": response["uid"], "allowed": True}


async def test_where_an_s3_checkpoint_is_stored_is_not_written_on_the_pod(
    webhook: Webhook,
) -> None:
    """The node derives the location from the Checkpoint; the pod carries no bucket,
    endpoint or Secret name for anyone who can read it (or post a review) to learn."""
    s3 = {"bucket": "team-ckpts", "endpoint": "http://s3.local", "credentialsSecret": "keys"}
    uri = f"s3://team-ckpts/fleet/{CKPT_ID}/versions/{VERSION}/"
    await ready_checkpoint(webhook, "llama-s3", storage_uri=uri, storage={"type": "s3", "s3": s3})
    response, shaped = await admit(webhook, pod(MAIN, restore_from="llama-s3"))
    assert "warmstart.dev/storage" not in shaped["metadata"]["annotations"]
    answer = json.dumps(response) + base64.b64decode(response["patch"]).decode()
    assert not any(secret in answer for secret in ("team-ckpts", "s3.local", "keys"))


async def test_a_pod_is_shaped_as_a_restore_target(webhook: Webhook) -> None:
    await ready_checkpoint(webhook, "llama")
    sidecar = {"name": "proxy", "image": "envoy:1"}
    response, shaped = await admit(webhook, pod(sidecar, MAIN))
    assert response["allowed"] is True
    meta = shaped["metadata"]
    assert meta["labels"] == {
        "app": "llama",
        "warmstart.dev/restore-target": "true",
        "warmstart.dev/checkpoint-id": CKPT_ID,
    }
    assert meta["annotations"]["warmstart.dev/checkpoint-version"] == VERSION
    assert "warmstart.dev/restore-status" not in meta["annotations"]
    spec = shaped["spec"]
    assert spec["securityContext"]["seccompProfile"] == {
        "type": "Localhost",
        "localhostProfile": SECCOMP_PROFILE,
    }
    assert named(spec["volumes"], "snapshot-control") == {
        "name": "snapshot-control",
        "emptyDir": {},
    }
    podinfo = named(spec["volumes"], "podinfo")["downwardAPI"]["items"]
    assert {i["path"]: i["fieldRef"]["fieldPath"] for i in podinfo} == {
        "pod_name": "metadata.name",
        "pod_uid": "metadata.uid",
        "pod_namespace": "metadata.namespace",
        "labels": "metadata.labels",
        "annotations": "metadata.annotations",
    }
    main = named(spec["containers"], "main")
    assert main["command"] == [
        "/bin/sh",
        "-c",
        STANDBY_SCRIPT,
        "warmstart-standby",
        "vllm",
        "serve",
        "meta-llama/Llama-2-7b-hf",
        "--port",
        "8000",
    ]
    assert "args" not in main
    assert env(main) == {
        "HF_HOME": "/models",
        "SNAPSHOT_CONTROL_DIR": CONTROL_DIR,
        "DYN_SNAPSHOT_CONTROL_DIR": CONTROL_DIR,
        "WARMSTART_RESTORE_STANDBY": "1",
        "WARMSTART_STANDBY_ANNOUNCES": "1",
        "WARMSTART_STANDBY_DEADLINE_SECONDS": "2100",
    }
    assert main["volumeMounts"] == [
        {"name": "snapshot-control", "mountPath": CONTROL_DIR, "subPath": "main"},
        {"name": "podinfo", "mountPath": "/etc/podinfo", "readOnly": True},
    ]
    assert main["startupProbe"] == {
        "exec": {"command": ["/bin/sh", "-c", STARTUP_TEST]},
        "periodSeconds": 1,
        "failureThreshold": 1800,
    }
    assert named(spec["containers"], "proxy") == sidecar  # only the main container
    assert [c["name"] for c in spec["containers"]] == ["proxy", "main"]
    # What the API server would store is a valid pod.
    api = ApiClient()
    parsed = api._ApiClient__deserialize(shaped, "V1Pod")  # type: ignore[attr-defined]
    assert api.sanitize_for_serialization(parsed) == shaped


async def test_the_first_container_when_none_has_the_target_name(webhook: Webhook) -> None:
    await ready_checkpoint(webhook, "llama-server")
    server = {**MAIN, "name": "server"}
    _, shaped = await admit(
        webhook, pod(server, {**MAIN, "name": "other"}, restore_from="llama-server")
    )
    first, second = shaped["spec"]["containers"]
    assert first["command"][:4] == ["/bin/sh", "-c", STANDBY_SCRIPT, "warmstart-standby"]
    assert second == {**MAIN, "name": "other"}
    assert first["volumeMounts"][0]["subPath"] == "server"


async def test_the_startup_probe_copies_the_containers_own(webhook: Webhook) -> None:
    await ready_checkpoint(webhook, "llama-probes")
    ready = {
        "httpGet": {"path": "/health", "port": 8000},
        "initialDelaySeconds": 60,
        "periodSeconds": 10,
        "successThreshold": 2,
        "timeoutSeconds": 3,
    }
    main = {**MAIN, "readinessProbe": ready, "livenessProbe": {"tcpSocket": {"port": 8000}}}
    _, shaped = await admit(webhook, pod(main, restore_from="llama-probes"))
    [shaped_main] = shaped["spec"]["containers"]
    assert shaped_main["startupProbe"] == {
        "httpGet": {"path": "/health", "port": 8000},
        "timeoutSeconds": 3,
        "periodSeconds": 1,
        "failureThreshold": 1800,
    }
    assert shaped_main["readinessProbe"] == ready  # kept: it gates traffic after startup
    startup = {"exec": {"command": ["ready"]}, "failureThreshold": 3}
    _, shaped = await admit(
        webhook, pod({**main, "startupProbe": startup}, restore_from="llama-probes")
    )
    assert shaped["spec"]["containers"][0]["startupProbe"] == {
        "exec": {"command": ["ready"]},
        "failureThreshold": 1800,
        "periodSeconds": 1,
    }


async def test_a_container_without_a_command_starts_cold(webhook: Webhook) -> None:
    await ready_checkpoint(webhook, "llama-entrypoint")
    main = {"name": "main", "image": IMAGE, "args": ["--port", "8000"]}
    body = pod(main, restore_from="llama-entrypoint")
    response, shaped = await admit(webhook, body)
    assert response["allowed"] is True
    assert shaped["metadata"]["annotations"]["warmstart.dev/restore-status"] == (
        "cold: container main has no command for the standby to start (an image whose "
        "entrypoint runs Dynamo's restore standby declares SNAPSHOT_RESTORE_STANDBY)"
    )
    del shaped["metadata"]["annotations"]["warmstart.dev/restore-status"]
    assert shaped == body


async def test_an_image_that_is_its_own_dynamo_standby_keeps_its_entrypoint(
    webhook: Webhook,
) -> None:
    """A container declaring SNAPSHOT_RESTORE_STANDBY runs Dynamo's standby in its image's
    entrypoint: nothing wraps it, and Dynamo's variables come from annotations that a failed
    restore turns off (the restarted container then starts cold)."""
    await ready_checkpoint(webhook, "llama-dynamo")
    main = {
        "name": "main",
        "image": IMAGE,
        "args": ["--port", "8000"],
        "env": [
            {"name": "SNAPSHOT_RESTORE_STANDBY", "value": "1"},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
    }
    response, shaped = await admit(webhook, pod(main, restore_from="llama-dynamo"))
    assert response["allowed"] is True
    notes = shaped["metadata"]["annotations"]
    assert "warmstart.dev/restore-status" not in notes
    assert notes["warmstart.dev/standby"] == "1"
    assert notes["warmstart.dev/control-dir"] == CONTROL_DIR
    shaped_main = named(shaped["spec"]["containers"], "main")
    assert "command" not in shaped_main and shaped_main["args"] == ["--port", "8000"]
    by_name = {e["name"]: e for e in shaped_main["env"]}
    assert by_name["POD_NAME"] == main["env"][1]
    assert by_name["SNAPSHOT_RESTORE_STANDBY"] == {
        "name": "SNAPSHOT_RESTORE_STANDBY",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['warmstart.dev/standby']"}},
    }
    assert by_name["DYN_SNAPSHOT_CONTROL_DIR"] == {
        "name": "DYN_SNAPSHOT_CONTROL_DIR",
        "valueFrom": {
            "fieldRef": {"fieldPath": "metadata.annotations['warmstart.dev/control-dir']"}
        },
    }
    assert by_name["SNAPSHOT_CONTROL_DIR"]["value"] == CONTROL_DIR
    assert by_name["WARMSTART_RESTORE_STANDBY"]["value"] == "image"
    assert shaped_main["startupProbe"] == {
        "exec": {"command": ["/bin/sh", "-c", STARTUP_TEST]},
        "periodSeconds": 1,
        "failureThreshold": 1800,
    }


async def test_a_missing_or_unready_checkpoint_starts_cold(webhook: Webhook) -> None:
    body = pod(restore_from="nowhere")
    response, shaped = await admit(webhook, body)
    assert response["allowed"] is True
    assert shaped["metadata"]["annotations"]["warmstart.dev/restore-status"] == (
        "cold: checkpoint nowhere not found"
    )
    capturing = checkpoint("capturing")
    capturing["status"] = {"phase": "Capturing"}
    await webhook.cluster.create("checkpoints", capturing)
    _, shaped = await admit(webhook, pod(restore_from="capturing"))
    assert shaped["metadata"]["annotations"]["warmstart.dev/restore-status"] == (
        "cold: checkpoint capturing is not Ready (phase Capturing)"
    )
    del shaped["metadata"]["annotations"]["warmstart.dev/restore-status"]
    assert shaped == pod(restore_from="capturing")


async def test_a_checkpoint_of_another_namespace_is_refused(webhook: Webhook) -> None:
    response, _ = await admit(webhook, pod(restore_from="other/ckpt"))
    assert refusal(response).startswith(
        "metadata.annotations[warmstart.dev/restore-from]: 'other/ckpt' names a Checkpoint "
        "in another namespace"
    )
    response, _ = await admit(webhook, pod(restore_from="Not_A_Name"))
    assert refusal(response) == (
        "metadata.annotations[warmstart.dev/restore-from]: 'Not_A_Name' is not a Checkpoint name"
    )


@pytest.mark.parametrize(
    ("annotation", "says"),
    [
        ("{not json", "not JSON"),
        ('["image"]', "expected a JSON object"),
        ('{"command": []}', "command"),
        ('{"envs": [{"name": "A"}, {"name": "A"}]}', "env names must be unique"),
        ('{"volumeMounts": [{"name": "v", "mountPath": "relative"}]}', "mountPath"),
        ('{"imgae": "x"}', "unknown fields ['imgae']"),
    ],
)
async def test_a_malformed_loader_override_is_refused(
    webhook: Webhook, annotation: str, says: str
) -> None:
    await ready_checkpoint(webhook, f"gms-{uuid.uuid4().hex[:6]}")
    body = pod(annotations={"warmstart.dev/gms-loader": annotation})
    message = refusal((await admit(webhook, body))[0])
    assert message.startswith("metadata.annotations[warmstart.dev/gms-loader]: ")
    assert says in message


GMS = {"gpuMemoryService": {"enabled": True}}


async def gms_pod(hook: Webhook, override: str | None) -> dict[str, Any]:
    name = f"gms-{uuid.uuid4().hex[:6]}"
    await ready_checkpoint(hook, name, **GMS)
    notes = {} if override is None else {"warmstart.dev/gms-loader": override}
    response, shaped = await admit(hook, pod(restore_from=name, annotations=notes))
    assert response["allowed"] is True, response
    return shaped


async def test_intra_pod_gms_adds_the_server_and_the_default_loader(webhook: Webhook) -> None:
    shaped = await gms_pod(webhook, None)
    spec = shaped["spec"]
    server = named(spec["initContainers"], GMS_SERVER)
    assert server["restartPolicy"] == "Always" and server["image"] == IMAGE
    loader = named(spec["containers"], GMS_LOADER)
    assert json.dumps(loader) == json.dumps(DEFAULT_LOADER)  # byte-identical defaults
    assert {v["name"] for v in spec["volumes"]} == {
        "snapshot-control",
        "podinfo",
        "gms-intrapod-control",
        "checkpoint-storage",
    }
    assert named(spec["volumes"], "checkpoint-storage")["persistentVolumeClaim"] == {
        "claimName": "ckpts"
    }
    main = named(spec["containers"], "main")
    assert env(main)["GMS_SOCKET_DIR"] == "/gms-intrapod-control"
    assert "GMS_LOAD_COMPLETE_FILE" not in env(main)


async def test_an_empty_override_changes_nothing(webhook: Webhook) -> None:
    loader = named((await gms_pod(webhook, "{}"))["spec"]["containers"], GMS_LOADER)
    assert json.dumps(loader) == json.dumps(DEFAULT_LOADER)


async def test_the_loader_override_merges_like_the_savers(webhook: Webhook) -> None:
    override = {
        "image": "gms-loader:2",
        "command": ["gms-load", "--fast"],
        "envs": [
            {"name": "GMS_LOAD_WORKERS", "value": "32"},
            {"name": "GMS_SOCKET_DIR", "value": "/elsewhere"},
            {"name": "EXTRA", "value": "1"},
        ],
        "envFromSecret": "",
        "volumeMounts": [{"name": "cache", "mountPath": "/cache", "readOnly": True}],
    }
    loader = named((await gms_pod(webhook, json.dumps(override)))["spec"]["containers"], GMS_LOADER)
    assert loader["image"] == "gms-loader:2"
    assert loader["command"] == ["gms-load", "--fast"] and "args" not in loader
    assert loader["env"] == [
        {"name": "GMS_SOCKET_DIR", "value": "/gms-intrapod-control"},  # the operator's
        LOADER_ENV[1],
        LOADER_ENV[2],
        {"name": "GMS_LOAD_WORKERS", "value": "32"},  # the user's wins
        {"name": "EXTRA", "value": "1"},
    ]
    assert "envFrom" not in loader  # an empty envFromSecret is ignored
    assert loader["volumeMounts"] == [
        *DEFAULT_LOADER["volumeMounts"],
        {"name": "cache", "mountPath": "/cache", "readOnly": True},
    ]
    image_only = named(
        (await gms_pod(webhook, '{"image": "gms:3"}'))["spec"]["containers"], GMS_LOADER
    )
    assert image_only == {**DEFAULT_LOADER, "image": "gms:3"}
    secret = named(
        (await gms_pod(webhook, '{"envFromSecret": "hf"}'))["spec"]["containers"], GMS_LOADER
    )
    assert secret["envFrom"] == [{"secretRef": {"name": "hf"}}]


async def test_inter_pod_gms_adds_no_loader_but_the_shared_sentinel(webhook: Webhook) -> None:
    await ready_checkpoint(webhook, "inter", gpuMemoryService={"enabled": True, "mode": "interPod"})
    _, shaped = await admit(webhook, pod(restore_from="inter"))
    spec = shaped["spec"]
    assert [c["name"] for c in spec["containers"]] == ["main"]
    assert "initContainers" not in spec
    assert env(spec["containers"][0])["GMS_LOAD_COMPLETE_FILE"] == (
        "/snapshot-control/gms-load-complete"
    )


def test_a_capture_job_reads_only_the_saver() -> None:
    """The loader annotation on a capture's pod template shapes nothing of the capture."""
    template = {
        "metadata": {"annotations": {"warmstart.dev/gms-loader": '{"image": "loader:9"}'}},
        "spec": {"containers": [{"name": "main", "image": IMAGE}]},
    }
    body = checkpoint(
        gpuMemoryService={"enabled": True, "checkpoint": {"saver": {"image": "saver:1"}}}
    )
    body["spec"]["job"]["podTemplateSpec"] = template
    body["metadata"]["uid"] = "uid-1"
    job = capture_job(Checkpoint.model_validate(body), version=VERSION, settings=JobSettings())
    pod_spec = job["spec"]["template"]["spec"]
    assert [c["name"] for c in pod_spec["containers"]] == ["main", GMS_SAVER]
    assert named(pod_spec["containers"], GMS_SAVER)["image"] == "saver:1"
    assert "loader:9" not in json.dumps(job["spec"]["template"]["spec"])


def test_the_certificate_names_its_hosts() -> None:
    from cryptography import x509

    cert, _ = self_signed_certificate(hosts=["127.0.0.1", "warmstart-webhook.svc"])
    names = x509.load_pem_x509_certificate(cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert [str(n.value) for n in names.value] == ["127.0.0.1", "warmstart-webhook.svc"]
    # Without certificate files the server makes its own (development).
    assert (
        server_ssl_context(WebhookSettings(hosts="localhost")).protocol == ssl.PROTOCOL_TLS_SERVER
    )


async def served_serial(port: int) -> int:
    """The serial number of the certificate a new TLS connection is served."""
    from cryptography import x509

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # it is read, not trusted
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        await writer.wait_closed()
    return int(x509.load_der_x509_certificate(der).serial_number)


def serial(pem: bytes) -> int:
    from cryptography import x509

    return int(x509.load_pem_x509_certificate(pem).serial_number)


async def test_a_rotated_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    """The Secret volume as the kubelet updates it: the files are links through `..data`,
    which is swapped atomically to a new directory."""
    mounted = tmp_path / "webhook-tls"
    mounted.mkdir()

    def rotate(cert: bytes, key: bytes, stamp: str) -> None:
        target = mounted / f"..{stamp}"
        target.mkdir()
        (target / "tls.crt").write_bytes(cert)
        (target / "tls.key").write_bytes(key)
        (mounted / "..data_tmp").symlink_to(target.name)
        os.replace(mounted / "..data_tmp", mounted / "..data")

    first, second = (self_signed_certificate(hosts=["127.0.0.1"]) for _ in range(2))
    rotate(*first, "2026_12_01")
    for name in ("tls.crt", "tls.key"):
        (mounted / name).symlink_to(f"..data/{name}")
    settings = WebhookSettings(
        host="127.0.0.1",
        port=0,
        cert_file=str(mounted / "tls.crt"),
        key_file=str(mounted / "tls.key"),
    )

    async def no_checkpoint(namespace: str, name: str) -> None:
        return None

    app = admission_app(read=no_checkpoint, settings=SETTINGS)
    async with serving(app, settings=settings, context=server_ssl_context(settings)) as port:
        assert await served_serial(port) == serial(first[0])
        rotate(*second, "2026_12_02")
        assert await served_serial(port) == serial(second[0])
        # A rotation caught half-done (a key that is not the certificate's): the last good
        # one serves on, and the next complete rotation is taken.
        rotate(first[0], second[1], "2026_12_03")
        assert await served_serial(port) == serial(second[0])
        rotate(*first, "2026_12_04")
        assert await served_serial(port) == serial(first[0])
        # It answers HTTPS that a client trusting only the certificate now served verifies.
        (tmp_path / "ca.pem").write_bytes(first[0])
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"https://127.0.0.1:{port}/healthz", ssl=context) as answer,
        ):
            assert answer.status == 200


async def test_the_webhook_starts_before_its_secret_and_serves_once_it_is_there(
    tmp_path: Path,
) -> None:
    """The Secret volume is optional: the pod starts with an empty directory, each handshake
    is refused (not ready), and the files the kubelet puts there once the controller has
    made the Secret are served from the next handshake on, without a restart."""
    mounted = tmp_path / "webhook-tls"
    mounted.mkdir()
    settings = WebhookSettings(
        host="127.0.0.1",
        port=0,
        cert_file=str(mounted / "tls.crt"),
        key_file=str(mounted / "tls.key"),
    )

    async def no_checkpoint(namespace: str, name: str) -> None:
        return None

    app = admission_app(read=no_checkpoint, settings=SETTINGS)
    async with serving(app, settings=settings, context=server_ssl_context(settings)) as port:
        with pytest.raises((ssl.SSLError, ConnectionError)):  # the handshake is refused
            await served_serial(port)
        cert, key = self_signed_certificate(hosts=["127.0.0.1"])
        target = mounted / "..2026_12_01"
        target.mkdir()
        (target / "tls.crt").write_bytes(cert)
        (target / "tls.key").write_bytes(key)
        (mounted / "..data").symlink_to(target.name)
        for name in ("tls.crt", "tls.key"):
            (mounted / name).symlink_to(f"..data/{name}")
        assert await served_serial(port) == serial(cert)


@pytest.mark.parametrize(
    ("status", "reason"), [(500, "Unavailable"), (503, "Unavailable"), (403, "Forbidden")]
)
async def test_a_checkpoint_that_cannot_be_read_starts_the_pod_cold(
    webhook: Webhook, caplog: pytest.LogCaptureFixture, status: int, reason: str
) -> None:
    """The API server refuses the read: the pod is admitted cold, with the reason."""
    name = f"unreadable-{status}"
    assert webhook.cluster.emulator is not None
    path = f"/apis/warmstart.dev/v1alpha1/namespaces/{NAMESPACE}/checkpoints/{name}"
    webhook.cluster.emulator[f"get {path}"] << status << {"kind": "Status", "code": status}
    response, shaped = await admit(webhook, pod(restore_from=name))
    assert response["allowed"] is True
    assert shaped["metadata"]["annotations"]["warmstart.dev/restore-status"] == (
        f"cold: checkpoint {name} could not be read ({reason})"
    )
    assert f"read Checkpoint {NAMESPACE}/{name}" in caplog.text


async def test_a_slow_read_gives_up_within_its_timeout() -> None:
    """An API server that never answers: the admission does not wait past the timeout,
    whatever the client's own retries, and the pod starts cold."""
    silent = socket.create_server(("127.0.0.1", 0))
    api = api_client(KubeSettings(server=f"http://127.0.0.1:{silent.getsockname()[1]}"))
    read = checkpoint_reader(client.CustomObjectsApi(api), timeout_seconds=0.3)
    request = {
        "uid": "u",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "namespace": NAMESPACE,
        "operation": "CREATE",
        "object": pod(),
    }
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        response = await review_pod(request, read=read, settings=SETTINGS)
    finally:
        silent.close()
        api.close()  # type: ignore[no-untyped-call]
    assert loop.time() - began < 2
    shaped = apply_patch(pod(), json.loads(base64.b64decode(response["patch"])))
    assert shaped["metadata"]["annotations"]["warmstart.dev/restore-status"] == (
        "cold: checkpoint llama could not be read (Unavailable)"
    )


# --- what a review tells about other namespaces ----------------------------------------


async def test_a_review_whose_pod_is_in_another_namespace_learns_nothing(
    webhook: Webhook,
) -> None:
    """Anyone who reaches the port can post a review naming the namespace of their choice;
    one that does not hold together (the pod in one namespace, the review in another, or no
    namespace at all) is refused with one fixed message: no patch, no ID, no version."""
    await ready_checkpoint(webhook, "llama-victim")
    body = pod(restore_from="llama-victim")
    body["metadata"]["namespace"] = "team-b"  # the sender's; the review names the victim's
    response, shaped = await admit(webhook, body)
    assert refusal(response) == FOREIGN_OBJECT
    assert "patch" not in response and shaped == body
    assert CKPT_ID not in json.dumps(response) and VERSION not in json.dumps(response)
    response, _ = await admit(webhook, pod(restore_from="llama-victim"), namespace="")
    assert refusal(response) == FOREIGN_OBJECT


async def test_a_resource_review_of_another_namespace_is_refused(webhook: Webhook) -> None:
    elsewhere = checkpoint()
    elsewhere["metadata"]["namespace"] = "team-b"
    assert refusal(await validate(webhook, elsewhere)) == FOREIGN_OBJECT
    moved = checkpoint()
    assert refusal(await validate(webhook, moved, old=elsewhere)) == FOREIGN_OBJECT


@pytest_asyncio.fixture(scope="module")
async def authenticated(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Webhook]:
    """The webhook answering reviews only to clients with a certificate of the API server's
    CA (`WARMSTART_WEBHOOK__CLIENT_CA_FILE`)."""
    pki = make_pki(tmp_path_factory.mktemp("webhook-mtls"))
    settings = WebhookSettings(
        host="127.0.0.1",
        port=0,
        cert_file=str(pki.server_cert),
        key_file=str(pki.server_key),
        client_ca_file=str(pki.ca),
    )
    context = ssl.create_default_context(cafile=str(pki.ca))
    async for cluster in start_cluster():
        await cluster.create("checkpoints", {**checkpoint("llama"), "status": READY})
        app = admission_app(
            read=checkpoint_reader(cluster.custom, timeout_seconds=5),
            settings=SETTINGS,
            client_certificate=True,
        )
        async with serving(app, settings=settings, context=server_ssl_context(settings)) as port:
            yield Webhook(f"https://127.0.0.1:{port}", context, cluster, pki)


READY = {"phase": "Ready", "checkpointID": CKPT_ID, "version": VERSION}


def pod_review(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": NAMESPACE,
            "operation": "CREATE",
            "object": body,
        },
    }


async def test_with_a_client_ca_only_the_api_servers_certificate_gets_an_answer(
    authenticated: Webhook,
) -> None:
    hook, pki = authenticated, authenticated.pki
    assert pki is not None and hook.cluster.emulator is not None
    reads = len(list(hook.cluster.emulator))
    async with aiohttp.ClientSession() as session:
        for path in ("/mutate", "/validate"):
            async with session.post(
                f"{hook.url}{path}", json=pod_review(pod()), ssl=hook.context
            ) as answer:
                assert (answer.status, await answer.text()) == (
                    401,
                    "a client certificate is required",
                )
        async with session.get(f"{hook.url}/healthz", ssl=hook.context) as answer:
            assert answer.status == 200  # the kubelet's probe has no certificate
    assert len(list(hook.cluster.emulator)) == reads  # nothing was read for them

    other = ssl.create_default_context(cafile=str(pki.ca))
    other.load_cert_chain(pki.other_client_cert, pki.other_client_key)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):  # another CA's: refused in the handshake
            await session.post(f"{hook.url}/mutate", json=pod_review(pod()), ssl=other)

    server = ssl.create_default_context(cafile=str(pki.ca))
    server.load_cert_chain(pki.client_cert, pki.client_key)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{hook.url}/mutate", json=pod_review(pod()), ssl=server) as answer,
    ):
        response = (await answer.json())["response"]
    shaped = apply_patch(pod(), json.loads(base64.b64decode(response["patch"])))
    assert shaped["metadata"]["labels"]["warmstart.dev/checkpoint-id"] == CKPT_ID
