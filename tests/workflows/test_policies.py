"""Pure decisions: failure reasons and step budgets."""

from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    RetryState,
    TimeoutError,
    TimeoutType,
)

from api.reasons import Reason
from workflows.policies import DUMP, await_ready_options, step_failure


def _activity_error(cause: BaseException) -> ActivityError:
    err = ActivityError(
        "activity failed",
        scheduled_event_id=1,
        started_event_id=2,
        identity="w",
        activity_type="dump_checkpoint",
        activity_id="1",
        retry_state=RetryState.TIMEOUT,
    )
    err.__cause__ = cause
    return err


def _reason(cause: BaseException) -> Reason:
    return step_failure(_activity_error(cause), node="gpu-1").reason


def test_schedule_to_start_timeout_means_node_lost() -> None:
    cause = TimeoutError("", type=TimeoutType.SCHEDULE_TO_START, last_heartbeat_details=[])
    failure = step_failure(_activity_error(cause), node="gpu-1")
    assert failure.reason == Reason.NODE_LOST
    assert "node gpu-1" in failure.message and "dump_checkpoint" in failure.message


def test_application_error_type_is_the_reason() -> None:
    cause = ApplicationError("dump.log: Error", type="DumpFailed", non_retryable=True)
    failure = step_failure(_activity_error(cause), node="n")
    assert (failure.reason, failure.message) == (Reason.DUMP_FAILED, "dump.log: Error")


def test_a_worker_shut_down_mid_step_means_node_lost() -> None:
    cause = ApplicationError("Worker is shutting down", type="WorkerShutdown")
    failure = step_failure(_activity_error(cause), node="gpu-1")
    assert failure.reason == Reason.NODE_LOST
    assert "node gpu-1: its node worker stopped while dump_checkpoint ran" in failure.message


def test_unknown_types_timeouts_and_cancel_map_to_reasons() -> None:
    beat = TimeoutError("", type=TimeoutType.HEARTBEAT, last_heartbeat_details=[])
    assert _reason(beat) == Reason.STEP_TIMED_OUT
    assert _reason(CancelledError("x")) == Reason.CANCELLED
    assert _reason(ApplicationError("boom", type="ValueError")) == Reason.INTERNAL
    assert _reason(RuntimeError("boom")) == Reason.INTERNAL


def test_node_steps_heartbeat() -> None:
    assert DUMP.heartbeat is not None
    ready = await_ready_options(600)
    assert ready.start_to_close.total_seconds() > 600
    assert ready.heartbeat is not None
