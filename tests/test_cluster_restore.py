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
    assert set(result.stage_seconds) == {"verify", "prepare", "criu-restore"}
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


async def test_a_restore_failing_on_this_node_class_is_quarantined_then_cleared(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path
) -> None:
    image = kubelet.import_image("local/workload:1")
    async with running_stack(client, cluster, kubelet, tmp_path) as stack:
        resource, token = await captured(stack, image)
        ckpt = resource["status"]["checkpointID"]
        version_dir = stack.store.find(ckpt)
        good = break_core_image(version_dir)  # verified bytes CRIU cannot restore
        # As if its capture had committed them: its Checkpoint records that manifest.
        await recorded_manifest(stack.cluster, version_dir)

        first = Target(stack, "llama-2", image, tmp_path / "llama-2.log")
        await first.start(resource)
        assert (await first.restore_status()).startswith("fell-back: RestoreFailed: ")
        quarantine = Quarantine(stack.store.root)
        [entry] = quarantine.entries(ckpt)
        assert entry.reason == "RestoreFailed"

        # This node class is quarantined now: the next pod starts cold at once.
        second = Target(stack, "llama-3", image, tmp_path / "llama-3.log")
        await second.start(resource)
        status = await second.restore_status()
        assert status.startswith("fell-back: Quarantined: ")
        assert "is quarantined on node class" in status
        await eventually(
            lambda: asyncio.sleep(0, "started" in second.log.read_text()), "the cold start"
        )
        assert not (tmp_path / "home" / "restores" / "pods" / second.uid).exists()  # no CRIU

        # Repaired and cleared: restored again (from a Checkpoint of the version as it was
        # captured, its manifest's digest the capture's).
        good()
        assert len(quarantine.clear(ckpt)) == 1
        fixed = await same_version_as(stack, resource, "llama-fixed")
        third = Target(stack, "llama-4", image, tmp_path / "llama-4.log", source="llama-fixed")
        await third.start(fixed)
        assert await third.restore_status() == "restored"
        await third.served(token)


async def same_version_as(stack: Stack, resource: dict[str, Any], name: str) -> dict[str, Any]:
    """Another Checkpoint `name` whose status is `resource`'s (the watcher stopped first: no
    capture of it starts)."""
    await stack.stop_watcher()
    cluster = stack.cluster
    body = {
        "apiVersion": resource["apiVersion"],
        "kind": "Checkpoint",
        "metadata": {"name": name, "namespace": "inference"},
        "spec": resource["spec"],
    }
    plural = ("warmstart.dev", "v1alpha1", "inference", "checkpoints")
    await cluster.run(cluster.custom.create_namespaced_custom_object, *plural, body)
    status = {"status": resource["status"]}
    await cluster.run(cluster.custom.patch_namespaced_custom_object_status, *plural, name, status)
    return await cluster.get("checkpoints", "inference", name)
