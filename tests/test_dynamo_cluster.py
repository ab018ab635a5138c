"""Dynamo-instrumented workers (Dynamo's own published code, tests/programs/dynamo_worker.py)
on the cluster path: a Checkpoint's Job captures one from a real containerd container; a new
pod restores it, and the restored process answers with the new pod's POD_NAME and POD_UID
(Kubernetes' downward API, resolved in the new pod and handed over in
`restore-context.json`), not the capture pod's. Both kinds of standby: warmstart's script
wrapping the command, and an image that runs Dynamo's own standby mode (which, when the
restore fails, is turned off and restarted cold). Against kmock and a real kube-apiserver;
the test plays the Job controller, the scheduler and the kubelet."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from activities.criu.command import HARMLESS_LINES
from tests.cluster_stack import (
    Stack,
    Target,
    answer_in,
    break_core_image,
    eventually,
    recorded_manifest,
    running_stack,
)
from tests.containers import Kubelet, needs_containerd
from tests.dynamo import WORKER, dynamo_path
from tests.kube import Cluster, checkpoint_body

pytestmark = [needs_containerd, pytest.mark.timeout(240)]

COMMAND = ["python3", "/opt/programs/dynamo_worker.py", "8000"]


def identity_env() -> list[dict[str, Any]]:
    """What a Dynamo operator gives a worker: its pod's identity from the downward API."""

    def field(name: str, path: str) -> dict[str, Any]:
        return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}

    return [
        {"name": "PYTHONPATH", "value": "/opt/ai-dynamo"},
        field("POD_NAME", "metadata.name"),
        field("POD_UID", "metadata.uid"),
        field("POD_NAMESPACE", "metadata.namespace"),
    ]


def binds() -> dict[str, Path]:
    return {"/opt/ai-dynamo": dynamo_path(), "/opt/programs": WORKER.parent}


async def captured_worker(stack: Stack, image: str, log: Path) -> tuple[dict[str, Any], str]:
    """A Ready Checkpoint `llama` of the Dynamo worker, and the token its capture held."""
    main = {"name": "main", "image": "local/workload", "command": COMMAND, "env": identity_env()}
    template = {"metadata": {"labels": {"app": "llama"}}, "spec": {"containers": [main]}}
    await stack.cluster.create("checkpoints", checkpoint_body("llama", template))
    _job, pod, _cid, control = await stack.run_job_pod("llama", image=image, binds=binds(), log=log)
    # Dynamo's lifecycle ran (it needs DYN_SNAPSHOT_CONTROL_DIR, which the Job set).
    await eventually(
        lambda: asyncio.sleep(0, (control / "ready-for-snapshot").exists()), "ready-for-snapshot"
    )
    await stack.report(pod, {"running": {}}, ready=True)
    final = await stack.outcome("llama")
    assert final["phase"] == "Ready", final
    token = log.read_text().split("paused ", 1)[1].split()[0]
    resource = await stack.cluster.get("checkpoints", "inference", "llama")
    return resource, token


async def answer(target: Target) -> dict[str, Any]:
    text: str = await eventually(
        lambda: asyncio.to_thread(lambda: (t := answer_in(target.pid)).startswith("{") and t),
        f"{target.name} answering",
    )
    return dict(json.loads(text))


@pytest.mark.parametrize("standby", ["warmstart", "image"])
async def test_a_restored_dynamo_worker_takes_the_new_pods_identity(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path, standby: str
) -> None:
    image = kubelet.import_image("local/workload:1")
    async with running_stack(client, cluster, kubelet, tmp_path) as stack:
        resource, token = await captured_worker(stack, image, tmp_path / "capture.log")
        env = identity_env()
        if standby == "image":  # the image's entrypoint is Dynamo's own standby
            env.append({"name": "SNAPSHOT_RESTORE_STANDBY", "value": "1"})
        main = {"name": "main", "image": "local/workload", "command": COMMAND, "env": env}
        target = Target(stack, "llama-0", image, tmp_path / "llama-0.log", main=main, binds=binds())
        await target.start(resource)
        assert await target.restore_status() == "restored"
        answered = await answer(target)
        pid1 = Path(f"/proc/{target.pid}/cmdline").read_bytes().split(b"\0")
        # The standby the restored process lives under: Dynamo's own, or warmstart's script.
        assert pid1[:2] == ([b"sleep", b"infinity"] if standby == "image" else [b"/bin/sh", b"-c"])

    assert answered["token"] == token and answered["restored"] is True
    assert answered["env"]["POD_NAME"] == "llama-0"
    assert answered["env"]["POD_UID"] == target.uid
    assert answered["env"]["POD_NAMESPACE"] == "inference"
    context = json.loads((target.control / "restore-context.json").read_text())["env"]
    assert (context["POD_NAME"], context["POD_UID"]) == ("llama-0", target.uid)
    assert "PYTHONPATH" not in context  # only the names Dynamo re-reads
    assert (target.control / "restore-complete").exists()  # kept for the startup probe
    # CRIU's logs of a successful capture and restore: no error line left unexplained
    # (before: every restore logged iptables-restore "Bad rule" and "exited, status=1").
    restore_log = tmp_path / "home" / "restores" / "pods" / target.uid / "restore.log"
    status = resource["status"]
    dump_log = stack.store.version_dir(status["checkpointID"], status["version"]) / "criu"
    for log in (restore_log, dump_log / "dump.log"):
        assert unexplained(log.read_text()) == [], log.name


def unexplained(log: str) -> list[str]:
    """The error-looking lines of a CRIU log that no `warmstart: harmless` note explains."""
    lines = log.splitlines()
    notes = "\n".join(line for line in lines if line.startswith("warmstart: harmless"))
    return [
        line
        for line in lines
        if re.search(r"(?i)\b(error|fail|failed|can't|unable)\b", line)
        and not line.startswith("warmstart: ")
        and not any(known in line and known in notes for known in HARMLESS_LINES)
    ]


async def test_an_image_standby_whose_restore_fails_restarts_cold(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path
) -> None:
    image = kubelet.import_image("local/workload:1")
    async with running_stack(client, cluster, kubelet, tmp_path) as stack:
        resource, token = await captured_worker(stack, image, tmp_path / "capture.log")
        status = resource["status"]
        version_dir = stack.store.version_dir(status["checkpointID"], status["version"])
        break_core_image(version_dir)
        await recorded_manifest(cluster, version_dir)  # as if captured so: CRIU fails
        env = [*identity_env(), {"name": "SNAPSHOT_RESTORE_STANDBY", "value": "1"}]
        main = {"name": "main", "image": "local/workload", "command": COMMAND, "env": env}
        target = Target(stack, "llama-1", image, tmp_path / "llama-1.log", main=main, binds=binds())
        await target.start(resource)
        assert (await target.restore_status()).startswith("fell-back: RestoreFailed")
        # The node turned Dynamo's standby off and stopped it: the kubelet restarts it.
        await eventually(
            lambda: asyncio.sleep(0, kubelet.status(target.cid) != "RUNNING"), "standby stopped"
        )
        pod = await cluster.run(cluster.core.read_namespaced_pod, "llama-1", "inference")
        notes = pod.metadata.annotations
        assert (notes["warmstart.dev/standby"], notes["warmstart.dev/control-dir"]) == ("0", "")
        target.cid, _ = await target.run_container(control=target.control)
        answered = await answer(target)

    assert answered["restored"] is False and answered["token"] != token  # a cold start
    assert answered["env"]["POD_NAME"] == "llama-1"
