"""Temporal client construction: pydantic data converter and the OpenTelemetry interceptor."""

from __future__ import annotations

import asyncio

from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.contrib.pydantic import pydantic_data_converter

from workers.settings import Settings


class ServerUnavailableError(Exception):
    """No Temporal server answers at the configured address."""


async def connect(settings: Settings, *, wait_seconds: float = 0.0) -> Client:
    """A client with the pydantic converter; traced (client and its workers) unless tracing
    is off, since the interceptor costs milliseconds on the restore critical path.

    `wait_seconds` retries while a server that was just started is not yet healthy.
    """
    temporal = settings.temporal
    tracing = settings.telemetry.exporter != "off"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_seconds
    kwargs = {"identity": temporal.identity} if temporal.identity else {}
    while True:
        try:
            return await Client.connect(
                temporal.address,
                namespace=temporal.namespace,
                data_converter=pydantic_data_converter,
                interceptors=[TracingInterceptor()] if tracing else [],
                **kwargs,  # type: ignore[arg-type]
            )
        except RuntimeError as err:
            if loop.time() < deadline:
                await asyncio.sleep(0.1)
                continue
            raise ServerUnavailableError(
                f"no Temporal server at {temporal.address} ({err}); start one with `warmstart dev`"
            ) from err


def workflow_ui_url(ui_url: str, namespace: str, workflow_id: str, run_id: str) -> str:
    from urllib.parse import quote

    return (
        f"{ui_url}/namespaces/{namespace}/workflows/{quote(workflow_id, safe='')}/{run_id}/history"
    )
