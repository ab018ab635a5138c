"""Pure decisions the workflows make: timeouts and retry budgets per step, failure reasons."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import timedelta

from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    TimeoutError,
    TimeoutType,
)

from api.reasons import Reason

# Longer than a node worker restart, shorter than anyone waits for a capture.
NODE_SCHEDULE_TO_START = timedelta(minutes=2)


@dataclass(frozen=True)
class StepOptions:
    start_to_close: timedelta
    retry: RetryPolicy
    heartbeat: timedelta | None = None
    schedule_to_start: timedelta | None = None


def _retry(attempts: int, initial_seconds: float = 1.0) -> RetryPolicy:
    return RetryPolicy(
        initial_interval=timedelta(seconds=initial_seconds),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=30),
        maximum_attempts=attempts,
    )


CONTROL = StepOptions(start_to_close=timedelta(seconds=30), retry=_retry(5))
LAUNCH = StepOptions(
    start_to_close=timedelta(seconds=60), retry=_retry(2), schedule_to_start=NODE_SCHEDULE_TO_START
)
SENTINEL = StepOptions(
    start_to_close=timedelta(seconds=30), retry=_retry(5), schedule_to_start=NODE_SCHEDULE_TO_START
)
DUMP = StepOptions(
    start_to_close=timedelta(minutes=30),
    heartbeat=timedelta(seconds=20),
    retry=_retry(2, initial_seconds=5),
    schedule_to_start=NODE_SCHEDULE_TO_START,
)
COMMIT = StepOptions(
    start_to_close=timedelta(minutes=30), retry=_retry(3), schedule_to_start=NODE_SCHEDULE_TO_START
)
CLEANUP = StepOptions(
    start_to_close=timedelta(seconds=60), retry=_retry(3), schedule_to_start=NODE_SCHEDULE_TO_START
)


def on_node(opts: StepOptions, node_timeout_seconds: float) -> StepOptions:
    """The step with the request's node timeout as its schedule-to-start timeout."""
    return replace(opts, schedule_to_start=timedelta(seconds=node_timeout_seconds))


def await_ready_options(ready_timeout_seconds: float) -> StepOptions:
    """The workload's own readiness budget plus slack; heartbeats catch a lost node."""
    return StepOptions(
        start_to_close=timedelta(seconds=ready_timeout_seconds + 60),
        heartbeat=timedelta(seconds=15),
        retry=_retry(3, initial_seconds=2),
        schedule_to_start=NODE_SCHEDULE_TO_START,
    )


def restore_options(answer_timeout_seconds: float) -> StepOptions:
    """One attempt: a failed restore falls back to a cold start rather than trying again."""
    return StepOptions(
        start_to_close=timedelta(seconds=answer_timeout_seconds + 600),
        heartbeat=timedelta(seconds=120),
        retry=RetryPolicy(maximum_attempts=1),
        schedule_to_start=timedelta(seconds=30),
    )


def failure_reason(err: BaseException, *, node: str = "") -> tuple[str, str]:
    """(reason, message) of a failed step, for the status and the workflow failure."""
    cause = err.cause if isinstance(err, ActivityError) else err
    if isinstance(cause, CancelledError):
        return str(Reason.CANCELLED), "cancelled"
    if isinstance(cause, TimeoutError) and cause.type == TimeoutType.SCHEDULE_TO_START:
        step = err.activity_type if isinstance(err, ActivityError) else "a step"
        return str(Reason.NODE_LOST), (
            f"node {node or '?'}: its node worker did not pick up {step} in time "
            "(node or worker gone)"
        )
    if isinstance(cause, ApplicationError) and cause.type:
        return cause.type, cause.message
    if isinstance(cause, TimeoutError):
        return "Timeout", f"step timed out ({cause.type.name if cause.type else 'unknown'})"
    return "Failed", str(cause or err)
