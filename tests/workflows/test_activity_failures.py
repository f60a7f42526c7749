"""Heavy activities retry a bounded number of times, and a permanent failure ends the experiment at once
with its reason, instead of the round stalling while Temporal retries forever."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.exceptions import ActivityError, ApplicationError, RetryState
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor

from fedloom_core.storage.db import Experiment
from fedloom_core.storage.repo import session_scope
from tests.workflows.harness import SimClient, run_experiment
from workflows import failures


class FailProcessRound(Interceptor):
    """Makes the round's ``process_round`` raise ``error`` on its first ``times`` attempts."""

    def __init__(self, error: type[Exception], times: int) -> None:
        self.error, self.times, self.attempts = error, times, 0

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        fault = self

        class Failing(ActivityInboundInterceptor):
            async def execute_activity(self, input: ExecuteActivityInput) -> Any:
                if activity.info().activity_type == "process_round":
                    fault.attempts += 1
                    if activity.info().attempt <= fault.times:
                        raise fault.error("injected: this round's updates cannot be aggregated")
                return await super().execute_activity(input)

        return Failing(next)


async def _run(env: WorkflowEnvironment, tmp: Path, fault: FailProcessRound) -> tuple[str, Experiment]:
    clients = [SimClient(f"af{i}", i) for i in range(2)]
    out = await run_experiment(env, tmp, clients, rounds=1, architecture="MLP", interceptors=[fault])
    with session_scope(out.engine) as s:
        exp = s.get(Experiment, out.experiment_id)
        assert exp is not None
        s.expunge(exp)
    return out.status, exp


async def test_a_permanent_failure_fails_the_experiment_at_once_with_its_reason(
    time_skipping_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    fault = FailProcessRound(ValueError, times=100)
    status, exp = await _run(time_skipping_env, tmp_path, fault)
    assert status == "failed" and exp.status == "failed"
    assert fault.attempts == 1, "a permanent error was retried"
    assert exp.error_code == "INTERNAL_ERROR"
    assert exp.error == "process_round failed: ValueError: injected: this round's updates cannot be aggregated"


async def test_a_transient_failure_is_retried_and_the_round_completes(
    time_skipping_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    fault = FailProcessRound(RuntimeError, times=2)
    status, exp = await _run(time_skipping_env, tmp_path, fault)
    assert status == "completed" and exp.status == "completed"
    assert fault.attempts == 3


def test_heavy_retries_are_bounded_and_skip_permanent_errors() -> None:
    policy = failures.HEAVY_RETRY
    assert policy.maximum_attempts == failures.HEAVY_MAX_ATTEMPTS and 1 < policy.maximum_attempts <= 30
    assert {"ValueError", "WeightsFormatError", "AGGREGATION_FAILED"} <= set(policy.non_retryable_error_types or [])
    assert "RuntimeError" not in (policy.non_retryable_error_types or []), "a transient error must be retried"


def test_failure_reasons_name_the_activity_and_the_cause() -> None:
    def activity_error(cause: BaseException) -> ActivityError:
        err = ActivityError(
            "Activity task failed",
            scheduled_event_id=5,
            started_event_id=6,
            identity="w",
            activity_type="aggregate_round",
            activity_id="1",
            retry_state=RetryState.NON_RETRYABLE_FAILURE,
        )
        err.__cause__ = cause
        return err

    coded = ApplicationError("bad params", type="AGGREGATION_FAILED", non_retryable=True)
    assert failures.failure_reason(activity_error(coded)) == (
        "AGGREGATION_FAILED",
        "aggregate_round failed: AGGREGATION_FAILED: bad params",
    )
    python = ApplicationError("shape mismatch", type="ValueError")
    assert failures.failure_reason(activity_error(python)) == (
        "INTERNAL_ERROR",
        "aggregate_round failed: ValueError: shape mismatch",
    )
    assert failures.failure_reason(ApplicationError("too few", type="INSUFFICIENT_CLIENTS")) == (
        "INSUFFICIENT_CLIENTS",
        "too few",
    )
    code, reason = failures.failure_reason(KeyError("round"))
    assert code == "WORKFLOW_ERROR" and reason.startswith("KeyError in workflow code")
    assert len(failures.failure_reason(RuntimeError("x" * 5000))[1]) == failures.REASON_MAX_CHARS
