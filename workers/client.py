"""Temporal client construction: pydantic data converter, tracing when it is exported."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from temporalio.client import Client, Interceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.service import TLSConfig

from api.errors import InvalidSpecError, UnavailableError
from workers.settings import Settings


def _interceptors(settings: Settings) -> list[Interceptor]:
    """OpenTelemetry's interceptor (also applied to this client's workers) only when traces
    are exported: it costs milliseconds on the restore path and its import costs start time."""
    if settings.telemetry.exporter == "off":
        return []
    from temporalio.contrib.opentelemetry import TracingInterceptor

    return [TracingInterceptor()]


def data_converter(settings: Settings) -> DataConverter:
    """The pydantic converter, with the encryption codec when a key file is configured. The
    codec then covers failures too: their messages and stack traces travel as encoded
    attributes (a payload the codec seals), since an error can quote what a secret became."""
    if settings.temporal.codec_key_file is None:
        return pydantic_data_converter
    from workers.codec import EncryptionCodec, load_key

    codec = EncryptionCodec(load_key(settings.temporal.codec_key_file))
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=codec,
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


def tls_config(settings: Settings) -> TLSConfig | bool:
    """TLS to the frontend from settings (False: plaintext, as the dev server speaks). A
    client certificate needs its key and the other way round; a file that cannot be read
    is an InvalidSpecError naming its setting."""
    temporal = settings.temporal
    if not temporal.uses_tls:
        return False
    if (temporal.tls_cert_file is None) != (temporal.tls_key_file is None):
        raise InvalidSpecError(
            "WARMSTART_TEMPORAL__TLS_CERT_FILE and WARMSTART_TEMPORAL__TLS_KEY_FILE go together"
        )
    return TLSConfig(
        server_root_ca_cert=_read("TLS_CA_FILE", temporal.tls_ca_file),
        client_cert=_read("TLS_CERT_FILE", temporal.tls_cert_file),
        client_private_key=_read("TLS_KEY_FILE", temporal.tls_key_file),
        domain=temporal.tls_server_name,
    )


def _read(setting: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise InvalidSpecError(f"WARMSTART_TEMPORAL__{setting}={path}: {err.strerror}") from err


def _api_key(settings: Settings) -> str | None:
    path = settings.temporal.api_key_file
    key = _read("API_KEY_FILE", path)
    if key is None:
        return None
    text = key.decode(errors="replace").strip()
    if not text:
        raise InvalidSpecError(f"WARMSTART_TEMPORAL__API_KEY_FILE={path}: the file is empty")
    return text


async def connect(settings: Settings, *, wait_seconds: float = 0.0) -> Client:
    """A client with the pydantic converter; `wait_seconds` retries while a server that was
    just started is not yet healthy."""
    temporal = settings.temporal
    tls, api_key = tls_config(settings), _api_key(settings)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_seconds
    while True:
        try:
            return await Client.connect(
                temporal.address,
                namespace=temporal.namespace,
                data_converter=data_converter(settings),
                interceptors=_interceptors(settings),
                identity=temporal.identity,
                tls=tls,
                api_key=api_key,
            )
        except RuntimeError as err:
            if loop.time() < deadline:
                await asyncio.sleep(0.1)
                continue
            how = " over TLS" if tls else ""
            raise UnavailableError(
                f"no Temporal server at {temporal.address}{how} ({err}); start one with "
                "`warmstart dev`, or check the WARMSTART_TEMPORAL__* settings"
            ) from err
