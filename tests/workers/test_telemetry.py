"""OpenTelemetry: one trace from the client's span through the workflow into each activity."""

from __future__ import annotations

import uuid

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from api.naming import node_task_queue
from tests.workflows.test_capture_workflow import Harness, StandIns
from workers.operations import start_capture
from workers.settings import TelemetrySettings
from workers.telemetry import configure_tracing
from workflows.capture import CaptureWorkflow


def test_off_installs_nothing() -> None:
    assert configure_tracing(TelemetrySettings(exporter="off")) is None


async def test_spans_share_one_trace(temporal_env: WorkflowEnvironment) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    client = await Client.connect(
        temporal_env.client.service_client.config.target_host,
        data_converter=pydantic_data_converter,
        interceptors=[TracingInterceptor(tracer)],
    )
    stand_ins, suffix = StandIns(), uuid.uuid4().hex[:8]
    harness = Harness(client, stand_ins, f"control-{suffix}", f"node-{suffix}")
    async with (
        Worker(
            client,
            task_queue=harness.control_queue,
            workflows=[CaptureWorkflow],
            activities=stand_ins.control(),
        ),
        Worker(client, task_queue=node_task_queue(harness.node), activities=stand_ins.node()),
    ):
        with tracer.start_as_current_span("watcher"):
            handle = await start_capture(client, harness.request())
        await handle.result()
    spans = exporter.get_finished_spans()
    names = {s.name for s in spans}
    assert "StartWorkflow:CaptureWorkflow" in names
    assert "RunActivity:dump_checkpoint" in names
    assert "RunActivity:publish_status" in names
    assert len({s.context.trace_id for s in spans}) == 1
