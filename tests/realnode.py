"""A real one-node Kubernetes cluster for the real-node tier (importable as
`tests.realnode`): etcd, kube-apiserver, kube-controller-manager, kube-scheduler and a
kubelet (1.20, built from Debian's source by `make kube-node`) on a containerd of its own
with its CRI plugin, runc and Debian's CNI bridge and host-local plugins. No registry: the
pod sandbox and workloads are images built here and imported (`RealNode.import_image`).

Everything the cluster writes lives under one directory of its own, except what kubelet
1.20 and libcni write whatever they are told (docs/decisions/0030-a-real-node-test-tier.md);
`running_node` notes the host before the start and puts back what changed after the stop
(`tests/node_cleanup.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import node_cleanup as cleanup
from tests.apiserver import APISERVER_SKIP, running_apiserver
from tests.containers import oci_archive
from tests.host_state import (
    CLUSTER_DIRS,
    OUTSIDE_PATHS,
    cgroup_hierarchies,
    read_sysctls,
    restore_sysctls,
)
from tests.kube import Cluster
from workers.ports import free_port

KUBE_BIN = Path("/usr/local/lib/warmstart/kube/bin")
CNI_BIN = Path("/usr/lib/cni")
MARKER = Path("/var/cache/warmstart/kube-node.unavailable")
NODE_BINARIES = ("kubelet", "kube-scheduler", "kube-controller-manager", "kubectl", "pause")
PAUSE_IMAGE = "warmstart.test/pause:1"
START_DEADLINE_S = 120.0
# Each start's seconds until the node was Ready, in order: the first is the cold one.
START_TIMES: list[float] = []


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return f"the real-node tier runs a kubelet as root (running as uid {os.geteuid()})"
    if MARKER.is_file():
        return f"the real-node binaries are unavailable: {MARKER.read_text().strip()}"
    if APISERVER_SKIP is not None:
        return APISERVER_SKIP
    for binary in NODE_BINARIES:
        if not (KUBE_BIN / binary).is_file():
            return f"{KUBE_BIN / binary} is missing: `make kube-node` builds it as root"
    for plugin in ("bridge", "host-local", "loopback"):
        if not (CNI_BIN / plugin).is_file():
            return f"the CNI plugin {CNI_BIN / plugin} is missing: `make kube-node` installs it"
    for tool in ("containerd", "ctr", "runc", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: `make test` installs containerd and runc as root"
    return None


REALNODE_SKIP = _skip_reason()
needs_real_node = pytest.mark.skipif(REALNODE_SKIP is not None, reason=REALNODE_SKIP or "")


class Daemon:
    """A process of the cluster, its output in a log of its own, stopped by its PID."""

    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name, self.log = name, log
        with log.open("a") as out:
            # close_fds (Popen's default): no daemon inherits a lock held by the test run.
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self) -> str:
        return f"{self.name} ({self.log}):\n" + self.log.read_text(errors="replace")[-3000:]

    def stop(self, grace_s: float = 15) -> None:
        if not self.alive():
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@dataclass
class RealNode:
    """The cluster as the tests use it. `bridge_ip`: the CNI bridge's address on the host,
    where a pod reaches a server of the host."""

    url: str
    token: str
    kubeconfig: Path
    kube: Cluster
    node_name: str
    node_ip: str
    bridge_ip: str
    pod_subnet: str
    containerd_address: str
    base: Path
    daemons: dict[str, Daemon] = field(default_factory=dict, repr=False)

    def kubectl(self, *args: str, timeout: float = 60, input_text: str | None = None) -> str:
        """kubectl (the one built with the cluster) against this cluster; its stdout."""
        command = [str(KUBE_BIN / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, input=input_text
        )
        if done.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def ctr(self, *args: str, check: bool = True) -> str:
        """ctr against the node's containerd, namespace k8s.io (the kubelet's)."""
        return _ctr(self.containerd_address, *args, check=check)

    def import_image(self, image: bytes | Path) -> None:
        """Import an image archive (OCI or docker-archive, named inside) into the node's
        containerd, where pods with `imagePullPolicy: Never` find it."""
        _import_image(self.base, self.containerd_address, image)

    def node(self) -> Any:
        return self.kube.core.read_node(self.node_name)


def _ctr(address: str, *args: str, check: bool = True) -> str:
    command = ["ctr", "--address", address, "--namespace", "k8s.io", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise RuntimeError(f"ctr {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _import_image(base: Path, address: str, image: bytes | Path) -> None:
    if isinstance(image, bytes):
        path = base / "images" / f"{uuid.uuid4().hex}.tar"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(image)
        image = path
    _ctr(address, "images", "import", str(image))


def wait_for(
    condition: Callable[[], Any], what: str, timeout: float = 60, every: float = 0.2
) -> Any:
    """`condition()`'s first truthy value, asked every `every` seconds; fails after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(every)


def running_node() -> Iterator[RealNode]:
    """Start the cluster, yield it once the node is Ready and service-account tokens are
    issued, then stop it and put the host back; use as a fixture with `yield from`."""
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        node = _start(stack)
        START_TIMES.append(time.monotonic() - started)
        yield node


def _start(stack: contextlib.ExitStack) -> RealNode:
    sysctls = read_sysctls()
    stack.callback(restore_sysctls, sysctls)
    outside = (*OUTSIDE_PATHS, "/var/lib/kubelet/device-plugins", "/var/lib/cni/results")
    absent = [Path(p) for p in outside if not Path(p).exists()]
    stack.callback(cleanup.remove_created, absent)
    suffix = uuid.uuid4().hex[:8]
    base = Path(f"{CLUSTER_DIRS}{suffix}")  # short: containerd's sockets must fit sun_path
    base.mkdir(mode=0o700)
    stack.callback(cleanup.remove_base, base)
    # A shared mount, as a node's root is under systemd: a pod's HostToContainer volumes of
    # the node's directories (the node worker's) need one.
    subprocess.run(["mount", "--bind", str(base), str(base)], check=True)
    stack.callback(cleanup.unmount_base, base)
    subprocess.run(["mount", "--make-rshared", str(base)], check=True)
    network = f"ws-{suffix}"
    stack.callback(cleanup.remove_cni_results, network)
    node_ip, pod_subnet = _free_subnets()
    bridge_ip = pod_subnet.replace(".0/24", ".1")
    node_bridge, pod_bridge = f"wsn{suffix}", f"wsc{suffix}"
    stack.callback(cleanup.delete_links, (node_bridge, pod_bridge))
    _ip("link", "add", "name", node_bridge, "type", "bridge")
    _ip("addr", "add", f"{node_ip}/32", "dev", node_bridge)
    _ip("link", "set", node_bridge, "up")
    cgroup_root = f"/warmstart-{suffix}"
    stack.callback(cleanup.remove_cgroups, cgroup_root)
    _create_cgroups(cgroup_root)
    stack.callback(cleanup.unmount_under, base)
    address = str(base / "containerd.sock")
    containerd = _start_containerd(base, address, network, pod_bridge, pod_subnet, bridge_ip)
    stack.callback(_stop_containerd, containerd, base, address)
    _wait_containerd(containerd, address)
    pause = (KUBE_BIN / "pause").read_bytes()
    image = oci_archive(PAUSE_IMAGE, executables={"/pause": pause}, entrypoint=["/pause"])
    _import_image(base, address, image)
    # Webhooks reached through their endpoints (no kube-proxy for cluster IPs); the
    # kubelet by the node address it reports (its host name resolves nowhere).
    apiserver_args = (
        "--enable-aggregator-routing=true",
        "--kubelet-preferred-address-types=InternalIP",
        "--allow-privileged=true",
    )
    server = stack.enter_context(
        contextlib.contextmanager(running_apiserver)(extra_args=apiserver_args, host=node_ip)
    )
    kube = Cluster(None, server.url, server.token)
    stack.callback(kube.close)
    node = RealNode(
        url=server.url,
        token=server.token,
        kubeconfig=base / "kubeconfig",
        kube=kube,
        node_name=f"ws-node-{suffix}",
        node_ip=node_ip,
        bridge_ip=bridge_ip,
        pod_subnet=pod_subnet,
        containerd_address=address,
        base=base,
        daemons={"containerd": containerd},
    )
    node.kubeconfig.write_text(json.dumps(_kubeconfig(server.url, server.token)))
    assert server.service_account_key is not None and server.certificate is not None
    _start_control_plane(node, server.service_account_key, server.certificate)
    stack.callback(node.daemons["kube-scheduler"].stop)
    stack.callback(node.daemons["kube-controller-manager"].stop)
    _start_kubelet(node, cgroup_root)
    stack.callback(node.daemons["kubelet"].stop)
    stack.callback(_drain, node)
    _wait_ready(node)
    return node


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], capture_output=True, text=True, check=True)


def _free_subnets() -> tuple[str, str]:
    """A node address and a pod /24 in 10.0.0.0/8 that no route or address here touches."""
    taken = subprocess.run(["ip", "-o", "route", "show", "table", "all"], capture_output=True)
    taken_text = (
        taken.stdout.decode()
        + subprocess.run(["ip", "-o", "addr"], capture_output=True).stdout.decode()
    )
    while True:
        a, b = random.sample(range(100, 250), 2)
        if f"10.{a}." not in taken_text and f"10.{b}." not in taken_text:
            return f"10.{a}.{random.randint(1, 254)}.2", f"10.{b}.{random.randint(0, 255)}.0/24"


def _create_cgroups(root: str) -> None:
    """The kubelet's cgroup root in every v1 hierarchy (it must exist before the kubelet
    starts), cpuset's CPUs and memory nodes copied from the parent."""
    for hierarchy in cgroup_hierarchies():
        if (hierarchy / "cgroup.controllers").exists():
            continue  # the v2 hierarchy beside v1 ones: runc's cgroupfs driver leaves it
        path = hierarchy / root.lstrip("/")
        path.mkdir()
        for name in ("cpuset.cpus", "cpuset.mems"):
            if (path / name).exists():
                (path / name).write_text((hierarchy / name).read_text())


def _start_containerd(
    base: Path, address: str, network: str, bridge: str, subnet: str, gateway: str
) -> Daemon:
    net_d = base / "net.d"
    net_d.mkdir()
    ipam = {
        "type": "host-local",
        "ranges": [[{"subnet": subnet, "gateway": gateway}]],
        # A default route through the bridge: pods reach the node's address (the API
        # server's) as on a node; nothing is forwarded further (no masquerading).
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": str(base / "ipam"),
    }
    bridge_plugin = {
        "type": "bridge",
        "bridge": bridge,
        "isGateway": True,
        "ipMasq": False,
        "hairpinMode": True,
        "ipam": ipam,
    }
    conflist = {"cniVersion": "0.4.0", "name": network, "plugins": [bridge_plugin]}
    (net_d / "10-warmstart.conflist").write_text(json.dumps(conflist))
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    config = base / "containerd.toml"
    # restrict_oom_score_adj: without CAP_SYS_RESOURCE (VMs may withhold it) every sandbox
    # fails otherwise; the netns mounts and `opt` under the base, not in /var/run and /opt.
    config.write_text(
        "version = 2\n"
        f'root = "{base}/root"\n'
        f'state = "{base}/state"\n'
        f'[grpc]\n  address = "{address}"\n'
        f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{base}/opt"\n'
        f"[{cri}]\n"
        f'  sandbox_image = "{PAUSE_IMAGE}"\n'
        "  restrict_oom_score_adj = true\n"
        "  netns_mounts_under_state_dir = true\n"
        f"[{cri}.containerd]\n"
        '  snapshotter = "overlayfs"\n'
        '  default_runtime_name = "runc"\n'
        f"[{cri}.containerd.runtimes.runc]\n"
        '  runtime_type = "io.containerd.runc.v2"\n'
        f"[{cri}.containerd.runtimes.runc.options]\n"
        "  SystemdCgroup = false\n"
        f"[{cri}.cni]\n"
        f'  bin_dir = "{CNI_BIN}"\n'
        f'  conf_dir = "{net_d}"\n'
    )
    return Daemon("containerd", ["containerd", "--config", str(config)], base / "containerd.log")


def _wait_containerd(daemon: Daemon, address: str) -> None:
    def answers() -> bool:
        assert daemon.alive(), daemon.tail()
        return _ctr(address, "version", check=False) != ""

    wait_for(answers, "containerd to answer", timeout=30)


def _kubeconfig(url: str, token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "ws", "cluster": {"server": url, "insecure-skip-tls-verify": True}}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "ws", "context": {"cluster": "ws", "user": "admin"}}],
        "current-context": "ws",
    }


def _start_control_plane(node: RealNode, signing_key: Path, ca: Path) -> None:
    """The controller manager (it signs service-account tokens with the API server's key)
    and the scheduler, serving nothing: each only talks to the API server."""
    common = [f"--kubeconfig={node.kubeconfig}", "--leader-elect=false", "--port=0"]
    node.daemons["kube-controller-manager"] = Daemon(
        "kube-controller-manager",
        [
            str(KUBE_BIN / "kube-controller-manager"),
            *common,
            "--secure-port=0",
            f"--service-account-private-key-file={signing_key}",
            f"--root-ca-file={ca}",
            "--node-monitor-period=2s",
        ],
        node.base / "kube-controller-manager.log",
    )
    node.daemons["kube-scheduler"] = Daemon(
        "kube-scheduler",
        [str(KUBE_BIN / "kube-scheduler"), *common, "--secure-port=0"],
        node.base / "kube-scheduler.log",
    )


def _start_kubelet(node: RealNode, cgroup_root: str) -> None:
    """The kubelet on the node address (never port 10250: a kubelet of the host may hold
    it), anonymous calls allowed (the API server's logs and exec), no iptables chains."""
    eviction = {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"}
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": node.node_ip,
        "port": free_port(),
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": free_port(),
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": cgroup_root,
        "failSwapOn": False,
        "makeIPTablesUtilChains": False,
        "nodeStatusUpdateFrequency": "2s",
        "nodeStatusReportFrequency": "10s",
        "evictionHard": eviction,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
    }
    path = node.base / "kubelet.json"
    path.write_text(json.dumps(config))
    socket = f"unix://{node.containerd_address}"
    node.daemons["kubelet"] = Daemon(
        "kubelet",
        [
            str(KUBE_BIN / "kubelet"),
            f"--config={path}",
            f"--kubeconfig={node.kubeconfig}",
            "--container-runtime=remote",
            f"--container-runtime-endpoint={socket}",
            f"--root-dir={node.base / 'kubelet'}",
            f"--cert-dir={node.base / 'kubelet-pki'}",
            f"--volume-plugin-dir={node.base / 'volume-plugins'}",  # a flag, not config, in 1.20
            # Localhost seccomp profiles: 1.20 reads them under this flag's directory, not
            # under --root-dir (where the node worker's DaemonSet installs its profile).
            f"--seccomp-profile-root={node.base / 'kubelet' / 'seccomp'}",
            f"--hostname-override={node.node_name}",
            f"--node-ip={node.node_ip}",
        ],
        node.base / "kubelet.log",
    )


def _wait_ready(node: RealNode) -> None:
    from kubernetes.client.exceptions import ApiException

    def ready() -> bool:
        for daemon in node.daemons.values():
            assert daemon.alive(), daemon.tail()
        try:
            found = node.node()
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        conditions = found.status.conditions or []
        return any(c.type == "Ready" and c.status == "True" for c in conditions)

    def token_issued() -> bool:
        try:
            account = node.kube.core.read_namespaced_service_account("default", "default")
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return bool(account.secrets)

    wait_for(ready, f"node {node.node_name} to be Ready", timeout=START_DEADLINE_S)
    wait_for(token_issued, "the default service account's token", timeout=30)


def _drain(node: RealNode) -> None:
    """Before the kubelet stops: no controller recreates pods, every pod is deleted, and the
    kubelet tears their sandboxes down (networks released, volumes unmounted)."""
    node.daemons["kube-controller-manager"].stop()
    node.daemons["kube-scheduler"].stop()
    from kubernetes.client.exceptions import ApiException

    uids = set()
    for pod in node.kube.core.list_pod_for_all_namespaces().items:
        meta = pod.metadata
        assert meta is not None and meta.name and meta.namespace and meta.uid
        uids.add(meta.uid)
        with contextlib.suppress(ApiException):  # gone already
            node.kube.core.delete_namespaced_pod(meta.name, meta.namespace, grace_period_seconds=0)
    if node.daemons["kubelet"].alive():
        # Not a failure here: what is left is killed through containerd after the kubelet.
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not _running_tasks(node), "the kubelet to stop every pod", 30)
    pods_dir = node.base / "kubelet" / "pods"
    uids |= {p.name for p in pods_dir.iterdir()} if pods_dir.is_dir() else set()
    cleanup.remove_pod_logs(uids)


def _running_tasks(node: RealNode) -> list[str]:
    """The containers running (a stopped sandbox's task stays listed until it is removed)."""
    rows = [line.split() for line in node.ctr("tasks", "list", check=False).splitlines()[1:]]
    return [row[0] for row in rows if len(row) >= 3 and row[2] == "RUNNING"]


def _stop_containerd(containerd: Daemon, base: Path, address: str) -> None:
    """Whatever still runs is killed through containerd, then containerd stops, then each
    shim of it still there (shims outlive containerd by design) is killed by the PID it
    recorded, once that PID is checked to still be a shim of this containerd."""
    if containerd.alive():
        for task in _ctr(address, "tasks", "list", "--quiet", check=False).split():
            _ctr(address, "tasks", "kill", "--signal", "SIGKILL", task, check=False)
            _ctr(address, "tasks", "delete", "--force", task, check=False)
    containerd.stop()
    cleanup.stop_shims(base / "state", address)
