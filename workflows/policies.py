"""Pure decisions the workflows make: timeouts and retry budgets per step, failure reasons."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from pydantic import ValidationError
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    TimeoutError,
    TimeoutType,
)

from activities.contracts import VerificationObservation
from api.errors import PipelineFailedError
from api.reasons import Reason, as_reason
from api.restore_pods import STANDBY_DEADLINE_SECONDS


@dataclass(frozen=True)
class StepOptions:
    """Timeouts and retries of one step. A node step's schedule-to-start timeout is the
    request's node timeout (a node whose worker does not pick the step up is lost)."""

    start_to_close: timedelta
    retry: RetryPolicy
    heartbeat: timedelta | None = None


def _retry(attempts: int, initial_seconds: float = 1.0) -> RetryPolicy:
    return RetryPolicy(
        initial_interval=timedelta(seconds=initial_seconds),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=30),
        maximum_attempts=attempts,
    )


CONTROL = StepOptions(start_to_close=timedelta(seconds=30), retry=_retry(5))
LAUNCH = StepOptions(start_to_close=timedelta(seconds=60), retry=_retry(2))
SENTINEL = StepOptions(start_to_close=timedelta(seconds=30), retry=_retry(5))
# The dump heartbeats every second: a worker killed mid-dump is noticed within 10 s.
DUMP = StepOptions(
    start_to_close=timedelta(minutes=30),
    heartbeat=timedelta(seconds=10),
    retry=_retry(2, initial_seconds=5),
)
# An upload heartbeats every second; a retry resumes from the parts already stored.
UPLOAD = StepOptions(
    start_to_close=timedelta(hours=6),
    heartbeat=timedelta(seconds=30),
    retry=_retry(5, initial_seconds=5),
)
COMMIT = StepOptions(start_to_close=timedelta(minutes=30), retry=_retry(3))
CLEANUP = StepOptions(start_to_close=timedelta(seconds=60), retry=_retry(3))
# The restore activity runs on the queue of the node worker that runs the workflow.
RESTORE_SCHEDULE_TO_START = timedelta(seconds=30)


def await_ready_options(ready_timeout_seconds: float) -> StepOptions:
    """The workload's own readiness budget plus slack; heartbeats catch a lost node."""
    return StepOptions(
        start_to_close=timedelta(seconds=ready_timeout_seconds + 60),
        heartbeat=timedelta(seconds=15),
        retry=_retry(3, initial_seconds=2),
    )


def restore_options(answer_timeout_seconds: float) -> StepOptions:
    """One attempt: a failed restore falls back to a cold start rather than trying again."""
    return StepOptions(
        start_to_close=timedelta(seconds=answer_timeout_seconds + 600),
        heartbeat=timedelta(seconds=120),
        retry=RetryPolicy(maximum_attempts=1),
    )


def verify_options(answer_timeout_seconds: float) -> StepOptions:
    """A verified capture's test restore: one attempt, as a restore (a retry could only
    find the first attempt's throwaway process in its way); the capture then fails. It
    heartbeats twice a second: a short timeout lets a cancel reach it within seconds (the
    SDK sends heartbeats at most every 0.8 times the timeout) and a lost node show soon."""
    return StepOptions(
        start_to_close=timedelta(seconds=answer_timeout_seconds + 600),
        heartbeat=timedelta(seconds=5),
        retry=RetryPolicy(maximum_attempts=1),
    )


# A verification pod's `restore-status` once its node restored it (decision 0045).
RESTORED = "restored"
# How long a verification pod may take to be scheduled and restored (or fall back): the
# standby's own deadline, past which it starts cold whatever the node does.
VERIFY_RESTORE_SECONDS = float(STANDBY_DEADLINE_SECONDS)


def verification_verdict(
    seen: VerificationObservation,
    *,
    where: str,
    version: str,
    waited: float,
    restored_for: float,
    answer_seconds: float,
) -> bool | PipelineFailedError:
    """What a verified cluster capture makes of its verification pod as last read: True
    when its node restored it and its container is Ready; False to read it again; or the
    VerifyFailed failure, with what the pod says: a restore that fell back (its reason), a
    pod started cold, one that ended or went, one not restored within
    VERIFY_RESTORE_SECONDS of `waited`, or one restored and not Ready within
    `answer_seconds` of `restored_for`."""
    status = seen.restore_status

    def failed(why: str) -> PipelineFailedError:
        return PipelineFailedError(f"version {version}: {why}", reason=Reason.VERIFY_FAILED)

    if status and status != RESTORED:
        return failed(f"{where} was not restored: {status}")
    if seen.failure:
        return failed(f"{seen.failure}{' after its restore' if status else ''}")
    if status == RESTORED:
        if seen.ready:
            return True
        if restored_for >= answer_seconds:
            return failed(
                f"{where} was restored, but its container was not Ready within "
                f"{answer_seconds:g} s (its readiness probe did not pass)"
            )
        return False
    if waited >= VERIFY_RESTORE_SECONDS:
        return failed(
            f"{where} was not restored within {VERIFY_RESTORE_SECONDS:g} s (not scheduled, "
            "or no node worker restored it)"
        )
    return False


def container_restore_options(deadline_seconds: float) -> StepOptions:
    """A restore into a pod's standby: one attempt within the pod's restore deadline (past
    it the pod starts cold rather than waiting on), heartbeats catching a lost worker."""
    return StepOptions(
        start_to_close=timedelta(seconds=deadline_seconds),
        heartbeat=timedelta(seconds=120),
        retry=RetryPolicy(maximum_attempts=1),
    )


# The type the SDK gives an activity its worker cancelled on shutdown (pod deleted, node
# drained): the node was lost for this step, nothing in the step itself failed.
WORKER_SHUTDOWN = "WorkerShutdown"


def step_failure(err: ActivityError, *, node: str) -> PipelineFailedError:
    """Why a step failed, as the reason and message of the status and the workflow failure."""
    cause = err.cause
    if isinstance(cause, CancelledError):
        return PipelineFailedError("cancelled", reason=Reason.CANCELLED)
    if isinstance(cause, TimeoutError) and cause.type == TimeoutType.SCHEDULE_TO_START:
        return PipelineFailedError(
            f"node {node}: its node worker did not pick up {err.activity_type} in time "
            "(node or worker gone)",
            reason=Reason.NODE_LOST,
        )
    if isinstance(cause, ApplicationError) and cause.type == WORKER_SHUTDOWN:
        return PipelineFailedError(
            f"node {node}: its node worker stopped while {err.activity_type} ran "
            "(its pod deleted or restarted); the step was not finished",
            reason=Reason.NODE_LOST,
        )
    reason = as_reason(cause.type) if isinstance(cause, ApplicationError) else None
    if isinstance(cause, ApplicationError) and reason is not None:
        return PipelineFailedError(cause.message, reason=reason)
    if isinstance(cause, TimeoutError):
        kind = cause.type.name if cause.type else "unknown"
        return PipelineFailedError(
            f"{err.activity_type} timed out ({kind})", reason=Reason.STEP_TIMED_OUT
        )
    return PipelineFailedError(
        f"{err.activity_type} failed: {cause or err}", reason=Reason.INTERNAL
    )


# A workflow whose input (or a contract it builds) does not validate fails at once with the
# validation message naming each field, instead of retrying its task for ever: a hostile or
# malformed start request is refused, and nothing was touched.
FAILING_EXCEPTIONS: tuple[type[BaseException], ...] = (ValidationError,)
