"""Verified checkpoints on a cluster (decision 0045), end to end: a Checkpoint with
`spec.verify` is captured from a real containerd container; its version, held back on the
capturing node, is restored with real CRIU into a verification pod the controller creates
(the Checkpoint's template shaped as a restore target, required onto that node), and it is
Ready only once that pod is restored and passes its readiness probe. Against kmock and a
real kube-apiserver; the test plays the Job controller, the scheduler and the kubelet (its
HTTP readiness probe run in the pod's network namespace, and its pod deletions)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from temporalio.client import Client

from activities.storage.quarantine import Quarantine
from api.errors import CheckpointNotFoundError
from tests.cluster_stack import PORT, Stack, Target, eventually, kubelet_env, running_stack
from tests.containers import Kubelet, needs_containerd
from tests.kube import Cluster, checkpoint_body

pytestmark = [needs_containerd, pytest.mark.timeout(300)]

# Serves GET / on PORT: 200, or with BOUND set, 503 once it is not the process it started as
# (a restored copy is a new process: another start time), as a worker whose lease or
# licence is bound to its process. Captured once warm; after `snapshot-complete` the capture
# pod's process exits, after `restore-complete` the restored one goes on serving.
_PROGRAM = """\
import http.server, os, sys, threading, time
control = os.environ['SNAPSHOT_CONTROL_DIR']
def started():
    with open('/proc/self/stat') as stat:
        return stat.read().rsplit(')', 1)[1].split()[19]
STARTED = started()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        same = not BOUND or started() == STARTED
        self.send_response(200 if same else 503); self.end_headers()
        self.wfile.write(b'serving' if same else b'not the process that started')
    def log_message(self, *args): pass
server = http.server.HTTPServer(('127.0.0.1', PORT), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
print('started', STARTED, flush=True)
open(control + '/ready-for-snapshot', 'w').close()
while True:
    if os.path.exists(control + '/restore-complete'):
        break
    if os.path.exists(control + '/snapshot-complete'):
        sys.exit(0)
    time.sleep(0.05)
print('restored', flush=True)
while True:
    time.sleep(1)
"""
VERIFICATION_LABEL = "warmstart.dev/verification"


def template(*, bound: bool) -> dict[str, Any]:
    program = f"BOUND = {bound}\nPORT = {PORT}\n{_PROGRAM}"
    main = {
        "name": "main",
        "image": "local/workload",
        "command": ["python3", "-c", program],
        "readinessProbe": {"httpGet": {"path": "/", "port": PORT}, "periodSeconds": 1},
    }
    return {"metadata": {"labels": {"app": "llama"}}, "spec": {"containers": [main]}}


def probe_in(pid: int) -> int:
    """The kubelet's HTTP readiness probe, GET / on PORT inside the network namespace of
    process `pid` (the pod's): the status code, 0 without an answer."""
    fetch = (
        "import urllib.request as u, urllib.error as e\n"
        "try:\n"
        f"    print(u.urlopen('http://127.0.0.1:{PORT}/', timeout=5).status)\n"
        "except e.HTTPError as err:\n"
        "    print(err.code)\n"
        "except Exception:\n"
        "    print(0)\n"
    )
    done = subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", "python3", "-c", fetch],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return int(done.stdout.strip() or 0) if done.returncode == 0 else 0


class Verification:
    """The scheduler and the kubelet of the verification pod: bound to the node its affinity
    requires, its container run from the image with the environment the pod declares, its
    readiness probe run once the node restored it and reported, and its deletion carried
    out (the container killed, the pod removed)."""

    def __init__(self, stack: Stack, image: str, log: Path) -> None:
        self.stack, self.image, self.log = stack, image, log
        self.name = self.uid = self.version = self.required_node = self.restore_status = ""
        self.codes: list[int] = []
        self.deleted = False

    async def play(self) -> None:
        cluster = self.stack.cluster

        async def created() -> Any:
            pods = await cluster.run(
                cluster.core.list_namespaced_pod,
                "inference",
                label_selector=f"{VERIFICATION_LABEL}=true",
            )
            mine = [p for p in pods.items if (p.metadata.labels or {}).get(VERIFICATION_LABEL)]
            return mine[0] if mine else None

        pod = await eventually(created, "the verification pod", 90)
        self.name, self.uid = pod.metadata.name, pod.metadata.uid
        self.version = pod.metadata.annotations["warmstart.dev/checkpoint-version"]
        terms = pod.spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution
        [term] = terms.node_selector_terms
        [field] = term.match_fields
        assert (field.key, field.operator) == ("metadata.name", "In")
        [self.required_node] = field.values
        assert pod.spec.node_name is None  # the scheduler's to place
        await self._bind(self.required_node)
        bound = await cluster.run(cluster.core.read_namespaced_pod, self.name, "inference")
        spec = cluster.api.sanitize_for_serialization(bound)
        main = spec["spec"]["containers"][0]
        cid, control = self.stack.kubelet.run(
            self.uid,
            "main",
            main["command"],
            image=self.image,
            log=self.log,
            env=kubelet_env(spec, main),
        )
        ready: bool | None = None
        while True:
            try:
                now = await cluster.run(cluster.core.read_namespaced_pod, self.name, "inference")
            except ApiException as err:
                assert err.status == 404
                break
            if now.metadata.uid != self.uid:
                break
            if now.metadata.deletion_timestamp is not None:
                await self._stop(cid, force=True)
                break
            notes = now.metadata.annotations or {}
            self.restore_status = notes.get("warmstart.dev/restore-status", self.restore_status)
            if (control / "restore-complete").exists():
                code = await asyncio.to_thread(self._probe, cid)
                self.codes.append(code)
                if ready != (code == 200):
                    ready = code == 200
                    await self.stack.report(now, {"running": {}}, ready=ready, container_id=cid)
            await asyncio.sleep(0.5)
        await self._stop(cid, force=False)
        self.deleted = True

    def _probe(self, cid: str) -> int:
        try:
            return probe_in(self.stack.kubelet.pid(cid))
        except LookupError:  # the container ended
            return 0

    async def _bind(self, node: str) -> None:
        """The scheduler binds the pod (a real API server takes a Binding; kmock, the field)."""
        cluster = self.stack.cluster
        if cluster.emulator is not None:
            body: dict[str, Any] = {"spec": {"nodeName": node}}
            await cluster.run(cluster.core.patch_namespaced_pod, self.name, "inference", body)
            return
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": self.name, "namespace": "inference"},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        await cluster.run(
            cluster.core.create_namespaced_pod_binding,
            self.name,
            "inference",
            binding,
            _preload_content=False,
        )

    async def _stop(self, cid: str, *, force: bool) -> None:
        """The kubelet ends the container; `force`: and removes the pod being deleted."""
        kubelet = self.stack.kubelet
        await asyncio.to_thread(
            kubelet.ctr, "tasks", "kill", "--signal", "SIGKILL", cid, check=False
        )
        if force:
            cluster = self.stack.cluster
            with contextlib.suppress(ApiException):
                await cluster.run(
                    cluster.core.delete_namespaced_pod,
                    self.name,
                    "inference",
                    grace_period_seconds=0,
                )

    async def gone(self) -> bool:
        cluster = self.stack.cluster
        try:
            await cluster.run(cluster.core.read_namespaced_pod, self.name, "inference")
        except ApiException as err:
            return err.status == 404
        return False


async def verified_capture(
    stack: Stack, image: str, tmp_path: Path, *, bound: bool, timeout: int
) -> tuple[dict[str, Any], Verification]:
    """Checkpoint `llama` of the program (`bound`: it answers 503 restored), verified with
    `timeout` seconds for the restored pod to be Ready: its outcome and what the kubelet of
    its verification pod saw."""
    body = checkpoint_body(
        "llama", template(bound=bound), verify=True, verifyTimeoutSeconds=timeout
    )
    await stack.cluster.create("checkpoints", body)
    _job, pod, _cid, control = await stack.run_job_pod("llama", image=image)
    await eventually(
        lambda: asyncio.sleep(0, (control / "ready-for-snapshot").exists()), "ready-for-snapshot"
    )
    await stack.report(pod, {"running": {}}, ready=True)
    verification = Verification(stack, image, tmp_path / "verification.log")
    playing = asyncio.create_task(verification.play())
    try:
        final = await stack.outcome("llama")
        await asyncio.wait_for(asyncio.shield(playing), 60)
    finally:
        playing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await playing
    return final, verification


async def test_a_verified_checkpoint_is_ready_once_its_verification_pod_restored_and_answered(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path
) -> None:
    image = kubelet.import_image("local/workload:1")
    async with running_stack(client, cluster, kubelet, tmp_path) as stack:
        final, verification = await verified_capture(
            stack, image, tmp_path, bound=False, timeout=30
        )
        assert final["phase"] == "Ready", final
        ckpt, version = final["checkpointID"], final["version"]
        # Its version is the one the verification pod restored on the capturing node, which
        # answered its readiness probe; the pod is gone and the status no longer names it.
        assert version == verification.version
        assert verification.required_node == stack.node == final["nodeName"]
        assert verification.restore_status == "restored"
        assert 200 in verification.codes
        assert verification.deleted and await verification.gone()
        assert not final.get("verifying")
        assert final["stepSeconds"]["verify"] > 0
        # Offered: committed without the held-back mark, and a restore target restores it.
        version_dir = stack.store.find(ckpt)
        assert version_dir.name == version and not (version_dir / "unverified").exists()
        assert Quarantine(stack.store.root).entries(ckpt, pending=True) == []
        resource = await stack.cluster.get("checkpoints", "inference", "llama")
        target = Target(stack, "llama-0", image, tmp_path / "llama-0.log")
        await target.start(resource)
        assert await target.restore_status() == "restored"


async def test_a_version_whose_verification_pod_does_not_answer_fails_and_is_never_offered(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path
) -> None:
    image = kubelet.import_image("local/workload:1")
    async with running_stack(client, cluster, kubelet, tmp_path) as stack:
        final, verification = await verified_capture(stack, image, tmp_path, bound=True, timeout=3)
        assert final["phase"] == "Failed", final
        [ready] = [c for c in final["conditions"] if c["type"] == "Ready"]
        assert ready["reason"] == "VerifyFailed"
        # The pod was restored and answered 503 to its probe: never Ready.
        assert verification.restore_status == "restored"
        assert 503 in verification.codes and 200 not in verification.codes
        message = final["message"]
        assert message.startswith(f"version {verification.version}: verification pod ")
        assert "was restored, but its container was not Ready within 3 s" in message
        assert verification.deleted and await verification.gone()
        assert not final.get("verifying") and not final.get("version")
        # The version is deleted on the node: never offered, no quarantine evidence.
        ckpt = final["checkpointID"]
        versions = stack.store.root / ckpt / "versions"
        assert not (versions / verification.version).exists()
        with pytest.raises(CheckpointNotFoundError):
            stack.store.find(ckpt)
        assert Quarantine(stack.store.root).entries(ckpt, pending=True) == []

        # A restore target claiming that version is refused by its node: it starts cold.
        resource = await stack.cluster.get("checkpoints", "inference", "llama")
        claimed = copy.deepcopy(resource)
        claimed["status"].update({"phase": "Ready", "version": verification.version})
        target = Target(stack, "llama-1", image, tmp_path / "llama-1.log")
        await target.start(claimed)
        status = await target.restore_status()
        assert status == (
            "fell-back: CheckpointNotFound: checkpoint llama is not Ready (phase Failed)"
        )
        await eventually(
            lambda: asyncio.sleep(0, "started" in target.log.read_text()), "the cold start"
        )
