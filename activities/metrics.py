"""The metrics warmstart exports: one table of OpenTelemetry instruments (`INSTRUMENTS`) and
the few calls that record them.

Instruments are made on the global meter provider's meter: until a worker or the controller
installs a provider (`workers.metrics`, `WARMSTART_TELEMETRY__METRICS`) they are the API's
no-op proxies and recording costs next to nothing; once one is installed the same objects
record into it. Names follow OpenTelemetry's conventions (dotted, unit apart, `{thing}` for
counts); the Prometheus exporter turns `warmstart.restore.duration` (unit `s`) into
`warmstart_restore_duration_seconds` and a counter `warmstart.restores` into
`warmstart_restores_total`. The dashboard and alert rules in `deploy/observability/` may
name only what this table makes (`tests/workers/test_observability.py`).

Attributes are few and bounded: a step's name, an outcome, a `Reason`, a direction, a task
queue: never a checkpoint ID, pod or node (Prometheus adds the scraped instance).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from threading import Lock
from typing import Any, Literal

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Meter, Observation

Kind = Literal["counter", "updown", "histogram", "gauge"]
Callback = Callable[[CallbackOptions], Iterable[Observation]]

METER = "warmstart"

# Attribute keys.
STEP = "warmstart.step"
STAGE = "warmstart.stage"
OUTCOME = "warmstart.outcome"
REASON = "warmstart.reason"
DIRECTION = "warmstart.transfer.direction"
RESULT = "warmstart.cache.result"
STATE = "warmstart.quarantine.state"
TASK_QUEUE = "temporal.task_queue"
QUEUE_KIND = "temporal.task_queue.kind"

# Outcomes of a restore pipeline: the checkpoint answered; it failed and the workload starts
# cold; or it was refused before anything ran (the node's refusal, the gate's judgement).
RESTORED = "restored"
FELL_BACK = "fell_back"
REFUSED = "refused"


# Histogram bucket bounds: seconds from a restore stage (milliseconds) to a capture or a
# large transfer (half an hour); transfer rates from 1 MiB/s to 16 GiB/s.
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
RATES = tuple(float(1 << shift) for shift in range(20, 35, 2))


@dataclass(frozen=True)
class Instrument:
    name: str
    kind: Kind
    unit: str
    description: str
    buckets: tuple[float, ...] = SECONDS


STEP_DURATION = Instrument(
    "warmstart.step.duration",
    "histogram",
    "s",
    "Wall time of one step attempt (an activity) on this worker, by step, outcome and reason",
)
STEPS_ACTIVE = Instrument(
    "warmstart.step.active",
    "updown",
    "{step}",
    "Step attempts (activities) running on this worker now, by step",
)
RESTORE_STAGE_DURATION = Instrument(
    "warmstart.restore.stage.duration",
    "histogram",
    "s",
    "Wall time of each stage inside a restore step (verify, fetch, prepare, criu-restore...)",
)
RESTORE_DURATION = Instrument(
    "warmstart.restore.duration",
    "histogram",
    "s",
    "A restore pipeline from its start to its end, by outcome and reason",
)
RESTORES = Instrument(
    "warmstart.restores",
    "counter",
    "{restore}",
    "Restore pipelines ended, by outcome (restored, fell_back, refused) and reason",
)
CAPTURE_DURATION = Instrument(
    "warmstart.capture.duration",
    "histogram",
    "s",
    "A capture pipeline from its start to its end, by outcome and reason",
)
CAPTURES = Instrument(
    "warmstart.captures",
    "counter",
    "{capture}",
    "Capture pipelines ended, by outcome (ready, failed) and reason",
)
TRANSFER_BYTES = Instrument(
    "warmstart.transfer.bytes",
    "counter",
    "By",
    "Bytes moved between this node and the remote store, by direction (upload, download)",
)
TRANSFER_DURATION = Instrument(
    "warmstart.transfer.duration",
    "histogram",
    "s",
    "Wall time of one whole version's transfer, by direction",
)
TRANSFER_RATE = Instrument(
    "warmstart.transfer.rate",
    "histogram",
    "By/s",
    "Bytes per second of one whole version's transfer, by direction",
    RATES,
)
CACHE_LOOKUPS = Instrument(
    "warmstart.cache.lookups",
    "counter",
    "{lookup}",
    "Restores and prefetches that looked for a remote version in the node cache, by result",
)
CACHE_USAGE = Instrument(
    "warmstart.cache.usage",
    "gauge",
    "By",
    "Bytes of committed versions the node cache holds",
)
QUARANTINE_ENTRIES = Instrument(
    "warmstart.quarantine.entries",
    "counter",
    "{entry}",
    "Restore failures recorded as quarantine evidence, by reason and where the version now "
    "stands on the node class (active: quarantined, pending: not yet)",
)
QUEUE_BACKLOG = Instrument(
    "warmstart.queue.backlog",
    "gauge",
    "{task}",
    "Tasks waiting in a task queue this process serves, by queue and kind (Temporal's "
    "approximate backlog count)",
)

INSTRUMENTS = (
    STEP_DURATION,
    STEPS_ACTIVE,
    RESTORE_STAGE_DURATION,
    RESTORE_DURATION,
    RESTORES,
    CAPTURE_DURATION,
    CAPTURES,
    TRANSFER_BYTES,
    TRANSFER_DURATION,
    TRANSFER_RATE,
    CACHE_LOOKUPS,
    CACHE_USAGE,
    QUARANTINE_ENTRIES,
    QUEUE_BACKLOG,
)


def make_instruments(meter: Meter, callbacks: Mapping[str, Callback]) -> dict[str, Any]:
    """Every instrument of `INSTRUMENTS` on `meter`, by name; a gauge observes through its
    entry in `callbacks`."""
    made: dict[str, Any] = {}
    for spec in INSTRUMENTS:
        common: dict[str, Any] = {"unit": spec.unit, "description": spec.description}
        if spec.kind == "counter":
            made[spec.name] = meter.create_counter(spec.name, **common)
        elif spec.kind == "updown":
            made[spec.name] = meter.create_up_down_counter(spec.name, **common)
        elif spec.kind == "histogram":
            made[spec.name] = meter.create_histogram(
                spec.name, explicit_bucket_boundaries_advisory=spec.buckets, **common
            )
        else:
            callback = callbacks[spec.name]
            made[spec.name] = meter.create_observable_gauge(
                spec.name, callbacks=[callback], **common
            )
    return made


class Gauges:
    """What the observable gauges report at each collection: values set by whoever knows
    them (the backlog watch), and sources asked then (the node cache's size)."""

    def __init__(self) -> None:
        self._lock = Lock()
        self._values: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        self._sources: dict[str, dict[str, Callable[[], Iterable[Observation]]]] = {}

    def set(self, name: str, value: float, attributes: Mapping[str, str]) -> None:
        with self._lock:
            self._values.setdefault(name, {})[tuple(sorted(attributes.items()))] = value

    def add_source(self, name: str, key: str, source: Callable[[], Iterable[Observation]]) -> None:
        """`source` observes gauge `name` from now on (in place of an earlier one of `key`)."""
        with self._lock:
            self._sources.setdefault(name, {})[key] = source

    def callback(self, name: str) -> Callback:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            with self._lock:
                values = dict(self._values.get(name, {}))
                sources = list(self._sources.get(name, {}).values())
            found = [Observation(value, dict(key)) for key, value in values.items()]
            for source in sources:
                found.extend(source())
            return found

        return observe


GAUGES = Gauges()
_made = make_instruments(
    metrics.get_meter(METER),
    {spec.name: GAUGES.callback(spec.name) for spec in INSTRUMENTS if spec.kind == "gauge"},
)


def instrument(spec: Instrument) -> Any:
    """The instrument `spec` names, on the global meter provider."""
    return _made[spec.name]


def transferred(direction: Literal["upload", "download"], moved: int, seconds: float) -> None:
    """A whole version moved: `moved` bytes on the wire in `seconds`, and so its rate."""
    attributes = {DIRECTION: direction}
    instrument(TRANSFER_BYTES).add(moved, attributes)
    instrument(TRANSFER_DURATION).record(seconds, attributes)
    if seconds > 0 and moved:
        instrument(TRANSFER_RATE).record(moved / seconds, attributes)


def cache_lookup(*, hit: bool) -> None:
    instrument(CACHE_LOOKUPS).add(1, {RESULT: "hit" if hit else "miss"})


def quarantine_recorded(reason: str, *, active: bool) -> None:
    state = "active" if active else "pending"
    instrument(QUARANTINE_ENTRIES).add(1, {REASON: reason, STATE: state})


def stage_finished(stage: str, seconds: float) -> None:
    instrument(RESTORE_STAGE_DURATION).record(seconds, {STAGE: stage})
