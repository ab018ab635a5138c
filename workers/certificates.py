"""Certificates of the admission webhook, made and judged here (`cryptography`): the
self-signed one of development, and the CA and serving certificate the controller keeps in
the webhook's TLS Secret (`workers.webhook_certificate`, decision 0032).

The Secret's keys are those of a `kubernetes.io/tls` Secret, as cert-manager writes them:
`tls.crt` (the serving certificate), `tls.key` (its key), `ca.crt` (the CA that issued it,
then the CA before it while that one is still valid, so that the API server trusts the
webhook's certificate whichever of the two its pods serve while the Secret's new files
reach them).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT_KEY, KEY_KEY, CA_KEY = "tls.crt", "tls.key", "ca.crt"
BACKDATE = datetime.timedelta(minutes=5)  # clocks of the API server and ours may differ


def _usage(*, signs: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs,
        crl_sign=signs,
        encipher_only=False,
        decipher_only=False,
    )


def _names(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def self_signed_certificate(*, hosts: list[str], days: int = 365) -> tuple[bytes, bytes]:
    """A self-signed certificate (PEM) for `hosts` (DNS names and IP addresses, all in its
    SANs) and its key (PEM): its own CA, so it is also the caBundle to give the API server."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_usage(signs=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _pem(certificate), _key_pem(key)


def service_hosts(service: str, namespace: str) -> list[str]:
    """The names the API server may call a Service by; the last is the one it uses."""
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc"]


def issue(
    *, hosts: list[str], now: datetime.datetime, validity: datetime.timedelta
) -> dict[str, bytes]:
    """A fresh CA (its key is thrown away: the next renewal makes a new one) and a serving
    certificate it issued for `hosts`, as the Secret's data (`ca.crt` the CA alone)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    # A name of its own per CA, so a bundle of the new and the previous CA stays unambiguous.
    ca_name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"warmstart-webhook CA {now:%Y%m%dT%H%M%S%fZ}")]
    )
    start, end = now - BACKDATE, now + validity
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(signs=True), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    serving = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[-1])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(signs=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return {CERT_KEY: _pem(serving), KEY_KEY: _key_pem(key), CA_KEY: _pem(ca)}


@dataclass(frozen=True)
class Verdict:
    """What the Secret's data is worth: `renew` names why it must be replaced (None: it
    serves); `previous_ca` is its CA (PEM) where it still is one to keep trusting."""

    renew: str | None
    previous_ca: bytes = b""


def judge(
    data: Mapping[str, bytes],
    *,
    host: str,
    now: datetime.datetime,
    renew_before: datetime.timedelta,
) -> Verdict:
    """Whether `data` (the Secret's, decoded) holds a serving certificate for `host` that
    its key matches, issued by the first CA of `ca.crt`, and valid past `now +
    renew_before` (the CA too)."""
    try:
        serving = x509.load_pem_x509_certificate(data[CERT_KEY])
        key = serialization.load_pem_private_key(data[KEY_KEY], password=None)
        cas = x509.load_pem_x509_certificates(data[CA_KEY])
    except KeyError as err:
        return Verdict(renew=f"no {err.args[0]}")
    except ValueError as err:
        return Verdict(renew=f"does not load ({err})")
    ca = cas[0]
    previous = _pem(ca) if ca.not_valid_after_utc > now else b""
    if key.public_key() != serving.public_key():
        return Verdict(renew="its key is not the certificate's", previous_ca=previous)
    try:
        serving.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return Verdict(renew="its CA did not issue its certificate", previous_ca=previous)
    try:
        names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = x509.SubjectAlternativeName([])
    if host not in names.get_values_for_type(x509.DNSName):
        return Verdict(renew=f"it is not for {host}", previous_ca=previous)
    for what, certificate in (("certificate", serving), ("CA", ca)):
        if certificate.not_valid_before_utc > now:
            return Verdict(renew=f"its {what} is not valid yet", previous_ca=previous)
        expires = certificate.not_valid_after_utc
        if expires - renew_before <= now:
            when = f"{expires:%Y-%m-%dT%H:%M:%SZ}"
            return Verdict(renew=f"its {what} expires at {when}", previous_ca=previous)
    return Verdict(renew=None)


def renewed(
    previous_ca: bytes, *, hosts: list[str], now: datetime.datetime, validity: datetime.timedelta
) -> dict[str, bytes]:
    """A fresh pair; `ca.crt` is its CA, then `previous_ca` (still trusted until the pods
    serve the fresh certificate)."""
    data = issue(hosts=hosts, now=now, validity=validity)
    data[CA_KEY] += previous_ca
    return data
