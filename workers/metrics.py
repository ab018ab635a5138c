"""Metrics (decision 0038): the meter provider a worker or the controller installs, with a
Prometheus endpoint or an OTLP push; the worker interceptor that times every step and counts
pipelines by outcome; the watch of the served task queues' backlogs.

The instruments themselves are declared once in `activities.metrics`; what records them
below the workers (transfers, the node cache, the quarantine, restore stages) does so there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import Observation
from temporalio import activity, workflow
from temporalio.exceptions import ApplicationError, FailureError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    ExecuteWorkflowInput,
    Interceptor,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
)

from activities import metrics
from api.errors import WarmstartError
from api.naming import CAPTURE_WORKFLOW, RESTORE_WORKFLOW
from api.reasons import Reason, as_reason
from workers.settings import TelemetrySettings

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from temporalio.client import Client

    from activities.storage.objectstore.cache import NodeCache

log = logging.getLogger(__name__)

# Reasons of a restore refused by the node's gate before anything ran.
REFUSING_REASONS = frozenset({Reason.INCOMPATIBLE, Reason.QUARANTINED})

_provider: MeterProvider | None = None
_server: Any = None  # the Prometheus endpoint's HTTP server, when serving


def configure_metrics(settings: TelemetrySettings) -> MeterProvider | None:
    """Install the global meter provider once, exporting as `settings.metrics` says (a
    Prometheus endpoint on `prometheus_host:prometheus_port`, or OTLP); None when off."""
    global _provider, _server
    if settings.metrics == "off" or _provider is not None:
        return _provider
    from opentelemetry import metrics as otel
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    reader: MetricReader
    if settings.metrics == "prometheus":
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        reader = PrometheusMetricReader()
        _server, _thread = start_http_server(
            settings.prometheus_port, addr=settings.prometheus_host
        )
    else:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        exporter = (
            OTLPMetricExporter(endpoint=settings.otlp_endpoint)
            if settings.otlp_endpoint
            else OTLPMetricExporter()
        )
        interval = int(settings.metrics_interval_seconds * 1000)
        reader = PeriodicExportingMetricReader(exporter, export_interval_millis=interval)
    resource = Resource.create({"service.name": settings.service_name})
    _provider = MeterProvider(resource=resource, metric_readers=[reader])
    otel.set_meter_provider(_provider)
    return _provider


def shutdown_metrics() -> None:
    """Push what is left (OTLP) and close the Prometheus endpoint."""
    global _server
    if _provider is not None:
        _provider.shutdown()
    if _server is not None:
        _server.shutdown()
        _server.server_close()
        _server = None


@contextlib.asynccontextmanager
async def serving_metrics(settings: TelemetrySettings) -> AsyncIterator[None]:
    """Metrics exported while the block runs (a long-running process: workers, controller)."""
    if configure_metrics(settings) is None:
        yield
        return
    where = (
        f"http://{settings.prometheus_host}:{settings.prometheus_port}/metrics"
        if settings.metrics == "prometheus"
        else f"OTLP {settings.otlp_endpoint or '(exporter default)'}"
    )
    log.info("metrics: %s", where)
    try:
        yield
    finally:
        shutdown_metrics()


def _reason(err: BaseException) -> str:
    """The Reason a step or pipeline ended with: its warmstart error's, its failure's type,
    Cancelled, else InternalError (an unexpected exception, retried by policy)."""
    if isinstance(err, WarmstartError):
        return err.reason.value
    if isinstance(err, asyncio.CancelledError):
        return Reason.CANCELLED.value
    found = err
    while isinstance(found, FailureError):
        if isinstance(found, ApplicationError) and as_reason(found.type) is not None:
            return str(found.type)
        if found.cause is None:
            break
        found = found.cause
    return Reason.INTERNAL.value


class _TimedSteps(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        step = {metrics.STEP: activity.info().activity_type}
        active = metrics.instrument(metrics.STEPS_ACTIVE)
        active.add(1, step)
        started = time.monotonic()
        ended: dict[str, str] = {metrics.OUTCOME: "ok"}
        try:
            return await super().execute_activity(input)
        except BaseException as err:
            ended = {metrics.OUTCOME: "failed", metrics.REASON: _reason(err)}
            raise
        finally:
            active.add(-1, step)
            duration = metrics.instrument(metrics.STEP_DURATION)
            duration.record(time.monotonic() - started, {**step, **ended})


class _PipelineOutcomes(WorkflowInboundInterceptor):
    """Counts and times capture and restore pipelines where they end, live only (never as a
    history replays), by outcome and reason."""

    async def execute_workflow(self, input: ExecuteWorkflowInput) -> Any:
        kind = workflow.info().workflow_type
        if kind not in (CAPTURE_WORKFLOW, RESTORE_WORKFLOW):
            return await super().execute_workflow(input)
        try:
            result = await super().execute_workflow(input)
        except (FailureError, asyncio.CancelledError) as err:  # the run ends failed
            self._ended(kind, input, err)
            raise
        self._ended(kind, input, None)
        return result

    def _ended(self, kind: str, input: ExecuteWorkflowInput, err: BaseException | None) -> None:
        if workflow.unsafe.is_replaying():
            return
        seconds = (workflow.now() - workflow.info().workflow_start_time).total_seconds()
        reason = _reason(err) if err is not None else ""
        if kind == RESTORE_WORKFLOW:
            request = input.args[0] if input.args else None
            if err is None:
                outcome, reason = metrics.RESTORED, Reason.RESTORED.value
            elif getattr(request, "refusal", None) is not None or reason in REFUSING_REASONS:
                outcome = metrics.REFUSED
            else:
                outcome = metrics.FELL_BACK
            counter, histogram = metrics.RESTORES, metrics.RESTORE_DURATION
        else:
            outcome = "failed" if err is not None else "ready"
            reason = reason or Reason.CAPTURED.value
            counter, histogram = metrics.CAPTURES, metrics.CAPTURE_DURATION
        attributes = {metrics.OUTCOME: outcome, metrics.REASON: reason}
        with workflow.unsafe.sandbox_unrestricted():  # the SDK's locks and clocks
            metrics.instrument(counter).add(1, attributes)
            metrics.instrument(histogram).record(max(seconds, 0.0), attributes)


class PipelineMetrics(Interceptor):
    """Worker interceptor: each step attempt timed (`warmstart.step.duration`, running ones
    counted), each capture and restore pipeline counted and timed where it ends."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _TimedSteps(next)

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor] | None:
        return _PipelineOutcomes


def watch_cache(cache: NodeCache) -> None:
    """Report the node cache's size at each collection (`warmstart.cache.usage`)."""

    def usage() -> Iterable[Observation]:
        return [Observation(sum(entry.size_bytes for entry in cache.entries()))]

    metrics.GAUGES.add_source(metrics.CACHE_USAGE.name, str(cache.root), usage)


async def queue_backlog(client: Client, task_queue: str) -> dict[str, int]:
    """Temporal's approximate backlog of `task_queue`, by kind (workflow, activity)."""
    from temporalio.api.enums.v1 import TaskQueueKind, TaskQueueType
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

    found = {}
    kinds = (
        ("workflow", TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW),
        ("activity", TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY),
    )
    for name, queue_type in kinds:
        request = DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=task_queue, kind=TaskQueueKind.TASK_QUEUE_KIND_NORMAL),
            task_queue_type=queue_type,
            report_stats=True,
        )
        response = await client.workflow_service.describe_task_queue(request)
        found[name] = response.stats.approximate_backlog_count
    return found


@contextlib.asynccontextmanager
async def watching_backlog(
    client: Client, task_queues: Sequence[str], *, every_seconds: float
) -> AsyncIterator[None]:
    """While the block runs, ask Temporal for the backlog of `task_queues` every
    `every_seconds` (`warmstart.queue.backlog`); a failed ask is logged and tried again."""

    async def watch() -> None:
        while True:
            for queue in task_queues:
                try:
                    counts = await queue_backlog(client, queue)
                except Exception as err:  # the server away: the next round asks again
                    log.warning("backlog of %s not read: %s", queue, err)
                    continue
                for kind, count in counts.items():
                    attributes = {metrics.TASK_QUEUE: queue, metrics.QUEUE_KIND: kind}
                    metrics.GAUGES.set(metrics.QUEUE_BACKLOG.name, count, attributes)
            await asyncio.sleep(every_seconds)

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
