"""A real kube-apiserver (1.20, built from Debian's source by `make test`) on Debian's
etcd, for the integration tier (importable as `tests.apiserver`). No controllers and no
kubelet: the tests play them. Plain HTTPS with a self-signed certificate and a static
bearer token. `ApiServer.stop()` kills the API server process by its PID and `start()`
starts it again on the same etcd (its data kept) and port."""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.kube import Cluster
from workers.ports import free_port
from workers.settings import KubeSettings, NodeSettings, Settings, TemporalSettings

MARKER = Path("/var/cache/warmstart/kube-apiserver.unavailable")


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return f"the API-server tier is built and run as root (running as uid {os.geteuid()})"
    if MARKER.is_file():
        return f"kube-apiserver unavailable: {MARKER.read_text().strip()}"
    for tool in ("kube-apiserver", "etcd"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: `make test` builds it as root"
    return None


APISERVER_SKIP = _skip_reason()
needs_apiserver = pytest.mark.skipif(APISERVER_SKIP is not None, reason=APISERVER_SKIP or "")


class ApiServerProcess:
    """The kube-apiserver process, started again with the same arguments when stopped."""

    def __init__(self, args: list[str], log: Path, url: str, token: str) -> None:
        self._args, self._log, self._url, self._token = args, log, url, token
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and return once it answers /readyz."""
        assert self.proc is None or self.proc.poll() is not None, "running already"
        with self._log.open("a") as log:
            self.proc = subprocess.Popen(self._args, stdout=log, stderr=subprocess.STDOUT)
        _wait_ready(self._url, self._token, self.proc, self._log)

    def stop(self, *, kill: bool = True) -> None:
        """Stop it by its PID: SIGKILL (a crash) or SIGTERM, and reap it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@dataclass(frozen=True)
class ApiServer:
    url: str
    token: str
    token_file: Path
    process: ApiServerProcess | None = field(default=None, compare=False, repr=False)
    # The key that signs service-account tokens, and the API server's self-signed serving
    # certificate (its own CA): what a kube-controller-manager of the same cluster needs.
    service_account_key: Path | None = None
    certificate: Path | None = None
    etcd_pid: int | None = None  # its etcd's process (the scale bench reads its CPU)

    def stop(self) -> None:
        """Kill the API server process (etcd and its data stay)."""
        assert self.process is not None
        self.process.stop()

    def start(self) -> None:
        """Start the API server again on the same etcd and port; returns once ready."""
        assert self.process is not None
        self.process.start()

    def controller_settings(
        self, *, home: Path, temporal: str, queue: str, identity: str, lease_seconds: int
    ) -> Settings:
        """A controller replica's settings against this API server and the Temporal server
        at `temporal`, reading pods every second."""
        return Settings(
            home=home,
            temporal=TemporalSettings(address=temporal),
            node=NodeSettings(control_task_queue=queue),
            kube=KubeSettings(
                server=self.url,
                token_file=str(self.token_file),
                insecure_skip_tls_verify=True,
                read_every_seconds=1,
                lease_seconds=lease_seconds,
                identity=identity,
            ),
        )


def running_apiserver(
    service_accounts: Mapping[str, str] | None = None,
    *,
    extra_args: tuple[str, ...] = (),
    host: str = "127.0.0.1",
) -> Iterator[ApiServer]:
    """`service_accounts`: bearer tokens of service accounts (token: "namespace:name"); with
    them the API server authorises by RBAC (the admin token is in system:masters still).
    `extra_args`: more flags of kube-apiserver (an admission configuration, say). `host`: the
    address it serves on and advertises (in its certificate too), where pods reach it."""
    base = Path(tempfile.mkdtemp(prefix="ws-kapi-"))
    token = uuid.uuid4().hex
    users = [f"{token},admin,admin,system:masters"]
    for account_token, account in (service_accounts or {}).items():
        namespace, name = account.split(":")
        groups = f"system:serviceaccounts,system:serviceaccounts:{namespace},system:authenticated"
        user = f"system:serviceaccount:{namespace}:{name}"
        users.append(f'{account_token},{user},{uuid.uuid4()},"{groups}"')
    (base / "tokens.csv").write_text("\n".join(users) + "\n")
    (base / "token").write_text(token)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (base / "sa.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    client_port, peer_port, port = free_port(), free_port(), free_port()
    etcd_url = f"http://127.0.0.1:{client_port}"
    etcd_log = (base / "etcd.log").open("w")
    etcd = subprocess.Popen(
        [
            "etcd",
            "--data-dir",
            str(base / "etcd"),
            "--listen-client-urls",
            etcd_url,
            "--advertise-client-urls",
            etcd_url,
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer_port}",
        ],
        stdout=etcd_log,
        stderr=subprocess.STDOUT,
    )
    args = [
        "kube-apiserver",
        f"--etcd-servers={etcd_url}",
        f"--secure-port={port}",
        f"--bind-address={host}",
        *([] if host == "127.0.0.1" else [f"--advertise-address={host}"]),
        f"--cert-dir={base / 'certs'}",
        "--service-account-issuer=https://kubernetes.default.svc",
        f"--service-account-key-file={base / 'sa.key'}",
        f"--service-account-signing-key-file={base / 'sa.key'}",
        f"--token-auth-file={base / 'tokens.csv'}",
        f"--authorization-mode={'RBAC' if service_accounts else 'AlwaysAllow'}",
        "--endpoint-reconciler-type=none",
        "--service-cluster-ip-range=10.0.0.0/24",
        *extra_args,
    ]
    url = f"https://{host}:{port}"
    apiserver = ApiServerProcess(args, base / "apiserver.log", url, token)
    try:
        apiserver.start()
        yield ApiServer(
            url=url,
            token=token,
            token_file=base / "token",
            process=apiserver,
            service_account_key=base / "sa.key",
            certificate=base / "certs" / "apiserver.crt",
            etcd_pid=etcd.pid,
        )
    finally:
        apiserver.stop(kill=False)
        etcd.terminate()
        try:
            etcd.wait(timeout=20)
        except subprocess.TimeoutExpired:
            etcd.kill()
            etcd.wait()
        etcd_log.close()
        shutil.rmtree(base, ignore_errors=True)


def _wait_ready(url: str, token: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    request = urllib.request.Request(f"{url}/readyz", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(request, timeout=2, context=context) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, "kube-apiserver did not become ready"
        time.sleep(0.3)


async def installed(server: ApiServer, namespaces: tuple[str, ...]) -> Cluster:
    """A client of `server` with the CRDs of deploy/crds/ installed (Established) and the
    namespaces created."""
    import asyncio

    import yaml
    from kubernetes import client

    kube = Cluster(None, server.url, server.token)
    extensions = client.ApiextensionsV1Api(kube.api)
    folder = Path(__file__).resolve().parents[1] / "deploy" / "crds"
    crds = sorted(p for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")
    for path in crds:
        await kube.run(
            extensions.create_custom_resource_definition, yaml.safe_load(path.read_text())
        )
    for path in crds:
        name = yaml.safe_load(path.read_text())["metadata"]["name"]
        for _ in range(300):
            crd = await kube.run(extensions.read_custom_resource_definition, name)
            conditions = crd.status.conditions or [] if crd.status else []
            if any(c.type == "Established" and c.status == "True" for c in conditions):
                break
            await asyncio.sleep(0.1)
    for namespace in namespaces:
        await kube.run(kube.core.create_namespace, {"metadata": {"name": namespace}})
        # What the controller manager would create; no token to mount (no token controller).
        account = {"metadata": {"name": "default"}, "automountServiceAccountToken": False}
        await kube.run(kube.core.create_namespaced_service_account, namespace, account)
    return kube
