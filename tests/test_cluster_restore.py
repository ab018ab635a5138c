"""A Checkpoint restored on a cluster, end to end: captured from one real containerd
container, then restored by the node worker (which watches its restore targets) into the
standby container of a new pod shaped as the webhook shapes it, with real CRIU; or, when
it cannot be, the standby really starts the workload cold. Against kmock and a real
kube-apiserver; the test plays the scheduler and the kubelet."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from activities.storage.quarantine import Quarantine
from tests.cluster_stack import (
    Stack,
    Target,
    answer_in,
    break_core_image,
    captured,
    eventually,
    recorded_manifest,
    running_stack,
)
from tests.containers import Kubelet, needs_containerd
from tests.kube import Cluster
from workflows.contracts import RestoreResult

pytestmark = [needs_containerd, pytest.mark.timeout(240)]


async def test_a_checkpoint_is_restored_into_a_new_pods_standby_container(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path
) -> None:
    image = kubelet.import_image("local/workload:1")
    async with running_stack(client, cluster, kubelet, tmp_path) as stack:
        resource, token = await captured(stack, image)
        target = Target(stack, "llama-0", image, tmp_path / "llama-0.log")
        await target.start(resource)
        assert await target.restore_status() == "restored"
        workflow_id = f"restore/inference/llama-0/{target.uid}"
        handle = client.get_workflow_handle(workflow_id, result_type=RestoreResult)
        result = await handle.result()

    assert isinstance(result, RestoreResult)
    # The restored process: the source's state, in the standby container's network,
    # UTS and IPC namespaces, and a PID namespace under the standby's, its output in the
    # container's log.
    assert answer_in(target.pid) == token
    for kind in ("net", "uts", "ipc"):
        assert (
            os.stat(f"/proc/{result.pid}/ns/{kind}").st_ino
            == os.stat(f"/proc/{target.pid}/ns/{kind}").st_ino
        )
    assert Path(f"/proc/{result.pid}/status").read_text().count("\t") > 0
    assert (target.control / "restore-complete").read_text().strip().isdigit()
    await eventually(
        lambda: asyncio.sleep(0, f"restored {token}" in target.log.read_text()), "the log line"
    )
    assert await target.events() == [("Normal", "Restored")]
    # Started when the pod was scheduled: verified before the standby ran, then the standby
    # found as it announced itself: named by fanotify, or (`locate`: this stand-in kubelet
    # may start it before the node watches) by the runtime (tests/activities/test_announce.py
    # has both ways apart).
    stages = [s for s in result.stage_seconds if s != "locate"]
    assert stages == ["verify", "await-standby", "gate", "prepare", "criu-restore"]
    print(f"\nrestore phases ({cluster.url}): {json.dumps(result.stage_seconds)}")
    print(f"restore workflow steps: {json.dumps(result.step_seconds)}")


async def test_an_incompatible_checkpoint_starts_the_pod_cold_at_once(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path
) -> None:
    image = kubelet.import_image("local/workload:1")
    async with running_stack(client, cluster, kubelet, tmp_path) as stack:
        resource, token = await captured(stack, image)
        manifest_path = stack.store.find(resource["status"]["checkpointID"]) / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["host"]["kernel"] = "1.0.0-elsewhere"
        manifest_path.write_text(json.dumps(manifest))
        await recorded_manifest(stack.cluster, manifest_path.parent)  # as if captured so
        target = Target(stack, "llama-1", image, tmp_path / "llama-1.log")
        await target.start(resource)
        status = await target.restore_status()
        # The standby started the workload cold: a new process with a token of its own.
        await eventually(
            lambda: asyncio.sleep(0, "started" in target.log.read_text()), "the cold start"
        )
        cold = target.log.read_text().split()[1]
        await target.served(cold)

    assert status.startswith("fell-back: Incompatible: ")
    assert "needs kernel 1.0.0-elsewhere" in status
    assert cold != token
    assert (target.control / "restore-failed").read_text().startswith("Incompatible: ")
    assert await target.events() == [("Warning", "RestoreFellBack")]


async def test_restores_failing_on_two_nodes_of_a_class_quarantine_the_version_until_cleared(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path
) -> None:
    image = kubelet.import_image("local/workload:1")
    async with running_stack(client, cluster, kubelet, tmp_path, nodes=2) as stack:
        resource, token = await captured(stack, image)
        ckpt, version = resource["status"]["checkpointID"], resource["status"]["version"]
        version_dir = stack.store.find(ckpt)
        good = break_core_image(version_dir)  # verified bytes CRIU cannot restore
        # As if its capture had committed them: its Checkpoint records that manifest.
        await recorded_manifest(stack.cluster, version_dir)

        # One node's failure is pending evidence: it quarantines nothing.
        first = Target(stack, "llama-2", image, tmp_path / "llama-2.log")
        await first.start(resource)
        assert (await first.restore_status()).startswith("fell-back: RestoreFailed: ")
        quarantine = Quarantine(stack.store.root)
        assert quarantine.entries(ckpt) == []
        [pending] = quarantine.entries(ckpt, pending=True)
        assert (pending.version, pending.nodes) == (version, (stack.node,))

        # The same version failing on a second node of the class: quarantined there.
        second = Target(stack, "llama-3", image, tmp_path / "llama-3.log", node=stack.other_node)
        await second.start(resource)
        assert (await second.restore_status()).startswith("fell-back: RestoreFailed: ")
        [entry] = quarantine.entries(ckpt)
        assert (entry.version, entry.nodes) == (version, tuple(sorted(both_nodes(stack))))
        # ... and the Checkpoint's status shows it.
        [shown] = await eventually(lambda: quarantine_shown(stack), "the quarantine on the status")
        assert (shown["version"], shown["nodes"], shown["reason"]) == (
            version,
            sorted(both_nodes(stack)),
            "RestoreFailed",
        )
        assert shown["nodeClass"] == entry.node_class.describe()
        assert shown["expires"].startswith(f"{entry.expires:%Y-%m-%dT%H:%M:%S}")

        # Quarantined on this class: the next pod starts cold at once.
        third = Target(stack, "llama-4", image, tmp_path / "llama-4.log")
        await third.start(resource)
        status = await third.restore_status()
        assert status.startswith("fell-back: Quarantined: ")
        assert f"version {version} is quarantined on node class" in status
        await eventually(
            lambda: asyncio.sleep(0, "started" in third.log.read_text()), "the cold start"
        )
        assert not (tmp_path / "home" / "restores" / "pods" / third.uid).exists()  # no CRIU

        # Repaired and cleared: restored again (from a Checkpoint of the version as it was
        # captured, its manifest's digest the capture's), and the restore's status publish
        # shows the quarantine gone.
        good()
        assert len(quarantine.clear(ckpt)) == 1
        now = await stack.cluster.get("checkpoints", "inference", "llama")
        assert now["status"]["quarantine"]
        now["status"]["manifestSHA256"] = resource["status"]["manifestSHA256"]
        fixed = await same_version_as(stack, now, "llama-fixed")
        fourth = Target(stack, "llama-5", image, tmp_path / "llama-5.log", source="llama-fixed")
        await fourth.start(fixed)
        assert await fourth.restore_status() == "restored"
        await fourth.served(token)
        await eventually(lambda: none_shown(stack, "llama-fixed"), "no quarantine shown")


def both_nodes(stack: Stack) -> list[str]:
    return [stack.node, stack.other_node]


async def quarantine_shown(stack: Stack) -> list[dict[str, Any]] | None:
    """The quarantines the Checkpoint's status shows, once it shows any."""
    resource = await stack.cluster.get("checkpoints", "inference", "llama")
    shown: list[dict[str, Any]] = resource["status"].get("quarantine") or []
    return shown or None


async def none_shown(stack: Stack, name: str) -> bool:
    resource = await stack.cluster.get("checkpoints", "inference", name)
    return not resource["status"].get("quarantine")


async def same_version_as(stack: Stack, resource: dict[str, Any], name: str) -> dict[str, Any]:
    """Another Checkpoint `name` whose status is `resource`'s (the watcher stopped first: no
    capture of it starts)."""
    await stack.stop_watcher()
    cluster = stack.cluster
    body = {
        "apiVersion": resource["apiVersion"],
        "kind": "Checkpoint",
        "metadata": {
            "name": name,
            "namespace": "inference",
            "labels": resource["metadata"].get("labels") or {},  # the watcher's, as on it
        },
        "spec": resource["spec"],
    }
    plural = ("warmstart.dev", "v1alpha1", "inference", "checkpoints")
    await cluster.run(cluster.custom.create_namespaced_custom_object, *plural, body)
    status = {"status": resource["status"]}
    await cluster.run(cluster.custom.patch_namespaced_custom_object_status, *plural, name, status)
    return await cluster.get("checkpoints", "inference", name)
