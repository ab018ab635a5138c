"""End to end on a real node, through the installed manifests (issue 22, point 4): the image
built from this tree (`tests/images.py`) imported into a real one-node cluster
(`tests/realnode.py`), warmstart installed with `kubectl apply -k` of an overlay of
`deploy/kubernetes` that says only where this cluster's parts are (the API server, the
Temporal dev server on the node's address, the node's containerd and kubelet directories, a
hostPath volume for the checkpoints claim), a tenant namespace opting in with tenant.yaml.
Then a Checkpoint goes Ready through the real Job controller, scheduler and kubelet and the
node worker's CRIU dump in its DaemonSet pod, and a pod that asks to be restored from it is
shaped by the real webhook, restored into the standby the kubelet started, passes its
startup probe and answers from its pod IP with the captured state."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
import yaml
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from api.naming import capture_workflow_id, restore_workflow_id
from tests.containers import oci_archive
from tests.images import built_tarball, needs_image
from tests.realnode import RealNode, needs_real_node, running_node, wait_for
from workers.devserver import DevServer
from workers.ports import free_port, port_open
from workflows.contracts import CaptureResult, RestoreResult

pytestmark = [needs_real_node, needs_image, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[1]
RESTORE_STATUS = "warmstart.dev/restore-status"
CAPTURED: dict[str, str] = {}  # what the first test captured, for the others
TEMPORAL: dict[str, str] = {}  # the dev server's address, where the tests read histories
FIGURES: dict[str, float] = {}
STAGES: dict[str, float] = {}  # the restore's stages (ms), for the printout
WORKLOAD = "warmstart.test/server:1"
TENANT = "inference"
PORT = 8080
NODE_WORKER = "app.kubernetes.io/component=node"
# The workload's synthetic warm-up before it serves (what a cold start pays, a restore not).
WARMUP_SECONDS = 5
# The workload: a token chosen at start, served on the pod's address; ready for a snapshot
# once serving; exits when the snapshot is complete (the capture Job completes), goes on
# serving when restored. Its output is the container's log.
SERVER = f"""\
import http.server, os, secrets, sys, threading, time
control = os.environ.get('SNAPSHOT_CONTROL_DIR', '')
token = secrets.token_hex(8)
time.sleep(float(os.environ.get('WARMUP', '0')))  # a model's load, compile, warm-up
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        print('served', token, flush=True)
        self.send_response(200); self.end_headers(); self.wfile.write(token.encode())
    def log_message(self, *args): pass
server = http.server.HTTPServer(('0.0.0.0', {PORT}), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
print('started', token, flush=True)
while not control:  # a pod started cold by its owner: no snapshot protocol
    time.sleep(1)
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


def workload_spec() -> dict[str, Any]:
    """The workload's pod spec: the skeleton image with the host's /usr read-only."""
    return {
        "containers": [
            {
                "name": "main",
                "image": WORKLOAD,
                "imagePullPolicy": "Never",
                "command": ["python3", "-c", SERVER],
                "env": [{"name": "WARMUP", "value": str(WARMUP_SECONDS)}],
                "ports": [{"containerPort": PORT}],
                "volumeMounts": [{"name": "usr", "mountPath": "/usr", "readOnly": True}],
            }
        ],
        "volumes": [{"name": "usr", "hostPath": {"path": "/usr", "type": "Directory"}}],
        "terminationGracePeriodSeconds": 1,
    }


@contextlib.contextmanager
def temporal_on(address: str, base: Path) -> Iterator[str]:
    """The Temporal dev server on `address` (where the pods reach it); its host:port."""
    port = free_port()
    server = DevServer(db_file=base / "temporal.db", port=port, ui_port=free_port(), headless=True)
    log = (base / "temporal.log").open("wb")
    process = subprocess.Popen(
        # Every address: the dev server's own services reach each other on the loopback
        # whatever `--ip` says, so bound to `address` alone its frontend reaches none.
        [*server.command(), "--ip", "0.0.0.0"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: port_open(port, host=address), "the Temporal dev server", timeout=60)
        yield f"{address}:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def overlay(node: RealNode, directory: Path, *, image: str, temporal: str) -> Path:
    """A kustomization on `deploy/kubernetes` saying where this cluster's parts are: the
    settings a platform team writes for its own cluster, nothing of warmstart's own. The
    image is set by patches: the `images` field of kubectl 1.20's kustomize (2.0.3) fails
    on the CRDs' schemas (a property named `containers`)."""
    directory.mkdir(parents=True, exist_ok=True)
    host, port = node.url.removeprefix("https://").rsplit(":", 1)
    api = [
        {"name": "KUBERNETES_SERVICE_HOST", "value": host},
        {"name": "KUBERNETES_SERVICE_PORT", "value": port},
        {"name": "WARMSTART_TEMPORAL__ADDRESS", "value": temporal},
    ]
    base = node.base
    checkpoints = base / "checkpoints"
    checkpoints.mkdir(exist_ok=True)

    def deployment(name: str, container: str) -> dict[str, Any]:
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": "warmstart-system"},
            "spec": {
                "replicas": 1,
                "template": {
                    "spec": {"containers": [{"name": container, "image": image, "env": api}]}
                },
            },
        }

    node_env = [
        *api,
        {"name": "WARMSTART_NODE__RUNTIME_ENDPOINT", "value": node.containerd_address},
        {"name": "WARMSTART_NODE__RUNTIME_STATE", "value": str(base / "state")},
        {"name": "WARMSTART_NODE__KUBELET_ROOT", "value": str(base / "kubelet")},
    ]
    host_dir = {"type": "Directory"}
    daemonset = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "warmstart-node", "namespace": "warmstart-system"},
        "spec": {
            "template": {
                "spec": {
                    "initContainers": [{"name": "install-seccomp-profile", "image": image}],
                    "containers": [
                        {
                            "name": "node",
                            "image": image,
                            "env": node_env,
                            "volumeMounts": [
                                {"name": "containerd", "mountPath": str(base / "state")},
                                {"name": "kubelet", "mountPath": str(base / "kubelet")},
                                # This machine's / is not a shared mount (a systemd node's
                                # is): no propagation from it.
                                {
                                    "name": "host-root",
                                    "mountPath": "/host",
                                    "mountPropagation": "None",
                                },
                                {"name": "socket", "mountPath": node.containerd_address},
                            ],
                        }
                    ],
                    "volumes": [
                        {
                            "name": "containerd",
                            "hostPath": {"path": str(base / "state"), **host_dir},
                        },
                        {
                            "name": "kubelet",
                            "hostPath": {"path": str(base / "kubelet"), **host_dir},
                        },
                        {"name": "socket", "hostPath": {"path": node.containerd_address}},
                        {"name": "state", "hostPath": {"path": str(base / "warmstart-node")}},
                        {
                            "name": "seccomp",
                            "hostPath": {"path": str(base / "kubelet" / "seccomp")},
                        },
                    ],
                }
            }
        },
    }
    volume = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": "warmstart-checkpoints"},
        "spec": {
            "capacity": {"storage": "10Gi"},
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "",
            "hostPath": {"path": str(checkpoints), "type": "Directory"},
            "claimRef": {"namespace": "warmstart-system", "name": "warmstart-checkpoints"},
        },
    }
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "warmstart-checkpoints", "namespace": "warmstart-system"},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "",
            "volumeName": "warmstart-checkpoints",
            "resources": {"requests": {"storage": "10Gi"}},
        },
    }
    files = {
        "controller.yaml": deployment("warmstart-controller", "controller"),
        "webhook.yaml": deployment("warmstart-webhook", "webhook"),
        "node.yaml": daemonset,
        "volume.yaml": volume,
        "claim.yaml": claim,
    }
    for file, body in files.items():
        (directory / file).write_text(yaml.safe_dump(body))
    kustomization = {
        "bases": [os.path.relpath(REPO / "deploy" / "kubernetes", directory)],
        "resources": ["volume.yaml", "claim.yaml"],
        "patchesStrategicMerge": ["controller.yaml", "webhook.yaml", "node.yaml"],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return directory


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    """A real node with warmstart installed as a user installs it, and a tenant namespace."""
    tarball = built_tarball()
    image = image_reference(tarball)
    for node in running_node():
        started = time.monotonic()
        node.import_image(tarball)
        node.import_image(oci_archive(WORKLOAD))
        imported = time.monotonic() - started
        with temporal_on(node.node_ip, node.base) as temporal:
            TEMPORAL["address"] = temporal
            directory = overlay(
                node, tmp_path_factory.mktemp("overlay"), image=image, temporal=temporal
            )
            # --validate=false: kubectl 1.20 knows no `x-kubernetes-validations` (CEL rules,
            # Kubernetes 1.25); its API server keeps the CRDs without them, and the webhook
            # checks the same rules.
            node.kubectl("apply", "--validate=false", "-k", str(directory), timeout=120)
            node.kubectl("create", "namespace", TENANT)
            tenant = REPO / "deploy" / "kubernetes" / "tenant.yaml"
            node.kubectl("-n", TENANT, "apply", "-f", str(tenant))
            for kind, name in (
                ("deployment", "warmstart-controller"),
                ("deployment", "warmstart-webhook"),
                ("daemonset", "warmstart-node"),
            ):
                rollout(node, kind, name)
            print(f"\nimage import {imported:.1f} s, install {time.monotonic() - started:.1f} s")
            yield node
            dump_logs(node)


def image_reference(tarball: Path) -> str:
    """The image's name:tag as its docker-archive records it."""
    listing = subprocess.run(
        ["tar", "-xOf", str(tarball), "manifest.json"], capture_output=True, check=True
    )
    [entry] = json.loads(listing.stdout)
    reference: str = entry["RepoTags"][0]
    return reference.removeprefix("localhost/")


def rollout(node: RealNode, kind: str, name: str) -> None:
    try:
        node.kubectl(
            "-n",
            "warmstart-system",
            "rollout",
            "status",
            f"{kind}/{name}",
            "--timeout=240s",
            timeout=260,
        )
    except Exception:
        dump_logs(node)
        raise


def dump_logs(node: RealNode) -> None:
    """What each warmstart pod said (shown when a test fails)."""
    with contextlib.suppress(Exception):
        print(node.kubectl("-n", "warmstart-system", "get", "pods", "-o", "wide"))
    for component in ("controller", "webhook", "node"):
        with contextlib.suppress(Exception):
            print(
                node.kubectl(
                    "-n",
                    "warmstart-system",
                    "logs",
                    "--tail=60",
                    "--all-containers",
                    "-l",
                    f"app.kubernetes.io/component={component}",
                )
            )


def checkpoint(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "warmstart.dev/v1alpha1",
        "kind": "Checkpoint",
        "metadata": {"name": name, "namespace": TENANT},
        "spec": {
            "identity": {"model": f"test/{name}", "backendFramework": "vllm"},
            "job": {"podTemplateSpec": {"spec": workload_spec()}},
        },
    }


def apply(node: RealNode, body: dict[str, Any]) -> None:
    node.kubectl("apply", "-f", "-", input_text=json.dumps(body))


def checkpoint_status(node: RealNode, name: str) -> dict[str, Any]:
    out = node.kubectl("-n", TENANT, "get", "checkpoint", name, "-o", "json")
    status: dict[str, Any] = json.loads(out).get("status") or {}
    return status


def ended(node: RealNode, name: str) -> dict[str, Any] | None:
    status = checkpoint_status(node, name)
    return status if status.get("phase") in ("Ready", "Failed") else None


def answer(ip: str) -> str:
    with urllib.request.urlopen(f"http://{ip}:{PORT}/", timeout=5) as response:
        return str(response.read().decode())


def test_capture_then_restore_through_the_installed_manifests(installed: RealNode) -> None:
    node = installed
    started = time.monotonic()
    apply(node, checkpoint("llama"))
    status = wait_for(lambda: ended(node, "llama"), "the Checkpoint to be Ready", timeout=300)
    assert status["phase"] == "Ready", status
    captured = time.monotonic() - started
    jobs = json.loads(node.kubectl("-n", TENANT, "get", "jobs", "-o", "json"))["items"]
    [job_pod] = json.loads(
        node.kubectl(
            "-n", TENANT, "get", "pods", "-l", "warmstart.dev/checkpoint=llama", "-o", "json"
        )
    )["items"]
    logs = node.kubectl("-n", TENANT, "logs", job_pod["metadata"]["name"])
    token = logs.split("started ", 1)[1].split()[0]
    assert jobs, "the capture ran as a Job"

    served, first_answer = start_and_time(node, "llama-restored", restore_from="llama")
    assert served == token
    shaped = json.loads(node.kubectl("-n", TENANT, "get", "pod", "llama-restored", "-o", "json"))
    assert shaped["metadata"]["annotations"].get(RESTORE_STATUS) == "restored", shaped["metadata"][
        "annotations"
    ]
    log = node.kubectl("-n", TENANT, "logs", "llama-restored")
    assert f"restored {token}" in log and f"served {token}" in log, log
    FIGURES["restored"] = first_answer
    CAPTURED["token"] = token
    FIGURES["capture"] = captured
    print(f"\ncapture {captured:.1f} s; restore: pod created -> first answer {first_answer:.2f} s")
    breakdown = asyncio.run(restore_breakdown(shaped))
    assert 0 < breakdown["of it CRIU"] < breakdown["standby to restored"], breakdown
    # Prepared before the standby ran, and found without the runtime (no `locate`).
    assert breakdown["workflow started before the standby by"] > 0, breakdown
    parts = ", ".join(f"{k} {v:.0f}" for k, v in breakdown.items())
    print(f"restore on the real node (ms): {parts}")
    print(f"its stages (ms): {STAGES}")


def test_a_cold_start_of_the_same_pod(installed: RealNode) -> None:
    """The baseline: the same pod without `restore-from` (its warm-up paid)."""
    served, first_answer = start_and_time(installed, "llama-cold", restore_from=None)
    assert served and served != CAPTURED.get("token")
    FIGURES["cold"] = first_answer
    restored = FIGURES.get("restored")
    ratio = f", {first_answer / restored:.1f}x the restore" if restored else ""
    print(f"\ncold start: pod created -> first answer {first_answer:.2f} s{ratio}")


async def restore_breakdown(pod: dict[str, Any]) -> dict[str, float]:
    """Where one restore's time went on the node (ms), from its workflow's history and the
    standby's start (its process start time, 10 ms ticks): how long before the standby the
    restore started (when the pod was scheduled), from the standby's start until the
    restore step completed, CRIU's own time, what the cluster path added over raw CRIU, and
    the activity's stages between the standby's announcement and CRIU."""
    client = await Client.connect(TEMPORAL["address"], data_converter=pydantic_data_converter)
    meta = pod["metadata"]
    workflow_id = restore_workflow_id(namespace=TENANT, name=meta["name"], key=meta["uid"])
    handle = client.get_workflow_handle(workflow_id, result_type=RestoreResult)
    result = await handle.result()
    # Started when the pod was scheduled; the standby named by its announcement (no `locate`).
    assert list(result.stage_seconds) == [
        "verify",
        "await-standby",
        "gate",
        "prepare",
        "criu-restore",
    ], result.stage_seconds
    events = (await handle.fetch_history()).events
    started = events[0].event_time.ToDatetime(tzinfo=UTC).timestamp()
    [done] = [
        e.event_time.ToDatetime(tzinfo=UTC).timestamp()
        for e in events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
    ][:1]
    standby = process_start(parent_of(result.pid))
    criu = result.stage_seconds["criu-restore"]
    STAGES.update({k: round(v * 1000, 1) for k, v in result.stage_seconds.items()})
    return {
        "workflow started before the standby by": (standby - started) * 1000,
        "standby to restored": (done - standby) * 1000,
        "of it CRIU": criu * 1000,
        "added over raw CRIU": (done - standby - criu) * 1000,
        "standby's announcement to CRIU (gate, prepare)": (
            result.stage_seconds.get("gate", 0) + result.stage_seconds.get("prepare", 0)
        )
        * 1000,
    }


def parent_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("PPid:", 1)[1].split()[0])


def process_start(pid: int) -> float:
    """When process `pid` started, wall-clock seconds (to its 10 ms tick)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[19])  # field 22, starttime, since boot
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def test_the_node_worker_pod_deleted_mid_restore_ends_cleanly(installed: RealNode) -> None:
    """CRIU held (SIGSTOP) mid-restore, the node worker's pod deleted: the
    DaemonSet's new pod runs, no CRIU of the old one is left, and the restore target ends
    serving with its status saying how (restored or fallen back cold)."""
    node = installed
    assert CAPTURED.get("token"), "needs the capture of the first test"
    [worker] = json.loads(
        node.kubectl("-n", "warmstart-system", "get", "pods", "-l", NODE_WORKER, "-o", "json")
    )["items"]
    uid = worker["metadata"]["uid"]
    created = node.kubectl(
        "create",
        "-o",
        "json",
        "-f",
        "-",
        input_text=json.dumps(restore_target("llama-orphaned", restore_from="llama")),
    )
    # CRIU runs in the standby's cgroups (it restores the tree there).
    target = json.loads(created)["metadata"]["uid"]
    held = wait_for(lambda: criu_of(target), "CRIU to restore", timeout=120, every=0.005)
    for pid in held:
        os.kill(pid, signal.SIGSTOP)
    node.kubectl(
        "-n", "warmstart-system", "delete", "pod", worker["metadata"]["name"], "--wait=false"
    )

    def replaced() -> bool:
        pods = json.loads(
            node.kubectl("-n", "warmstart-system", "get", "pods", "-l", NODE_WORKER, "-o", "json")
        )["items"]
        return any(
            p["metadata"]["uid"] != uid
            and any(c.get("ready") for c in p["status"].get("containerStatuses") or [])
            for p in pods
        )

    wait_for(replaced, "the DaemonSet's new node worker pod", timeout=180)
    served = wait_for(lambda: serving(node, "llama-orphaned"), "the pod to answer", timeout=300)

    def published() -> str:
        got = json.loads(node.kubectl("-n", TENANT, "get", "pod", "llama-orphaned", "-o", "json"))
        return str(got["metadata"]["annotations"].get(RESTORE_STATUS, ""))

    # The status is published after the pod answers (the restore's last step).
    status = wait_for(published, "the pod's restore status", timeout=60)
    print(f"\nnode worker deleted mid-restore: {status}")
    if status == "restored":
        assert served == CAPTURED["token"]
    else:
        assert status.startswith("fell-back: NodeLost: "), status
        assert served != CAPTURED["token"]
    assert not [pid for pid in held if alive(pid)], "CRIU of the deleted pod lives on"


def criu_of(pod_uid: str) -> list[int]:
    """The CRIU processes in the cgroups of pod `pod_uid` (by the kubelet's cgroup names)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if Path(entry.path, "comm").read_text().strip() != "criu":
                continue
            if f"pod{pod_uid}" in Path(entry.path, "cgroup").read_text():
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Running or stopped, not gone nor a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_a_damaged_checkpoint_starts_the_pod_cold_saying_why(installed: RealNode) -> None:
    """A byte of the version's CRIU images changed where it is stored: the node refuses it
    before CRIU, the pod starts cold and its status says why."""
    node = installed
    assert CAPTURED.get("token"), "needs the capture of the first test"
    [image] = sorted((node.base / "checkpoints").glob("*/versions/*/criu/pages-*.img"))[:1]
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0xFF
    image.write_bytes(bytes(data))
    served, _ = start_and_time(node, "llama-damaged", restore_from="llama")
    assert served != CAPTURED["token"]  # a cold start: a token of its own
    got = json.loads(node.kubectl("-n", TENANT, "get", "pod", "llama-damaged", "-o", "json"))
    status = got["metadata"]["annotations"].get(RESTORE_STATUS, "")
    assert status.startswith("fell-back: DigestMismatch"), status


def restore_target(name: str, *, restore_from: str | None) -> dict[str, Any]:
    """Pod `name` of the workload, restored from `restore_from` or (None) started cold."""
    annotations = {"warmstart.dev/restore-from": restore_from} if restore_from else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": TENANT, "annotations": annotations},
        "spec": workload_spec(),
    }


def serving(node: RealNode, name: str) -> str | None:
    """What pod `name` answers from its pod IP once Ready; None until then. A read of the
    pod that hangs is given up after 5 s and asked again (one stuck kubectl would otherwise
    add up to its whole timeout to the figure measured)."""
    try:
        out = node.kubectl("-n", TENANT, "get", "pod", name, "-o", "json", timeout=5)
    except subprocess.TimeoutExpired:
        return None
    got = json.loads(out)
    ip = got["status"].get("podIP")
    ready = any(c.get("ready") for c in got["status"].get("containerStatuses") or [])
    if not (ip and ready):
        return None
    with contextlib.suppress(OSError):
        return answer(ip)
    return None


def start_and_time(node: RealNode, name: str, *, restore_from: str | None) -> tuple[str, float]:
    """Create pod `name` (restored from `restore_from`, or cold); what it first answers
    from its pod IP once Ready, and the seconds from its creation until then."""
    started = time.monotonic()
    apply(node, restore_target(name, restore_from=restore_from))
    served: str = wait_for(
        lambda: serving(node, name), f"pod {name} to answer", timeout=180, every=0.05
    )
    return served, time.monotonic() - started


def test_a_checkpoint_deleted_mid_capture_ends_cleanly(installed: RealNode) -> None:
    """Deleted while its capture waits for a workload that never gets ready: the capture
    is cancelled, its Job deleted, and the finalizer lets the Checkpoint go."""
    node = installed
    body = checkpoint("stuck")
    body["spec"]["job"]["podTemplateSpec"]["spec"]["containers"][0]["command"] = [
        "python3",
        "-c",
        "import time; time.sleep(3600)",
    ]
    apply(node, body)

    def capturing() -> bool:
        jobs = json.loads(node.kubectl("-n", TENANT, "get", "jobs", "-o", "json"))["items"]
        ours = [j for j in jobs if j["metadata"]["name"].startswith("stuck-")]
        return bool(ours) and checkpoint_status(node, "stuck").get("phase") == "Capturing"

    wait_for(capturing, "the capture of `stuck` to wait on its Job", timeout=120)
    node.kubectl("-n", TENANT, "delete", "checkpoint", "stuck", "--wait=false")

    def gone() -> bool:
        names = node.kubectl("-n", TENANT, "get", "checkpoints,jobs", "-o", "name")
        return "stuck" not in names

    wait_for(gone, "the Checkpoint and its Job to be gone", timeout=180)


def test_a_podsnapshot_of_a_running_deployment_pod_keeps_it_serving(installed: RealNode) -> None:
    """A PodSnapshot of a Deployment's pod: Ready, and the pod serves on, the same process
    (same token, no restart)."""
    node = installed
    labels = {"app": "server"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "server", "namespace": TENANT},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": workload_spec()},
        },
    }
    apply(node, deployment)

    def serving_pod() -> tuple[dict[str, Any], str] | None:
        pods = json.loads(
            node.kubectl("-n", TENANT, "get", "pods", "-l", "app=server", "-o", "json")
        )
        for pod in pods["items"]:
            ip = pod["status"].get("podIP")
            with contextlib.suppress(OSError):
                if ip:
                    return pod, answer(ip)
        return None

    pod, token = wait_for(serving_pod, "the Deployment's pod to serve", timeout=180)
    snapshot = {
        "apiVersion": "warmstart.dev/v1alpha1",
        "kind": "PodSnapshot",
        "metadata": {"name": "server-snap", "namespace": TENANT},
        "spec": {
            "source": {
                "podRef": {
                    "name": pod["metadata"]["name"],
                    "uid": pod["metadata"]["uid"],
                    "containers": ["main"],
                }
            }
        },
    }
    apply(node, snapshot)

    def snapshot_ended() -> dict[str, Any] | None:
        out = node.kubectl("-n", TENANT, "get", "podsnapshot", "server-snap", "-o", "json")
        status: dict[str, Any] = json.loads(out).get("status") or {}
        return status if status.get("phase") in ("Ready", "Failed") else None

    status = wait_for(snapshot_ended, "the PodSnapshot to be Ready", timeout=300)
    assert status["phase"] == "Ready", status
    after = json.loads(
        node.kubectl("-n", TENANT, "get", "pod", pod["metadata"]["name"], "-o", "json")
    )
    assert after["metadata"]["uid"] == pod["metadata"]["uid"]
    assert after["status"]["containerStatuses"][0]["restartCount"] == 0
    assert answer(after["status"]["podIP"]) == token


def test_a_verified_checkpoint_is_ready_once_its_verification_pod_restored_and_answered(
    installed: RealNode,
) -> None:
    """`spec.verify` under the real kubelet and scheduler: the controller's verification
    pod lands on the capturing node, the node restores the held-back version into it, its
    readiness probe passes on the restored process; then the pod is gone, the Checkpoint is
    Ready and a pod restored from it serves the captured process."""
    node = installed
    body = checkpoint("llama-verified")
    body["spec"]["verify"] = True
    main = body["spec"]["job"]["podTemplateSpec"]["spec"]["containers"][0]
    main["readinessProbe"] = {"httpGet": {"path": "/", "port": PORT}, "periodSeconds": 1}
    started = time.monotonic()
    apply(node, body)
    status = wait_for(
        lambda: ended(node, "llama-verified"), "the verified Checkpoint to end", timeout=420
    )
    assert status["phase"] == "Ready", status
    assert "verifying" not in status, status
    captured = time.monotonic() - started

    def verification_pods() -> list[Any]:
        out = node.kubectl(
            "-n", TENANT, "get", "pods", "-l", "warmstart.dev/verification=true", "-o", "json"
        )
        items: list[Any] = json.loads(out)["items"]
        return items

    # Deleted by the capture before Ready; its grace period (1 s) may still be running.
    wait_for(lambda: verification_pods() == [], "the verification pod to be gone", timeout=60)

    resource = json.loads(
        node.kubectl("-n", TENANT, "get", "checkpoint", "llama-verified", "-o", "json")
    )
    result = asyncio.run(verified_capture(resource["metadata"]["uid"]))
    verify = result["verify"]
    assert 0 < verify < captured, result
    # The node said so on the verification pod: an Event `Restored` regarding it.
    events = json.loads(node.kubectl("-n", TENANT, "get", "events", "-o", "json"))["items"]
    restored = [
        e
        for e in events
        if e.get("reason") == "Restored"
        and "llama-verified"
        in (e.get("regarding") or e.get("involvedObject") or {}).get("name", "")
    ]
    assert restored, "no Restored event regarding the verification pod"

    [job_pod] = json.loads(
        node.kubectl(
            "-n",
            TENANT,
            "get",
            "pods",
            "-l",
            "warmstart.dev/checkpoint=llama-verified,job-name",
            "-o",
            "json",
        )
    )["items"]
    token = node.kubectl("-n", TENANT, "logs", job_pod["metadata"]["name"]).split("started ")[1]
    served, _ = start_and_time(node, "llama-verified-restored", restore_from="llama-verified")
    assert served == token.split()[0]
    plain = FIGURES.get("capture")
    than = f" (plain capture {plain:.1f} s)" if plain else ""
    print(f"\nverified capture {captured:.1f} s{than}; its verify step {verify:.1f} s")


async def verified_capture(uid: str) -> dict[str, float]:
    """The verified capture's step seconds, from its workflow's result."""
    client = await Client.connect(TEMPORAL["address"], data_converter=pydantic_data_converter)
    workflow_id = capture_workflow_id(namespace=TENANT, name="llama-verified", key=uid)
    result = await client.get_workflow_handle(workflow_id, result_type=CaptureResult).result()
    return dict(result.step_seconds)
