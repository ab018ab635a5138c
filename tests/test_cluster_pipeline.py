"""A Checkpoint captured on a cluster, end to end: the watcher (kopf) and the control
activities against an emulated API server, the real CaptureWorkflow on the real dev
server, and a node worker that dumps a real containerd container with real CRIU. The test
plays the Job controller, the scheduler and the kubelet."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from api.resources import Checkpoint
from tests.cluster_stack import WORKLOAD, eventually, running_stack
from tests.containers import Kubelet, needs_containerd
from tests.kube import Cluster

pytestmark = [needs_containerd, pytest.mark.timeout(180)]


async def test_a_checkpoint_is_captured_from_a_real_container(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path
) -> None:
    async with running_stack(client, cluster, kubelet, tmp_path) as stack:
        resource = await stack.checkpoint("llama", ["python3", "-c", WORKLOAD])
        created, pod, cid, control_dir = await stack.run_job_pod("llama")
        await eventually(
            lambda: asyncio.sleep(0, (control_dir / "ready-for-snapshot").exists()),
            "ready-for-snapshot",
        )
        await stack.report(pod, {"running": {}}, ready=True)
        final = await stack.outcome("llama")

    assert final["phase"] == "Ready", final
    ckpt = Checkpoint.model_validate(resource).checkpoint_id
    assert (final["checkpointID"], final["nodeName"]) == (ckpt, stack.node)
    assert final["jobName"] == created.metadata.name
    uid = resource["metadata"]["uid"]
    assert final["workflow"]["id"] == f"capture/inference/llama/{uid}"
    assert {c["type"]: c["status"] for c in final["conditions"]} == {
        "JobCreated": "True",
        "Captured": "True",
        "Uploaded": "True",
        "Ready": "True",
    }
    version_dir = stack.store.version_dir(final["checkpointID"], final["version"])
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert manifest["source"]["pod"] == pod.metadata.name
    assert final["sizeBytes"] > 4 << 20
    # snapshot-complete was written: the workload ended by itself.
    await eventually(
        lambda: asyncio.sleep(0, stack.kubelet.status(cid) == "STOPPED"), "the workload to exit"
    )
    print("capture step seconds:", json.dumps(final["stepSeconds"]))


async def test_a_workload_that_exits_non_zero_fails_the_capture_and_its_job_goes(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path
) -> None:
    crash = "import sys; print('out of memory loading weights', flush=True); sys.exit(3)"
    async with running_stack(client, cluster, kubelet, tmp_path) as stack:
        await stack.checkpoint("crashing", ["python3", "-c", crash])
        created, pod, cid, _control = await stack.run_job_pod("crashing")
        await eventually(
            lambda: asyncio.sleep(0, stack.kubelet.status(cid) == "STOPPED"), "the crash"
        )
        await stack.report(pod, {"terminated": {"exitCode": 3, "reason": "Error"}}, ready=False)
        final = await stack.outcome("crashing")

        async def job_gone() -> bool:
            jobs = await cluster.run(cluster.batch.list_namespaced_job, "inference")
            return created.metadata.name not in [j.metadata.name for j in jobs.items]

        await eventually(job_gone, "the failed capture's Job to be deleted")
    assert final["phase"] == "Failed"
    assert final["message"] == "container main exited with code 3 (Error)"
    ready = next(c for c in final["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "WorkloadExited")
    assert stack.store.staged() == []


async def test_a_pod_on_a_node_without_a_node_worker_is_node_lost(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path
) -> None:
    async with running_stack(client, cluster, kubelet, tmp_path) as stack:
        await stack.checkpoint("orphan", ["python3", "-c", WORKLOAD])
        _created, pod, _cid, control_dir = await stack.run_job_pod("orphan", node="gpu-gone")
        await eventually(
            lambda: asyncio.sleep(0, (control_dir / "ready-for-snapshot").exists()),
            "ready-for-snapshot",
        )
        await stack.report(pod, {"running": {}}, ready=True)
        final = await stack.outcome("orphan")
    assert final["phase"] == "Failed"
    assert final["nodeName"] == "gpu-gone"
    assert "node gpu-gone" in final["message"] and "dump_container" in final["message"]
    ready = next(c for c in final["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "NodeLost"


async def test_a_watcher_restarted_mid_capture_finishes_it_once(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path
) -> None:
    async with running_stack(client, cluster, kubelet, tmp_path) as stack:
        resource = await stack.checkpoint("restarted", ["python3", "-c", WORKLOAD])
        _created, pod, _cid, control_dir = await stack.run_job_pod("restarted")
        await eventually(
            lambda: asyncio.sleep(0, (control_dir / "ready-for-snapshot").exists()),
            "ready-for-snapshot",
        )
        await stack.stop_watcher()  # down while the pod becomes Ready: a missed event
        await stack.report(pod, {"running": {}}, ready=True)
        await stack.start_watcher()
        final = await stack.outcome("restarted")
    assert final["phase"] == "Ready", final
    # Once: the one run (its ID admits no other) dumped and committed once, fed by the
    # restarted watcher's reading of the pod it had missed.
    workflow_id = f"capture/inference/restarted/{resource['metadata']['uid']}"
    handle = client.get_workflow_handle(workflow_id)
    history = await handle.fetch_history()
    scheduled = [
        event.activity_task_scheduled_event_attributes.activity_type.name
        for event in history.events
        if event.HasField("activity_task_scheduled_event_attributes")
    ]
    assert scheduled.count("dump_container") == 1, scheduled
    assert scheduled.count("commit_container") == 1, scheduled
    assert (await handle.result())["version"] == final["version"]


@pytest.mark.parametrize("trigger", ["annotation", "schedule"])
async def test_a_later_run_publishes_a_new_version_and_keeps_the_old_one_meanwhile(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path, trigger: str
) -> None:
    """A capture on demand (the annotation) and one of the Checkpoint's Schedule (fired now,
    as at its time) each capture a new version of the same checkpoint ID."""
    schedule = {"schedule": {"cron": "0 3 * * *"}} if trigger == "schedule" else {}
    async with running_stack(client, cluster, kubelet, tmp_path) as stack:
        resource = await stack.checkpoint("again", ["python3", "-c", WORKLOAD], **schedule)
        uid = resource["metadata"]["uid"]
        first_job, pod, _cid, control_dir = await stack.run_job_pod("again")
        await eventually(
            lambda: asyncio.sleep(0, (control_dir / "ready-for-snapshot").exists()),
            "ready-for-snapshot",
        )
        await stack.report(pod, {"running": {}}, ready=True)
        first = await stack.outcome("again")
        assert first["phase"] == "Ready", first

        # Asked again: a run of its own, with a Job of its own that names it.
        if trigger == "schedule":
            await client.get_schedule_handle(f"capture-schedule/inference/again/{uid}").trigger()
        else:
            await cluster.run(
                cluster.custom.patch_namespaced_custom_object,
                "warmstart.dev",
                "v1alpha1",
                "inference",
                "checkpoints",
                "again",
                {"metadata": {"annotations": {"capture.warmstart.dev/now": "after-rollout-42"}}},
            )
        job, pod, _cid, control_dir = await stack.run_job_pod(
            "again", skip={first_job.metadata.name}
        )
        run = job.metadata.annotations["warmstart.dev/capture-workflow"]
        kind = "scheduled-" if trigger == "schedule" else "on-demand-"
        assert run.startswith(f"capture/inference/again/{uid}/{kind}")
        assert job.metadata.name != first_job.metadata.name
        await eventually(
            lambda: asyncio.sleep(0, (control_dir / "ready-for-snapshot").exists()),
            "ready-for-snapshot of the second run",
        )
        # While it runs the resource stays Ready with the version pods restore.
        meanwhile = (await cluster.get("checkpoints", "inference", "again"))["status"]
        assert (meanwhile["phase"], meanwhile["version"]) == ("Ready", first["version"])
        conditions = {c["type"]: c for c in meanwhile["conditions"]}
        assert conditions["Recapturing"]["status"] == "True"
        await stack.report(pod, {"running": {}}, ready=True)

        async def recaptured() -> Any:
            status = (await cluster.get("checkpoints", "inference", "again"))["status"]
            cond = {c["type"]: c for c in status["conditions"]}.get("Recapturing", {})
            return status if cond.get("status") == "False" else None

        second = await eventually(recaptured, "the second run to end", 90)

        async def reasons_of_both_runs() -> list[str] | None:
            # The Event follows the status patch that ends the run: read until it is there.
            events = await cluster.run(cluster.events.list_namespaced_event, "inference")
            said = [str(e.reason) for e in events.items if e.regarding.name == "again"]
            return said if said.count("CaptureSucceeded") >= 2 else None

        reasons = await eventually(reasons_of_both_runs, "the second run's CaptureSucceeded", 30)
    assert (second["phase"], second["checkpointID"]) == ("Ready", first["checkpointID"])
    assert second["version"] != first["version"]
    assert second["manifestSHA256"] != first["manifestSHA256"]
    assert second["workflow"]["id"] == run and second["jobName"] == job.metadata.name
    cond = {c["type"]: c for c in second["conditions"]}["Recapturing"]
    assert (cond["reason"], second["version"] in cond["message"]) == ("Captured", True)
    # Both versions are committed: the old one stays for retention to decide.
    for version in (first["version"], second["version"]):
        assert (stack.store.version_dir(first["checkpointID"], version) / "manifest.json").exists()
    assert reasons.count("CaptureSucceeded") == 2 and "RecaptureStarted" in reasons, reasons
