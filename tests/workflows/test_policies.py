"""Pure decisions: failure reasons and step budgets."""

from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    RetryState,
    TimeoutError,
    TimeoutType,
)

from activities.contracts import VerificationObservation
from api.errors import PipelineFailedError
from api.reasons import Reason
from workflows.policies import (
    DUMP,
    VERIFY_RESTORE_SECONDS,
    await_ready_options,
    step_failure,
    verification_verdict,
)


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


def _verdict(
    seen: VerificationObservation, *, waited: float = 1.0, restored_for: float = 0.0
) -> bool | PipelineFailedError:
    return verification_verdict(
        seen,
        where="verification pod ns/p",
        version="v1",
        waited=waited,
        restored_for=restored_for,
        answer_seconds=5.0,
    )


def _failure(verdict: bool | PipelineFailedError) -> str:
    assert isinstance(verdict, PipelineFailedError), verdict
    assert verdict.reason == Reason.VERIFY_FAILED
    return verdict.message


def test_a_verification_pod_restored_and_ready_verifies_the_version() -> None:
    assert _verdict(VerificationObservation(restore_status="restored", ready=True)) is True
    # Restored, not Ready yet: read again, until the answer budget is spent.
    restored = VerificationObservation(restore_status="restored")
    assert _verdict(restored, restored_for=4.9) is False
    assert _failure(_verdict(restored, restored_for=5.0)) == (
        "version v1: verification pod ns/p was restored, but its container was not Ready "
        "within 5 s (its readiness probe did not pass)"
    )
    # Not restored yet: read again, until the standby's own deadline.
    assert _verdict(VerificationObservation(), waited=VERIFY_RESTORE_SECONDS - 1) is False
    assert "was not restored within" in _failure(
        _verdict(VerificationObservation(), waited=VERIFY_RESTORE_SECONDS)
    )


def test_a_verification_pod_that_fell_back_fails_with_its_reason() -> None:
    why = "fell-back: RestoreFailed: criu restore failed: (00.01) Error (cr-restore.c:1)"
    # Its reason is the pod's own, whatever else the pod says.
    seen = VerificationObservation(restore_status=why, ready=True, failure="container ended")
    assert _failure(_verdict(seen)) == f"version v1: verification pod ns/p was not restored: {why}"
    cold = VerificationObservation(restore_status="cold: checkpoint llama is not Ready")
    assert _failure(_verdict(cold)).endswith(
        "was not restored: cold: checkpoint llama is not Ready"
    )


def test_a_verification_pod_that_went_or_ended_fails() -> None:
    gone = VerificationObservation(failure="verification pod ns/p no longer exists")
    assert _failure(_verdict(gone)) == "version v1: verification pod ns/p no longer exists"
    ended = VerificationObservation(restore_status="restored", failure="container main ended")
    assert _failure(_verdict(ended)) == "version v1: container main ended after its restore"
