"""A Checkpoint restored on a cluster, end to end: captured from one real containerd
container, then restored by the node worker (which watches its restore targets) into the
standby container of a new pod shaped as the webhook shapes it, with real CRIU; or, when
it cannot be, the standby really starts the workload cold. Against kmock and a real
kube-apiserver; the test plays the scheduler and the kubelet."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from activities.quarantine import Quarantine
from api.restore_pods import RestoreSettings, restore_pod
from tests.cluster_stack import Stack, eventually, running_stack
from tests.containers import Kubelet, needs_containerd
from tests.kube import Cluster
from workflows.contracts import RestoreResult

pytestmark = [needs_containerd, pytest.mark.timeout(240)]
PORT = 8000
# Serves a token chosen at start; captured once warm; after `snapshot-complete` the capture
# pod's process exits, after `restore-complete` the restored one goes on serving.
SERVING = f"""\
import http.server, os, secrets, sys, threading, time
control = os.environ['SNAPSHOT_CONTROL_DIR']
token = secrets.token_hex(8)
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(token.encode())
    def log_message(self, *args): pass
server = http.server.HTTPServer(('127.0.0.1', {PORT}), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
open(control + '/token', 'w').write(token)
print('started', token, flush=True)
open(control + '/ready-for-snapshot', 'w').close()
while True:
    if os.path.exists(control + '/restore-complete'):
        break
    if os.path.exists(control + '/snapshot-complete'):
        sys.exit(0)
    time.sleep(0.05)
print('restored', token, flush=True)
while True:
    time.sleep(1)
"""


def answer_in(pid: int) -> str:
    """GET / from inside the network namespace of process `pid` (a pod's own network)."""
    url = f"http://127.0.0.1:{PORT}/"
    fetch = f"import urllib.request as u; print(u.urlopen('{url}', timeout=5).read().decode())"
    done = subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", "python3", "-c", fetch],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return done.stdout.strip() if done.returncode == 0 else f"error: {done.stderr.strip()[-300:]}"


async def captured(stack: Stack, image: str) -> tuple[dict[str, Any], str]:
    """A Ready Checkpoint `llama` of SERVING, and the token its process served."""
    await stack.checkpoint("llama", ["python3", "-c", SERVING])
    _job, pod, _cid, control = await stack.run_job_pod("llama", image=image)
    await eventually(
        lambda: asyncio.sleep(0, (control / "ready-for-snapshot").exists()), "ready-for-snapshot"
    )
    await stack.report(pod, {"running": {}}, ready=True)
    final = await stack.outcome("llama")
    assert final["phase"] == "Ready", final
    resource = await stack.cluster.get("checkpoints", "inference", "llama")
    return resource, (control / "token").read_text()


class Target:
    """A restore-target pod: admitted as the webhook shapes it, bound to the stack's node,
    its standby container run by the kubelet."""

    def __init__(self, stack: Stack, name: str, image: str, log: Path) -> None:
        self.stack, self.name, self.image, self.log = stack, name, image, log
        self.uid, self.cid, self.control = "", "", Path()

    async def start(self, resource: dict[str, Any]) -> None:
        asked = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name,
                "namespace": "inference",
                "annotations": {"warmstart.dev/restore-from": "llama"},
            },
            "spec": {
                "containers": [
                    {
                        "name": "main",
                        "image": "local/workload",
                        "command": ["python3", "-c", SERVING],
                    }
                ]
            },
        }
        shaped = restore_pod(asked, checkpoint=resource, settings=RestoreSettings())
        shaped["spec"]["nodeName"] = self.stack.node  # the scheduler
        cluster = self.stack.cluster
        await cluster.run(cluster.core.create_namespaced_pod, "inference", shaped)
        pod = await cluster.run(cluster.core.read_namespaced_pod, self.name, "inference")
        self.uid = pod.metadata.uid
        main = shaped["spec"]["containers"][0]
        self.cid, self.control = self.stack.kubelet.run(
            self.uid, "main", main["command"], image=self.image, log=self.log
        )
        await self.stack.report(pod, {"running": {}}, ready=False)

    @property
    def pid(self) -> int:
        return self.stack.kubelet.pid(self.cid)

    async def restore_status(self) -> str:
        async def published() -> str | None:
            cluster = self.stack.cluster
            pod = await cluster.run(cluster.core.read_namespaced_pod, self.name, "inference")
            return (pod.metadata.annotations or {}).get("warmstart.dev/restore-status")

        found: str = await eventually(published, f"restore status of {self.name}", 90)
        return found

    async def events(self) -> list[tuple[str, str]]:
        cluster = self.stack.cluster
        listed = await cluster.run(cluster.events.list_namespaced_event, "inference")
        return [(e.type, e.reason) for e in listed.items if e.regarding.name == self.name]

    async def served(self, token: str) -> None:
        await eventually(
            lambda: asyncio.to_thread(lambda: answer_in(self.pid) == token),
            f"{self.name} serving {token}",
        )


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
    assert set(result.stage_seconds) >= {"verify", "criu-restore"}
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

        first = Target(stack, "llama-2", image, tmp_path / "llama-2.log")
        await first.start(resource)
        assert (await first.restore_status()).startswith("fell-back: RestoreFailed: ")
        quarantine = Quarantine(stack.store.root)
        [entry] = quarantine.entries(ckpt)
        assert entry.reason == "RestoreFailed"

        # Repaired, but this node class is quarantined: the next pod starts cold at once.
        good()
        second = Target(stack, "llama-3", image, tmp_path / "llama-3.log")
        await second.start(resource)
        status = await second.restore_status()
        assert status.startswith("fell-back: Quarantined: ")
        assert "is quarantined on node class" in status
        await eventually(
            lambda: asyncio.sleep(0, "started" in second.log.read_text()), "the cold start"
        )
        assert not (tmp_path / "home" / "restores" / "pods" / second.uid).exists()  # no CRIU

        assert len(quarantine.clear(ckpt)) == 1
        third = Target(stack, "llama-4", image, tmp_path / "llama-4.log")
        await third.start(resource)
        assert await third.restore_status() == "restored"
        await third.served(token)


def break_core_image(version_dir: Path) -> Any:
    """Truncate the dumped tree's core image and re-digest it in the manifest (bytes that
    verify, that CRIU cannot restore); returns what puts it back."""
    manifest_path = version_dir / "manifest.json"
    original_manifest = manifest_path.read_bytes()
    core = sorted((version_dir / "criu").glob("core-*.img"))[0]
    original = core.read_bytes()
    core.write_bytes(original[:8])
    manifest = json.loads(original_manifest)
    import hashlib

    for entry in manifest["files"]:
        if entry["path"] == f"criu/{core.name}":
            entry["size"], entry["sha256"] = 8, hashlib.sha256(original[:8]).hexdigest()
    manifest_path.write_text(json.dumps(manifest))

    def repair() -> None:
        core.write_bytes(original)
        manifest_path.write_bytes(original_manifest)

    return repair
