"""One namespace's checkpoint never reaches another's pod, end to end: a Checkpoint captured in
namespace `inference` from a real containerd container, then pods of a second tenant's
namespace (`team-b`) on the same node that claim it (a forged ID label, a forged storage
location with the first tenant's Secret, a target copied from the first tenant's pod, a
version captured in the first namespace) are refused: their standby starts the workload
cold, the pod's status and an Event say why without naming the other namespace, and nothing
of the checkpoint is read (no fetch, no CRIU). A version changed where it is stored never
reaches CRIU. Checkpoint ID claims are per namespace.
Against kmock and a real kube-apiserver; the test plays the scheduler and the kubelet."""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

from activities.contracts import ClaimInput, ResourceRef
from activities.kube.control import KubeControlActivities
from api.errors import IdentityConflictError
from tests.cluster_stack import (
    OTHER_NAMESPACE,
    Stack,
    Target,
    break_core_image,
    captured,
    eventually,
    running_stack,
)
from tests.containers import Kubelet, needs_containerd
from tests.kube import Cluster, checkpoint_body

NAMESPACE = "inference"  # the first tenant's; OTHER_NAMESPACE is the second's
B_VERSION = "20991231T000000Z-0000bb"  # a version of the second tenant's own Checkpoint
WORKLOAD = "local/workload"


@asynccontextmanager
async def listening() -> AsyncIterator[list[int]]:
    """A TCP endpoint on 127.0.0.1 that counts the connections made to it (and answers
    none): yields [port, connections]."""
    seen = [0, 0]

    async def accepted(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen[1] += 1
        writer.close()

    server = await asyncio.start_server(accepted, "127.0.0.1", 0)
    seen[0] = server.sockets[0].getsockname()[1]
    async with server:
        yield seen


async def second_tenants_checkpoint(
    stack: Stack, resource: dict[str, Any], *, version: str = B_VERSION
) -> dict[str, Any]:
    """The second tenant's own Ready Checkpoint `llama`, of the same identity as the first's
    (so of the same checkpoint ID: claims are per namespace), as its status says it (the
    watcher is stopped first: the test writes the status the controller would)."""
    await stack.stop_watcher()
    cluster = stack.cluster
    body = checkpoint_body("llama", resource["spec"]["job"]["podTemplateSpec"])
    body["metadata"]["namespace"] = OTHER_NAMESPACE
    body["spec"]["identity"] = resource["spec"]["identity"]
    await cluster.run(
        cluster.custom.create_namespaced_custom_object,
        "warmstart.dev",
        "v1alpha1",
        OTHER_NAMESPACE,
        "checkpoints",
        body,
    )
    status = {
        "phase": "Ready",
        "checkpointID": resource["status"]["checkpointID"],
        "version": version,
    }
    await cluster.run(
        cluster.custom.patch_namespaced_custom_object_status,
        "warmstart.dev",
        "v1alpha1",
        OTHER_NAMESPACE,
        "checkpoints",
        "llama",
        {"status": status},
    )
    return await cluster.get("checkpoints", OTHER_NAMESPACE, "llama")


async def refused_cold(target: Target, tmp_path: Path) -> str:
    """The pod's status says it was refused; it started cold (a process of its own); an Event
    says so; no CRIU ran for it. Returns the status."""
    status = await target.restore_status()
    assert status.startswith("fell-back: Forbidden: "), status
    await eventually(
        lambda: asyncio.sleep(0, "started" in target.log.read_text()), "the cold start"
    )
    refused = [("Warning", "RestoreRefused")]
    await eventually(lambda: _equal(target.events(), refused), "the Event")
    for said in (status, *await target.event_notes()):
        assert NAMESPACE not in said and "s3-keys" not in said, said
    assert not (tmp_path / "home" / "restores" / "pods" / target.uid).exists()  # no CRIU
    assert (target.control / "restore-failed").read_text().startswith("Forbidden: ")
    return status


async def _equal(found: Any, wanted: Any) -> bool:
    return bool(await found == wanted)


def copied(source: dict[str, Any], *drop: str) -> Callable[[dict[str, Any]], None]:
    """Tamper: the labels and annotations of `source` (a shaped pod's), some dropped."""

    def tamper(pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        meta["labels"] = dict(source["metadata"]["labels"])
        meta["annotations"] = {
            k: v for k, v in source["metadata"]["annotations"].items() if k not in drop
        }

    return tamper


async def shaped_for(stack: Stack, target: Target, resource: dict[str, Any]) -> dict[str, Any]:
    """The first tenant's restore-target pod as the webhook shapes it (not created)."""
    from api.restore_pods import RestoreSettings, restore_pod

    asked = {
        "metadata": {"name": target.name, "annotations": {"warmstart.dev/restore-from": "llama"}},
        "spec": {"containers": [copy.deepcopy(target.main)]},
    }
    return restore_pod(asked, checkpoint=resource, settings=RestoreSettings())


@needs_containerd
@pytest.mark.timeout(240)
async def test_a_label_forged_with_another_namespaces_id_is_refused(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path
) -> None:
    """A pod that carries the first tenant's checkpoint ID and version (an unsalted hash
    anyone can compute) and names no Checkpoint: the node restores nothing into it."""
    image = kubelet.import_image(f"{WORKLOAD}:1")
    async with running_stack(client, cluster, kubelet, tmp_path) as stack:
        resource, token = await captured(stack, image)
        forged = Target(stack, "forged", image, tmp_path / "f.log", namespace=OTHER_NAMESPACE)
        victim = await shaped_for(stack, forged, resource)
        await forged.start(resource, tamper=copied(victim, "warmstart.dev/restore-from"))
        status = await refused_cold(forged, tmp_path)
        await forged.served(forged.log.read_text().split()[1])
    assert status.startswith("fell-back: Forbidden: the pod names no Checkpoint")
    assert token not in forged.log.read_text()


@needs_containerd
@pytest.mark.timeout(240)
async def test_a_forged_storage_location_is_refused_and_never_contacted(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path
) -> None:
    """The second tenant's pod agrees with its own Checkpoint but for a storage annotation
    naming an endpoint of its choosing and the first tenant's Secret: refused, and not one
    connection reaches that endpoint (nor is the Secret read)."""
    image = kubelet.import_image(f"{WORKLOAD}:1")
    keys = {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}
    secret = {
        "metadata": {"name": "s3-keys", "namespace": NAMESPACE},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in keys.items()},
    }
    await cluster.run(cluster.core.create_namespaced_secret, NAMESPACE, secret)
    async with listening() as attacker, running_stack(client, cluster, kubelet, tmp_path) as stack:
        resource, _ = await captured(stack, image)
        own = await second_tenants_checkpoint(stack, resource)
        where = {
            "bucket": "loot",
            "endpoint": f"http://127.0.0.1:{attacker[0]}",
            "credentials_secret": "s3-keys",
            "secret_namespace": NAMESPACE,
        }

        def point_elsewhere(pod: dict[str, Any]) -> None:
            pod["metadata"]["annotations"]["warmstart.dev/storage"] = json.dumps(where)

        forged = Target(stack, "forged", image, tmp_path / "f.log", namespace=OTHER_NAMESPACE)
        await forged.start(own, tamper=point_elsewhere)
        status = await refused_cold(forged, tmp_path)
    assert status == (
        "fell-back: Forbidden: annotation warmstart.dev/storage does not name where "
        "checkpoint llama is stored"
    )
    assert attacker[1] == 0
    assert not (tmp_path / "home" / "cache" / "checkpoints").exists()  # nothing fetched


@needs_containerd
@pytest.mark.timeout(240)
async def test_a_target_copied_from_another_namespaces_pod_is_refused(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path
) -> None:
    """The first tenant's pod is restored; its labels and annotations copied to a pod of
    the second tenant (another UID, another namespace, whose own `llama` has the same ID and
    another version) restore nothing there."""
    image = kubelet.import_image(f"{WORKLOAD}:1")
    async with running_stack(client, cluster, kubelet, tmp_path) as stack:
        resource, token = await captured(stack, image)
        first = Target(stack, "llama-0", image, tmp_path / "a.log")
        await first.start(resource)
        assert await first.restore_status() == "restored"
        await first.served(token)
        await second_tenants_checkpoint(stack, resource)
        pod = await stack.cluster.run(stack.cluster.core.read_namespaced_pod, "llama-0", NAMESPACE)
        original = stack.cluster.api.sanitize_for_serialization(pod)
        replay = Target(stack, "replay", image, tmp_path / "r.log", namespace=OTHER_NAMESPACE)
        await replay.start(resource, tamper=copied(original, "warmstart.dev/restore-status"))
        status = await refused_cold(replay, tmp_path)
    version = resource["status"]["version"]
    assert status == (
        f"fell-back: Forbidden: annotation warmstart.dev/checkpoint-version '{version}' is not "
        f"the version of checkpoint llama ({B_VERSION})"
    )
    assert token not in replay.log.read_text()


@needs_containerd
@pytest.mark.timeout(240)
async def test_a_version_captured_in_another_namespace_is_refused_before_it_is_read(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path
) -> None:
    """The second tenant's Checkpoint names the first's version (a status it should never
    have been able to write): the pod agrees with it, but the manifest records where the
    version was captured, and the node refuses it before the gate, the digests or CRIU."""
    image = kubelet.import_image(f"{WORKLOAD}:1")
    async with running_stack(client, cluster, kubelet, tmp_path) as stack:
        resource, token = await captured(stack, image)
        version = resource["status"]["version"]
        own = await second_tenants_checkpoint(stack, resource, version=version)
        target = Target(stack, "llama-b", image, tmp_path / "b.log", namespace=OTHER_NAMESPACE)
        await target.start(own)
        status = await refused_cold(target, tmp_path)
    ckpt = resource["status"]["checkpointID"]
    assert status == (
        f"fell-back: Forbidden: checkpoint {ckpt} version {version} was not captured in "
        f"namespace {OTHER_NAMESPACE}: a pod restores only its own namespace's checkpoints"
    )
    assert token not in target.log.read_text()


async def test_a_namespace_cannot_squat_another_namespaces_checkpoint_id(
    cluster: Cluster,
) -> None:
    """The second tenant claims the ID of an identity first: the first tenant's claim of
    the same ID in its own namespace still succeeds, and what either is told names only
    its own resources."""
    control = KubeControlActivities(cluster.api, claims_namespace="warmstart-system")
    template = {"spec": {"containers": [{"name": "main", "image": "vllm"}]}}
    ckpt = "96429b2725761a09"

    async def claim(namespace: str, name: str) -> None:
        body = checkpoint_body(name, template)
        body["metadata"]["namespace"] = namespace
        await cluster.run(
            cluster.custom.create_namespaced_custom_object,
            "warmstart.dev",
            "v1alpha1",
            namespace,
            "checkpoints",
            body,
        )
        uid = (await cluster.get("checkpoints", namespace, name))["metadata"]["uid"]
        ref = ResourceRef(kind="Checkpoint", namespace=namespace, name=name, uid=uid)
        request = ClaimInput(checkpoint_id=ckpt, namespace=namespace, name=name, resource=ref)
        await ActivityEnvironment().run(control.claim_checkpoint_id, request)

    await claim(OTHER_NAMESPACE, "squat")
    await claim(NAMESPACE, "llama")  # not squatted
    with pytest.raises(IdentityConflictError) as conflict:
        await claim(NAMESPACE, "llama-2")
    assert (
        str(conflict.value)
        == f"checkpoint ID {ckpt} is already owned by Checkpoint {NAMESPACE}/llama"
    )
    with pytest.raises(IdentityConflictError) as conflict:
        await claim(OTHER_NAMESPACE, "squat-2")
    assert OTHER_NAMESPACE in str(conflict.value) and NAMESPACE not in str(conflict.value)


@needs_containerd
@pytest.mark.timeout(240)
async def test_a_version_changed_where_it_is_stored_never_reaches_criu(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path
) -> None:
    """Whoever can write where a version is stored (a namespace's own bucket, say) can
    change its files and re-digest its manifest alike; the Checkpoint's status, which only
    the controller writes, records the manifest its capture committed, and the node refuses
    any other before the gate or CRIU see it."""
    image = kubelet.import_image(f"{WORKLOAD}:1")
    async with running_stack(client, cluster, kubelet, tmp_path) as stack:
        resource, token = await captured(stack, image)
        version_dir = stack.store.find(resource["status"]["checkpointID"])
        recorded = resource["status"]["manifestSHA256"]
        assert recorded == hashlib.sha256((version_dir / "manifest.json").read_bytes()).hexdigest()
        break_core_image(version_dir)  # crafted bytes, a manifest that vouches for them
        target = Target(stack, "llama-0", image, tmp_path / "a.log")
        await target.start(resource)
        status = await target.restore_status()
        await eventually(
            lambda: asyncio.sleep(0, "started" in target.log.read_text()), "the cold start"
        )
    assert status.startswith("fell-back: DigestMismatch: ")
    assert "its manifest is not the one its capture committed" in status
    assert not (tmp_path / "home" / "restores" / "pods" / target.uid).exists()  # no CRIU
    assert token not in target.log.read_text()
