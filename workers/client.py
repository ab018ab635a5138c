"""Temporal client construction: pydantic data converter, tracing when it is exported."""

from __future__ import annotations

import asyncio
import dataclasses
from urllib.parse import quote

from temporalio.client import Client, Interceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter

from api.errors import UnavailableError
from workers.settings import Settings


def _interceptors(settings: Settings) -> list[Interceptor]:
    """OpenTelemetry's interceptor (also applied to this client's workers) only when traces
    are exported: it costs milliseconds on the restore path and its import costs start time."""
    if settings.telemetry.exporter == "off":
        return []
    from temporalio.contrib.opentelemetry import TracingInterceptor

    return [TracingInterceptor()]


def data_converter(settings: Settings) -> DataConverter:
    """The pydantic converter, with the encryption codec when a key file is configured."""
    if settings.temporal.codec_key_file is None:
        return pydantic_data_converter
    from workers.codec import EncryptionCodec, load_key

    codec = EncryptionCodec(load_key(settings.temporal.codec_key_file))
    return dataclasses.replace(pydantic_data_converter, payload_codec=codec)


async def connect(settings: Settings, *, wait_seconds: float = 0.0) -> Client:
    """A client with the pydantic converter; `wait_seconds` retries while a server that was
    just started is not yet healthy."""
    temporal = settings.temporal
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
            )
        except RuntimeError as err:
            if loop.time() < deadline:
                await asyncio.sleep(0.1)
                continue
            raise UnavailableError(
                f"no Temporal server at {temporal.address} ({err}); start one with `warmstart dev`"
            ) from err


def workflow_ui_url(ui_url: str, namespace: str, workflow_id: str, run_id: str) -> str:
    workflow = quote(workflow_id, safe="")
    return f"{ui_url}/namespaces/{namespace}/workflows/{workflow}/{run_id}/history"
