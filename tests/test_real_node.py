"""The real-node tier: a real one-node cluster (`tests/realnode.py`) runs what the cluster
tests otherwise play: Jobs through the real controller manager and scheduler, pods of a
locally built image on a real kubelet, exec probes, logs and exec through the API server,
pod networking from the host and back. The first test starts (cold) and stops a cluster of
its own and checks the host is left as found; the others share one cluster per module."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.containers import oci_archive
from tests.host_state import host_state
from tests.realnode import RealNode, needs_real_node, running_node, wait_for

pytestmark = [needs_real_node, pytest.mark.timeout(300)]

IMAGE = "warmstart.test/workload:1"
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # bind before the address exists


@pytest.fixture(scope="module")
def node() -> Iterator[RealNode]:
    """One cluster for the module, with the workload image imported; after it stops the
    host must be as before it started."""
    before = host_state()
    for running in running_node():
        running.import_image(oci_archive(IMAGE))
        yield running
    left = before.differences(host_state())
    assert not left, "the real node left the host changed:\n  " + "\n  ".join(left)


def pod_spec(command: list[str], **container: Any) -> dict[str, Any]:
    """A pod of the workload image: its skeleton root (and /etc/warmstart-image) with the
    host's /usr mounted read-only for a shell and python3; never pulled."""
    return {
        "restartPolicy": "Never",
        "containers": [
            {
                "name": "main",
                "image": IMAGE,
                "imagePullPolicy": "Never",
                "command": command,
                "volumeMounts": [{"name": "usr", "mountPath": "/usr", "readOnly": True}],
                **container,
            }
        ],
        "volumes": [{"name": "usr", "hostPath": {"path": "/usr", "type": "Directory"}}],
        "terminationGracePeriodSeconds": 0,
    }


def job(name: str, command: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": {"spec": pod_spec(command)}},
    }


def job_complete(node: RealNode, name: str) -> bool:
    status = node.kube.batch.read_namespaced_job_status(name, "default").status
    assert not status.failed, f"job {name} failed: {node.kubectl('logs', f'job/{name}')}"
    conditions = status.conditions or []
    return any(c.type == "Complete" and c.status == "True" for c in conditions)


def pod_ready(node: RealNode, name: str) -> Any:
    pod = node.kube.core.read_namespaced_pod(name, "default")
    assert pod.status.phase not in ("Failed", "Succeeded"), pod.status
    conditions = pod.status.conditions or []
    return pod if any(c.type == "Ready" and c.status == "True" for c in conditions) else None


def test_a_cold_start_runs_a_pod_and_leaves_the_host_as_found() -> None:
    before = host_state()
    with contextlib.contextmanager(running_node)() as node:
        node.import_image(oci_archive(IMAGE))
        body = {"metadata": {"name": "once"}, "spec": pod_spec(["cat", "/etc/warmstart-image"])}
        node.kube.core.create_namespaced_pod("default", body)

        def succeeded() -> bool:
            phase = node.kube.core.read_namespaced_pod("once", "default").status.phase
            assert phase != "Failed", node.kubectl("describe", "pod", "once")
            return bool(phase == "Succeeded")

        wait_for(succeeded, "pod once to succeed")
        assert node.kubectl("logs", "once") == "from the image\n"
        during = before.differences(host_state())
        # The comparison sees the node: the shared mount of its directory, for one (the
        # kubelet makes none of its own root under a shared mount).
        assert any(d.startswith(f"mounts ('{node.base}',") for d in during), during
        assert any(d.startswith("sysctls ") for d in during), during
    left = before.differences(host_state())
    assert not left, "the real node left the host changed:\n  " + "\n  ".join(left)


def test_the_node_is_ready_on_its_address(node: RealNode) -> None:
    found = node.node()
    addresses = {a.type: a.address for a in found.status.addresses}
    assert addresses["InternalIP"] == node.node_ip
    assert found.status.node_info.container_runtime_version.startswith("containerd://")


def test_a_job_of_a_local_image_completes_and_its_logs_show(node: RealNode) -> None:
    token = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    script = f"cat /etc/warmstart-image; test -s {token} && echo token mounted; echo job done"
    node.kube.batch.create_namespaced_job("default", job("hello", ["sh", "-c", script]))
    wait_for(lambda: job_complete(node, "hello"), "job hello to complete")
    pods = node.kube.core.list_namespaced_pod("default", label_selector="job-name=hello").items
    assert [ref.kind for ref in pods[0].metadata.owner_references] == ["Job"]
    logs = node.kubectl("logs", "job/hello")
    assert logs == "from the image\ntoken mounted\njob done\n"


SERVER = """
import pathlib, socket
listener = socket.create_server(("0.0.0.0", 8080))
pathlib.Path("/tmp/started").touch()
while True:
    conn, _ = listener.accept()
    conn.sendall(b"hello from " + socket.gethostname().encode())
    conn.close()
"""


def test_exec_probes_pass_and_the_pod_answers_at_its_ip(node: RealNode) -> None:
    probes = {
        "startupProbe": {"exec": {"command": ["cat", "/tmp/started"]}, "periodSeconds": 1},
        "readinessProbe": {"exec": {"command": ["test", "-f", "/tmp/started"]}, "periodSeconds": 1},
    }
    spec = pod_spec(["python3", "-c", SERVER], **probes)
    node.kube.core.create_namespaced_pod("default", {"metadata": {"name": "server"}, "spec": spec})
    pod = wait_for(lambda: pod_ready(node, "server"), "pod server to be Ready")
    assert pod.status.container_statuses[0].started
    with socket.create_connection((pod.status.pod_ip, 8080), timeout=10) as conn:
        assert conn.recv(100) == b"hello from server"
    assert node.kubectl("exec", "server", "--", "cat", "/etc/warmstart-image") == "from the image\n"


def test_a_pod_reaches_a_server_of_the_host_at_the_bridge_address(node: RealNode) -> None:
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        listener.bind((node.bridge_ip, 0))
        listener.listen()
        listener.settimeout(90)
        port = listener.getsockname()[1]
        send = (
            "import socket, sys\n"
            "conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)\n"
            "conn.sendall(b'from the pod')\n"
        )
        command = ["python3", "-c", send, node.bridge_ip, str(port)]
        node.kube.batch.create_namespaced_job("default", job("caller", command))
        conn, (peer, _) = listener.accept()
        with conn:
            assert conn.recv(100) == b"from the pod"
    prefix = node.pod_subnet.rsplit(".", 1)[0] + "."
    assert peer.startswith(prefix), f"{peer} is not a pod address of {node.pod_subnet}"
    wait_for(lambda: job_complete(node, "caller"), "job caller to complete")
