"""A real TLS terminator in front of the Temporal dev server for the TLS tests: nginx
(Debian's nginx-light, `make nginx`) proxying gRPC and requiring a client certificate signed
by a test CA, and that CA, made with `cryptography`."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from workers.ports import free_port

NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
NGINX_SKIP = None if NGINX else "nginx is not installed: `make nginx` installs it (needs root)"
needs_nginx = pytest.mark.skipif(NGINX_SKIP is not None, reason=NGINX_SKIP or "")


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_client_cert: Path  # signed by another CA: refused
    other_client_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def _cert(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        alt = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        usage = ExtendedKeyUsageOID.SERVER_AUTH
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH
    if not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate for localhost and 127.0.0.1, a client certificate, and a
    client certificate from another CA."""
    directory.mkdir(parents=True, exist_ok=True)

    def pem(cert: x509.Certificate, name: str) -> Path:
        path = directory / name
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key, other_ca_key = _key(), _key()
    ca = _cert("warmstart test CA", ca_key, None, ca=True)
    other_ca = _cert("another CA", other_ca_key, None, ca=True)
    server_key, client_key, other_key = _key(), _key(), _key()
    return Pki(
        ca=pem(ca, "ca.pem"),
        server_cert=pem(_cert("localhost", server_key, (ca.subject, ca_key), server=True), "s.pem"),
        server_key=_write_key(server_key, directory / "s.key"),
        client_cert=pem(_cert("worker", client_key, (ca.subject, ca_key)), "c.pem"),
        client_key=_write_key(client_key, directory / "c.key"),
        other_client_cert=pem(
            _cert("worker", other_key, (other_ca.subject, other_ca_key)), "o.pem"
        ),
        other_client_key=_write_key(other_key, directory / "o.key"),
    )


@contextlib.contextmanager
def tls_terminator(backend: str, pki: Pki, directory: Path) -> Iterator[str]:
    """nginx accepting TLS (HTTP/2 by ALPN) on a free port of 127.0.0.1, requiring a client
    certificate signed by `pki.ca`, proxying gRPC to `backend` (host:port); yields its
    address. Runs in the foreground as a child and is stopped by its PID."""
    assert NGINX is not None
    port = free_port()
    config = directory / "nginx.conf"
    config.write_text(
        "daemon off;\n"
        "master_process off;\n"
        f"pid {directory / 'nginx.pid'};\n"
        f"error_log {directory / 'nginx-error.log'} info;\n"
        "events {}\n"
        "http {\n"
        "  log_format grpc '$request_uri $http_authorization';\n"
        f"  access_log {directory / 'nginx-access.log'} grpc;\n"
        f"  client_body_temp_path {directory / 'body'};\n"
        f"  proxy_temp_path {directory / 'proxy'};\n"
        f"  fastcgi_temp_path {directory / 'fastcgi'};\n"
        f"  uwsgi_temp_path {directory / 'uwsgi'};\n"
        f"  scgi_temp_path {directory / 'scgi'};\n"
        "  server {\n"
        f"    listen 127.0.0.1:{port} ssl http2;\n"
        f"    ssl_certificate {pki.server_cert};\n"
        f"    ssl_certificate_key {pki.server_key};\n"
        f"    ssl_client_certificate {pki.ca};\n"
        "    ssl_verify_client on;\n"
        "    location / {\n"
        f"      grpc_pass grpc://{backend};\n"
        "      grpc_read_timeout 300s;\n"
        "      grpc_send_timeout 300s;\n"
        "    }\n"
        "  }\n"
        "}\n"
    )
    proc = subprocess.Popen(
        [NGINX, "-p", str(directory), "-c", str(config), "-e", str(directory / "nginx-error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                errors = proc.stderr.read().decode() if proc.stderr else ""
                raise AssertionError(f"nginx exited: {errors}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            assert time.monotonic() < deadline, "nginx did not listen within 10 s"
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
