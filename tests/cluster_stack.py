"""The cluster stack the end-to-end tests run (importable as `tests.cluster_stack`): the
watcher (kopf), the control worker and a node worker as the composition roots build them,
against kmock or a real kube-apiserver, with a real containerd; the test plays the Job
controller, the scheduler and the kubelet through `Stack`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from activities.storage.store import CheckpointStore
from api.restore_pods import RestoreSettings, restore_pod
from tests.apiserver import APISERVER_SKIP, installed, running_apiserver
from tests.containers import Kubelet, running_containerd
from tests.kube import Cluster, checkpoint_body, start_cluster
from workers.compose import cluster_control_worker, node_worker
from workers.restore_targets import watching_restore_targets
from workers.settings import CriuSettings, KubeSettings, NodeSettings, Settings
from workers.watcher import KopfThread, WatcherSettings, build_registry

# A second tenant's namespace, beside the first's ("inference").
OTHER_NAMESPACE = "team-b"
WORKLOAD = (
    "import os, time\n"
    "control = os.environ['SNAPSHOT_CONTROL_DIR']\n"
    "weights = bytearray(os.urandom(4 << 20))\n"
    "time.sleep(0.5)\n"
    "open(control + '/ready-for-snapshot', 'w').close()\n"
    "while not os.path.exists(control + '/snapshot-complete'):\n"
    "    time.sleep(0.05)\n"
)


@pytest.fixture
def kubelet() -> Iterator[Kubelet]:
    yield from running_containerd()


@pytest_asyncio.fixture(params=["kmock", "kube-apiserver"])
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    """The emulated API server, and a real one where it was built (the integration tier)."""
    if request.param == "kmock":
        async for running in start_cluster():
            yield running
        return
    if APISERVER_SKIP is not None:
        pytest.skip(APISERVER_SKIP)
    for server in running_apiserver():
        kube = await installed(server, ("warmstart-system", "inference", OTHER_NAMESPACE))
        yield kube
        kube.close()


def kubelet_env(pod: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, str]:
    """The container's environment as a kubelet resolves it when it starts the container:
    literal values, and the downward API fields the tests use (`metadata.name`, `.uid`,
    `.namespace`, `metadata.annotations['KEY']`, `metadata.labels['KEY']`) read from `pod`
    as it is now; a missing annotation or label gives ""."""
    meta = pod.get("metadata") or {}
    env: dict[str, str] = {}
    for entry in container.get("env") or []:
        source = (entry.get("valueFrom") or {}).get("fieldRef")
        if source is None:
            env[entry["name"]] = entry.get("value") or ""
            continue
        path = source["fieldPath"]
        keyed = re.fullmatch(r"metadata\.(annotations|labels)\['([^']+)'\]", path)
        if keyed:
            env[entry["name"]] = (meta.get(keyed[1]) or {}).get(keyed[2], "")
        else:
            field = path.removeprefix("metadata.")
            assert field in ("name", "uid", "namespace"), f"not played here: {path}"
            env[entry["name"]] = meta.get(field) or ""
    return env


async def eventually(probe: Any, what: str, timeout: float = 60) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = await probe()
        if found:
            return found
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


@dataclass
class Stack:
    """The watcher, the control worker and a node worker of node `node` (and of node
    `other_node`, where asked for), running; the test plays the Job controller, the
    scheduler and the kubelet through its methods."""

    cluster: Cluster
    kubelet: Kubelet
    node: str
    store: CheckpointStore
    new_watcher: Callable[[], KopfThread]
    watcher: KopfThread | None = None
    other_node: str = ""

    async def start_watcher(self) -> None:
        self.watcher = self.new_watcher()  # a fresh registry: no memory of the last one
        await asyncio.to_thread(self.watcher.start)

    async def stop_watcher(self) -> None:
        if self.watcher is not None:
            await asyncio.to_thread(self.watcher.stop)
            self.watcher = None

    async def checkpoint(self, name: str, command: list[str], **spec: Any) -> dict[str, Any]:
        """A Checkpoint of `command`, with `spec` beside the Job (`storage=...`)."""
        template = {
            "metadata": {"labels": {"app": name}},
            "spec": {
                "containers": [{"name": "main", "image": "local/workload", "command": command}]
            },
        }
        return await self.cluster.create("checkpoints", checkpoint_body(name, template, **spec))

    async def run_job_pod(
        self,
        name: str,
        *,
        node: str = "",
        image: str | None = None,
        binds: dict[str, Path] | None = None,
        log: Path | None = None,
        skip: Collection[str] = (),
    ) -> tuple[Any, Any, str, Path]:
        """The Job controller and the scheduler (the Job's pod, bound to our node), and the
        kubelet (its container in containerd, with the environment the pod declares):
        returns Job, pod, container ID, control dir. Jobs named in `skip` (earlier runs')
        are left alone."""
        cluster = self.cluster

        async def job() -> Any:
            jobs = await cluster.run(cluster.batch.list_namespaced_job, "inference")
            return next(
                (
                    j
                    for j in jobs.items
                    if j.metadata.labels.get("warmstart.dev/checkpoint") == name
                    and j.metadata.name not in skip
                ),
                None,
            )

        created = await eventually(job, "the capture Job")
        shaped = cluster.api.sanitize_for_serialization(created.spec.template)
        pod_body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                **shaped["metadata"],
                "name": f"{created.metadata.name}-x1",
                "namespace": "inference",
                "labels": {**shaped["metadata"]["labels"], "job-name": created.metadata.name},
            },
            "spec": {**shaped["spec"], "nodeName": node or self.node},
        }
        await cluster.run(cluster.core.create_namespaced_pod, "inference", pod_body)
        pod = await cluster.run(
            cluster.core.read_namespaced_pod, pod_body["metadata"]["name"], "inference"
        )
        main = shaped["spec"]["containers"][0]
        env = kubelet_env(cluster.api.sanitize_for_serialization(pod), main)
        cid, control_dir = self.kubelet.run(
            pod.metadata.uid, "main", main["command"], image=image, env=env, binds=binds, log=log
        )
        return created, pod, cid, control_dir

    async def report(
        self, pod: Any, state: dict[str, Any], *, ready: bool, container_id: str = ""
    ) -> None:
        """The kubelet reports the target container's state on the pod (of any namespace)."""
        status = {
            "name": "main",
            "ready": ready,
            "state": state,
            "image": "local/workload",
            "imageID": "",
            "restartCount": 0,
            **({"containerID": f"containerd://{container_id}"} if container_id else {}),
        }
        await self.cluster.run(
            self.cluster.core.patch_namespaced_pod_status,
            pod.metadata.name,
            pod.metadata.namespace or "inference",
            {"status": {"containerStatuses": [status]}},
        )

    async def outcome(self, name: str) -> dict[str, Any]:
        async def status() -> Any:
            obj = await self.cluster.get("checkpoints", "inference", name)
            st = obj.get("status") or {}
            return st if st.get("phase") in ("Ready", "Failed") else None

        found: dict[str, Any] = await eventually(status, f"{name} to be Ready or Failed", 90)
        return found


@contextlib.asynccontextmanager
async def running_stack(
    client: Client,
    cluster: Cluster,
    kubelet: Kubelet,
    tmp_path: Path,
    *,
    nodes: int = 1,
    lazy_pages: bool = False,
) -> AsyncIterator[Stack]:
    """With `nodes=2`, a second node's worker too: its own state directory, the checkpoint
    store shared (as the checkpoints PVC is), the same container runtime. `lazy_pages`: the
    nodes restore lazily (`WARMSTART_CRIU__LAZY_PAGES`)."""
    suffix = uuid.uuid4().hex[:8]
    queue, node = f"control-{suffix}", f"gpu-{suffix}"
    # The workers as `warmstart controller` and a cluster node's `warmstart worker` build them.
    token_file = tmp_path / "token"
    token_file.write_text(cluster.token or "")
    settings = Settings(
        home=tmp_path / "home",
        node=NodeSettings(
            name=node,
            control_task_queue=queue,
            cluster=True,
            runtime_endpoint=kubelet.address,
            runtime_state=str(kubelet.base / "state"),
            kubelet_root=str(kubelet.kubelet_root),
        ),
        criu=CriuSettings(lazy_pages=lazy_pages),
        kube=KubeSettings(
            server=cluster.url,
            token_file=str(token_file) if cluster.token else "",
            insecure_skip_tls_verify=cluster.token is not None,
        ),
    )
    store = CheckpointStore(settings.checkpoint_root)
    target = client.service_client.config.target_host

    async def connect() -> Client:
        return await Client.connect(target, data_converter=pydantic_data_converter)

    def new_watcher() -> KopfThread:
        watching = WatcherSettings(
            control_task_queue=queue,
            kube=settings.kube,  # the one login, as the workers have it
            read_every_seconds=2,
            node_timeout_seconds=3,
        )
        return KopfThread(build_registry(watching, connect))

    base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    async with contextlib.AsyncExitStack() as running:
        await running.enter_async_context(cluster_control_worker(client, settings, cluster.api))
        await running.enter_async_context(node_worker(client, settings, base_env=base_env))
        await running.enter_async_context(watching_restore_targets(client, settings))
        other = ""
        if nodes > 1:
            other = f"{node}-b"
            home = tmp_path / "home-b"
            home.mkdir()
            settings.checkpoint_root.mkdir(parents=True, exist_ok=True)
            (home / "checkpoints").symlink_to(settings.checkpoint_root)
            second = dataclasses.replace(
                settings, home=home, node=dataclasses.replace(settings.node, name=other)
            )
            await running.enter_async_context(node_worker(client, second, base_env=base_env))
            await running.enter_async_context(watching_restore_targets(client, second))
        stack = Stack(
            cluster=cluster,
            kubelet=kubelet,
            node=node,
            store=store,
            new_watcher=new_watcher,
            other_node=other,
        )
        await stack.start_watcher()
        try:
            yield stack
        finally:
            await stack.stop_watcher()


PORT = 8000
# Serves a token chosen at start; captured once warm; after `snapshot-complete` the capture
# pod's process exits, after `restore-complete` the restored one goes on serving.
_SERVES = f"""\
import http.server, os, secrets, sys, threading, time
control = os.environ['SNAPSHOT_CONTROL_DIR']
token = secrets.token_hex(8)
state = bytearray(os.urandom(1 << 20)) * STATE_MIB  # memory it holds (benchmarks)
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


def serving(state_mib: int = 0) -> str:
    """The serving program holding `state_mib` MiB of random-looking memory besides its
    token (benchmarks at size)."""
    return f"STATE_MIB = {state_mib}\n{_SERVES}"


SERVING = serving()


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


async def captured(
    stack: Stack, image: str, *, program: str | None = None, **spec: Any
) -> tuple[dict[str, Any], str]:
    """A Ready Checkpoint `llama` of `program` (default: SERVING holding nothing), with
    `spec`, and the token its process served."""
    await stack.checkpoint("llama", ["python3", "-c", program or SERVING], **spec)
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

    def __init__(
        self,
        stack: Stack,
        name: str,
        image: str,
        log: Path,
        *,
        main: dict[str, Any] | None = None,
        binds: dict[str, Path] | None = None,
        node: str = "",
        namespace: str = "inference",
        source: str = "llama",
    ) -> None:
        """`main`: the pod's main container as its owner asks for it (default: SERVING);
        `node`: where the scheduler binds it (default: the stack's node); `source`: the
        Checkpoint it asks to be restored from."""
        self.stack, self.name, self.image, self.log = stack, name, image, log
        self.node = node or stack.node
        self.namespace, self.source = namespace, source
        self.uid, self.cid, self.control = "", "", Path()
        self.pod: Any = None
        self.main = main or {
            "name": "main",
            "image": "local/workload",
            "command": ["python3", "-c", SERVING],
        }
        self.binds = binds

    async def start(
        self, resource: dict[str, Any], *, tamper: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        await self.admit(resource, tamper=tamper)
        await self.report_running()

    async def admit(
        self, resource: dict[str, Any], *, tamper: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        """The webhook, the scheduler and the kubelet: the standby container runs. `tamper`
        changes the shaped pod before it is created (a pod made to look like a target)."""
        asked = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "annotations": {"warmstart.dev/restore-from": self.source},
            },
            "spec": {"containers": [self.main]},
        }
        shaped = restore_pod(asked, checkpoint=resource, settings=RestoreSettings())
        shaped["metadata"]["namespace"] = self.namespace
        if tamper is not None:
            tamper(shaped)
        shaped["spec"]["nodeName"] = self.node  # the scheduler
        cluster = self.stack.cluster
        await cluster.run(cluster.core.create_namespaced_pod, self.namespace, shaped)
        pod = await cluster.run(cluster.core.read_namespaced_pod, self.name, self.namespace)
        self.uid = pod.metadata.uid
        self.pod = pod
        self.cid, self.control = await self.run_container()

    async def run_container(self, control: Path | None = None) -> tuple[str, Path]:
        """The kubelet starts (or, with the `control` directory of the last one, restarts)
        the main container, its environment resolved from the pod as it is now."""
        cluster = self.stack.cluster
        pod = await cluster.run(cluster.core.read_namespaced_pod, self.name, self.namespace)
        spec = cluster.api.sanitize_for_serialization(pod)
        main = spec["spec"]["containers"][0]
        return self.stack.kubelet.run(
            self.uid,
            "main",
            main["command"],
            image=self.image,
            log=self.log,
            binds=self.binds,
            env=kubelet_env(spec, main),
            control=control,
        )

    async def report_running(self) -> None:
        """The kubelet reports the standby container running: the node restores now."""
        await self.stack.report(self.pod, {"running": {}}, ready=False, container_id=self.cid)

    @property
    def pid(self) -> int:
        return self.stack.kubelet.pid(self.cid)

    async def restore_status(self) -> str:
        async def published() -> str | None:
            cluster = self.stack.cluster
            pod = await cluster.run(cluster.core.read_namespaced_pod, self.name, self.namespace)
            return (pod.metadata.annotations or {}).get("warmstart.dev/restore-status")

        found: str = await eventually(published, f"restore status of {self.name}", 90)
        return found

    async def events(self) -> list[tuple[str, str]]:
        """The Events regarding this pod, once there is one: the node posts its Event just
        after the restore-status annotation a test waits for."""
        cluster = self.stack.cluster

        async def listed() -> list[tuple[str, str]]:
            found = await cluster.run(cluster.events.list_namespaced_event, self.namespace)
            return [(e.type, e.reason) for e in found.items if e.regarding.name == self.name]

        said: list[tuple[str, str]] = await eventually(listed, f"an Event of {self.name}", 30)
        return said

    async def event_notes(self) -> list[str]:
        cluster = self.stack.cluster
        listed = await cluster.run(cluster.events.list_namespaced_event, self.namespace)
        return [e.note for e in listed.items if e.regarding.name == self.name]

    async def served(self, token: str) -> None:
        await eventually(
            lambda: asyncio.to_thread(lambda: answer_in(self.pid) == token),
            f"{self.name} serving {token}",
        )


def break_core_image(version_dir: Path) -> Any:
    """Truncate the dumped tree's core image and re-digest it in the manifest (bytes that
    verify, that CRIU cannot restore); returns what puts it back."""
    manifest_path = version_dir / "manifest.json"
    original_manifest = manifest_path.read_bytes()
    core = sorted((version_dir / "criu").glob("core-*.img"))[0]
    original = core.read_bytes()
    core.write_bytes(original[:8])
    manifest = json.loads(original_manifest)
    for entry in manifest["files"]:
        if entry["path"] == f"criu/{core.name}":
            entry["size"], entry["sha256"] = 8, hashlib.sha256(original[:8]).hexdigest()
    manifest_path.write_text(json.dumps(manifest))

    def repair() -> None:
        core.write_bytes(original)
        manifest_path.write_bytes(original_manifest)

    return repair


async def recorded_manifest(cluster: Cluster, version_dir: Path) -> None:
    """The Checkpoint `llama` records the manifest now in `version_dir` as its capture's."""
    digest = hashlib.sha256((version_dir / "manifest.json").read_bytes()).hexdigest()
    await cluster.run(
        cluster.custom.patch_namespaced_custom_object_status,
        "warmstart.dev",
        "v1alpha1",
        "inference",
        "checkpoints",
        "llama",
        {"status": {"manifestSHA256": digest}},
    )
