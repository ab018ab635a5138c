"""Pure decisions: failure reasons and step budgets."""

from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    RetryState,
    TimeoutError,
    TimeoutType,
)

from workflows.policies import DUMP, NODE_SCHEDULE_TO_START, await_ready_options, failure_reason


def _activity_error(cause: BaseException) -> ActivityError:
    err = ActivityError(
        "activity failed", scheduled_event_id=1, started_event_id=2, identity="w",
        activity_type="dump_checkpoint", activity_id="1", retry_state=RetryState.TIMEOUT,
    )  # fmt: skip
    err.__cause__ = cause
    return err


def test_schedule_to_start_timeout_means_node_lost() -> None:
    cause = TimeoutError("", type=TimeoutType.SCHEDULE_TO_START, last_heartbeat_details=[])
    reason, message = failure_reason(_activity_error(cause))
    assert reason == "NodeLost"
    assert "node worker" in message


def test_application_error_type_is_the_reason() -> None:
    cause = ApplicationError("dump.log: Error", type="DumpFailed", non_retryable=True)
    assert failure_reason(_activity_error(cause)) == ("DumpFailed", "dump.log: Error")


def test_heartbeat_timeout_and_cancel() -> None:
    beat = TimeoutError("", type=TimeoutType.HEARTBEAT, last_heartbeat_details=[])
    assert failure_reason(_activity_error(beat))[0] == "Timeout"
    assert failure_reason(_activity_error(CancelledError("x")))[0] == "Cancelled"


def test_node_steps_detect_a_lost_node() -> None:
    assert DUMP.schedule_to_start == NODE_SCHEDULE_TO_START
    assert DUMP.heartbeat is not None
    ready = await_ready_options(600)
    assert ready.start_to_close.total_seconds() > 600
    assert ready.heartbeat is not None
