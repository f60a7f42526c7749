"""ExperimentWorkflow: one durable workflow per experiment, orchestrating its rounds.

Deterministic orchestration only: every read or write of the database, the blob store or a
model happens in an activity. Weights never pass through Temporal; the workflow carries
``ModelRef`` references to blobs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    # Loaded once, outside the sandbox: the message classes must be the ones the converter knows.
    from activities.aggregation import AggregationActivities
    from activities.experiment import ExperimentActivities
    from fedloom_core.messages import (
        INSUFFICIENT_CLIENTS,
        ROUND_DENIED,
        EvaluationNotice,
        ExperimentInput,
        ExperimentResult,
        ExperimentState,
        FederatedResult,
        FinishInput,
        InitInput,
        ModelRef,
        ProcessRoundInput,
        ProcessRoundOutput,
        RoundRef,
        Selection,
        UpdateNotice,
        UpdateRef,
        ValidateInput,
    )
    from fedloom_core.schemas import federated_evaluation
    from fedloom_core.temporal import BEST_ACCURACY, CURRENT_ROUND, EXPERIMENT_ID, EXPERIMENT_STATUS, STRATEGY
    from workflows import failures, inputs, rounds

WORKFLOW_NAME = "ExperimentWorkflow"
# Histories recorded before the workflow kept its search attributes up to date replay without them.
SEARCH_ATTRIBUTES_PATCH = "search-attributes-v1"
# Histories recorded before the short database steps ran as local activities replay with them as
# normal activities (each of which cost a round trip through the Temporal server and a task queue).
LOCAL_STEPS_PATCH = "local-steps-v1"
# Histories recorded before a round's validation, aggregation and evaluation ran as one activity
# (process_round) replay with the three activities they scheduled.
FUSED_ROUND_PATCH = "fused-round-v1"
# Runs started before rounds had a federated evaluation phase replay without it.
FEDERATED_EVALUATION_PATCH = "federated-evaluation-v1"
# Runs started before the BestAccuracy search attribute existed replay without upserting it.
BEST_ACCURACY_PATCH = "best-accuracy-v1"
# Runs started before a round's per-client outcome moved to the blob store replay with it in their
# history (close_round's update refs, process_round's verdicts and scores, complete_round's input).
BOUNDED_ROUND_PATCH = "bounded-round-v1"

# The database steps, as local activities on new runs and as normal activities on older ones.
_DB_STEP = dict(
    start_to_close_timeout=timedelta(seconds=60),
    retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=5)),
)


def workflow_id(experiment_id: str) -> str:
    """The business id of an experiment's workflow."""
    return f"experiment-{experiment_id}"


@workflow.defn(name=WORKFLOW_NAME)
class ExperimentWorkflow:
    def __init__(self) -> None:
        self._status = "starting"
        self._round = 0
        self._total_rounds = 0
        self._selected: list[str] = []
        self._reported: set[str] = set()
        self._stop_reason: str | None = None
        self._last: dict[str, float] = {}
        self._global_model_id: str | None = None
        self._local_steps = False
        self._fused_round = False
        self._best_accuracy = False
        self._bounded = False
        self._evaluators: list[str] = []
        self._evaluated: set[str] = set()

    @workflow.run
    async def run(self, inp: ExperimentInput) -> ExperimentResult:
        state = inp.state
        self._total_rounds = inp.config.experiment_config.rounds
        # Decided once per run, before the first command, so a run takes one path throughout.
        self._local_steps = workflow.patched(LOCAL_STEPS_PATCH)
        self._fused_round = workflow.patched(FUSED_ROUND_PATCH)
        self._best_accuracy = workflow.patched(BEST_ACCURACY_PATCH)
        self._bounded = workflow.patched(BOUNDED_ROUND_PATCH)
        try:
            if state.global_model is None:
                state.global_model = await self._init_model(inp)
            self._global_model_id = state.global_model.model_id
            self._status = "running"
            self._publish(inp, "running", state.next_round - 1, strategy=True)
            await self._run_rounds(inp, state)
            self._status = "completed"
            self._publish(inp, "completed", state.next_round - 1)
            await self._finish(inp, "completed", state.next_round - 1, state.global_model)
            return self._result(inp, state, "completed")
        except (asyncio.CancelledError, ActivityError, ApplicationError) as exc:
            if not is_cancelled_exception(exc):
                await self._fail(inp, state.next_round - 1, state.global_model, *failures.failure_reason(exc))
                raise
            self._status = "stopped"
            self._publish(inp, "stopped", self._round)
            reason = self._stop_reason or "cancelled"
            await self._finish(inp, "stopped", state.next_round - 1, state.global_model, reason=reason)
            return self._result(inp, state, "stopped", reason)
        except Exception as exc:
            # A bug in workflow code: the experiment fails with it (the worker fails the workflow, see
            # workers/main.py), instead of Temporal retrying the workflow task forever.
            if not isinstance(exc, workflow.NondeterminismError):  # replay is broken: the watchdog records it
                await self._fail(inp, state.next_round - 1, state.global_model, *failures.failure_reason(exc))
            raise

    def _result(self, inp: ExperimentInput, state: ExperimentState, status: str, reason: str | None = None):  # type: ignore[no-untyped-def]
        return ExperimentResult(
            experiment_id=inp.experiment_id,
            status=status,
            rounds_completed=state.next_round - 1,
            final_model_id=state.global_model.model_id if state.global_model else None,
            final_accuracy=self._last.get("accuracy"),
            reason=reason,
        )

    async def _init_model(self, inp: ExperimentInput) -> ModelRef:
        exp = inp.config.experiment_config
        return await self._db_step(
            ExperimentActivities.init_experiment,
            InitInput(
                experiment_id=inp.experiment_id,
                architecture=exp.model_architecture,
                input_shape=inp.input_shape,
                num_classes=inp.num_classes,
                seed=exp.seed,
            ),
        )

    async def _run_rounds(self, inp: ExperimentInput, state: ExperimentState) -> None:
        """Run the remaining rounds, continuing as new when the history grows long or every N rounds."""
        total = inp.config.experiment_config.rounds
        first_round = state.next_round
        for rnd in range(state.next_round, total + 1):
            started = workflow.now()
            self._publish(inp, "running", rnd)
            state.global_model = await self._run_round(inp, rnd, state)
            self._global_model_id = state.global_model.model_id
            state.round_durations = [*state.round_durations, (workflow.now() - started).total_seconds()][-100:]
            state.next_round = rnd + 1
            every = inp.continue_as_new_every
            if rnd < total and (
                workflow.info().is_continue_as_new_suggested() or (every is not None and rnd - first_round + 1 >= every)
            ):
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(inp.model_copy(update={"state": state}))

    async def _run_round(self, inp: ExperimentInput, rnd: int, state: ExperimentState) -> ModelRef:
        model = state.global_model
        assert model is not None
        self._round, self._selected, self._reported = rnd, [], set()
        self._status = "selecting"
        round_started = workflow.now()
        selection = await self._select(inp, rnd, round_started)
        self._selected = list(selection.selected)
        await self._db_step(ExperimentActivities.open_round, inputs.open_round(inp, rnd, selection, model))
        self._status = "waiting_for_updates"
        try:
            await workflow.wait_condition(
                lambda: self._reported >= set(self._selected), timeout=timedelta(seconds=inp.round_timeout_s)
            )
        except TimeoutError:
            pass
        # The database is the record of what was accepted; signals only wake us early.
        self._status = "validating"
        ref = RoundRef(experiment_id=inp.experiment_id, round=rnd)
        if self._bounded:  # a count; process_round reads the round's updates from the database itself
            await self._db_step(ExperimentActivities.close_round_bounded, ref)
            received: list[UpdateRef] = []
        else:
            received = await self._db_step(ExperimentActivities.close_round, ref)
        validation = ValidateInput(
            experiment_id=inp.experiment_id,
            round=rnd,
            global_model=model,
            updates=received,
            policy=inp.policy,
            hour_utc=round_started.hour,
            weekday=round_started.weekday(),
        )
        if self._fused_round:
            done = await self._process_fused(inp, state, validation)
        else:
            done = await rounds.process_separately(inp, state, validation, self._set_status)
        state.strategy_state_key = done.aggregated.state_key
        self._last = {"accuracy": done.evaluation.accuracy, "loss": done.evaluation.loss}
        federated = await self._federated_evaluation(inp, rnd, done)
        self._publish_best()
        duration = (workflow.now() - round_started).total_seconds()
        await self._db_step(
            ExperimentActivities.complete_round,
            inputs.complete_round(inp, rnd, self._selected, done, duration, federated),
        )
        return done.aggregated.model

    async def _process_fused(
        self, inp: ExperimentInput, state: ExperimentState, validation: ValidateInput
    ) -> ProcessRoundOutput:
        """Validation, aggregation and evaluation in one activity on the aggregation queue."""
        self._status = "aggregating"
        done: ProcessRoundOutput = await workflow.execute_activity_method(
            AggregationActivities.process_round,
            ProcessRoundInput(
                validation=validation,
                aggregation=inputs.aggregation_spec(inp, state, validation.round),
                evaluation=inputs.evaluation_spec(inp),
                min_updates=inputs.min_updates(inp),
                bounded=self._bounded,
            ),
            task_queue=inp.aggregation_queue,
            **rounds.HEAVY,
        )
        inputs.check_enough(validation, done, inputs.min_updates(inp), self._bounded)
        return done

    def _set_status(self, status: str) -> None:
        self._status = status

    async def _federated_evaluation(
        self, inp: ExperimentInput, rnd: int, done: ProcessRoundOutput
    ) -> dict[str, int | float | None] | None:
        """Clients evaluate the round's new model on their data; returns their reports averaged by data_samples.

        Only when the experiment asks for it, and only on runs started after "federated-evaluation-v1".
        """
        if not federated_evaluation(inp.config) or not workflow.patched(FEDERATED_EVALUATION_PATCH):
            return None
        self._status = "evaluating_federated"
        # Reset before the phase opens: the last evaluator's signal may arrive with the activity's result.
        self._evaluators, self._evaluated = [], set()
        self._evaluators = await self._db_step(
            ExperimentActivities.open_evaluation, inputs.open_evaluation(inp, rnd, done)
        )
        if self._evaluators:
            try:
                await workflow.wait_condition(
                    lambda: self._evaluated >= set(self._evaluators),
                    timeout=timedelta(seconds=inp.config.evaluation_config.timeout_s),
                )
            except TimeoutError:
                pass
        # The database holds the reports; the signal only ends the wait early.
        result: FederatedResult = await self._db_step(
            ExperimentActivities.close_evaluation, RoundRef(experiment_id=inp.experiment_id, round=rnd)
        )
        if result.metrics is not None:
            self._last["federated_accuracy"] = result.metrics.get("accuracy")  # type: ignore[assignment]
            self._last["federated_loss"] = result.metrics.get("loss")  # type: ignore[assignment]
        return result.metrics

    async def _finish(
        self,
        inp: ExperimentInput,
        status: str,
        rounds_done: int,
        model: ModelRef | None,
        reason: str | None = None,
        error_code: str | None = None,
    ) -> None:
        await self._db_step(
            ExperimentActivities.finish_experiment,
            FinishInput(
                experiment_id=inp.experiment_id,
                status=status,
                rounds_completed=rounds_done,
                final_model_id=model.model_id if model else None,
                reason=reason,
                error_code=error_code,
            ),
        )

    async def _db_step(self, step: Callable[[Any, Any], Any], arg: object) -> Any:
        """Run a short, idempotent database step: a local activity on new runs (no round trip through the
        server's task queue), a normal activity on runs started before "local-steps-v1"."""
        if self._local_steps:
            return await workflow.execute_local_activity_method(step, arg, **_DB_STEP)
        return await workflow.execute_activity_method(step, arg, **_DB_STEP)

    async def _select(self, inp: ExperimentInput, rnd: int, round_started: datetime) -> Selection:
        """The round's clients; new runs first try a quick local selection, then wait in a normal activity.

        The waiting selection polls and heartbeats for up to the selection timeout, which suits a
        normal activity; but usually enough clients are eligible at once, and a local activity with
        no wait (``timeout_s=0``) answers without the round trip. Only when it finds too few, or the
        round is held by round_control rules, does the waiting activity run.
        """
        request = inputs.select_clients(inp, rnd, round_started)
        if self._local_steps:
            try:
                return await workflow.execute_local_activity_method(
                    ExperimentActivities.select_clients,
                    request.model_copy(update={"timeout_s": 0.0}),
                    start_to_close_timeout=timedelta(seconds=60),
                    retry_policy=RetryPolicy(
                        maximum_interval=timedelta(seconds=5),
                        non_retryable_error_types=[INSUFFICIENT_CLIENTS, ROUND_DENIED],
                    ),
                )
            except (ActivityError, ApplicationError) as exc:
                # A local activity's failure can arrive as the ApplicationError itself, unwrapped.
                cause = exc.cause if isinstance(exc, ActivityError) else exc
                if not (isinstance(cause, ApplicationError) and cause.type in (INSUFFICIENT_CLIENTS, ROUND_DENIED)):
                    raise
        try:
            return await workflow.execute_activity_method(
                ExperimentActivities.select_clients,
                request,
                start_to_close_timeout=timedelta(seconds=inp.selection_timeout_s + 60),
                heartbeat_timeout=timedelta(seconds=20),
                retry_policy=RetryPolicy(
                    maximum_interval=timedelta(seconds=5),
                    non_retryable_error_types=[INSUFFICIENT_CLIENTS, ROUND_DENIED],
                ),
            )
        except ActivityError as exc:
            cause = exc.cause
            if isinstance(cause, ApplicationError) and cause.type in (INSUFFICIENT_CLIENTS, ROUND_DENIED):
                raise ApplicationError(cause.message, type=cause.type, non_retryable=True) from None
            raise

    async def _fail(
        self, inp: ExperimentInput, rounds_done: int, model: ModelRef | None, code: str, message: str
    ) -> None:
        self._status = "failed"
        self._publish(inp, "failed", self._round)
        await self._finish(inp, "failed", rounds_done, model, reason=message, error_code=code)

    def _publish(self, inp: ExperimentInput, status: str, current_round: int, strategy: bool = False) -> None:
        """Keep the Web UI's search attributes (ExperimentStatus, CurrentRound, ...) current."""
        if not workflow.patched(SEARCH_ATTRIBUTES_PATCH):
            return
        updates = [EXPERIMENT_STATUS.value_set(status), CURRENT_ROUND.value_set(current_round)]
        if strategy:
            updates += [
                EXPERIMENT_ID.value_set(inp.experiment_id),
                STRATEGY.value_set(inp.config.aggregation_config.strategy),
            ]
        workflow.upsert_search_attributes(updates)

    def _publish_best(self) -> None:
        """Raise the BestAccuracy search attribute when the round's accuracy (central, else federated) beats it."""
        accuracy = self._last.get("accuracy")
        if accuracy is None:
            accuracy = self._last.get("federated_accuracy")
        # Search attributes survive continue-as-new, so the best so far is read back from them.
        best = workflow.info().typed_search_attributes.get(BEST_ACCURACY)
        if not self._best_accuracy or accuracy is None or (best is not None and accuracy <= best):
            return
        workflow.upsert_search_attributes([BEST_ACCURACY.value_set(float(accuracy))])

    @workflow.signal
    def update_received(self, notice: UpdateNotice) -> None:
        """An upload for this experiment was stored and recorded."""
        if notice.round == self._round:
            self._reported.update(notice.reported or [notice.client_id])

    @workflow.signal
    def evaluation_received(self, notice: EvaluationNotice) -> None:
        """Every evaluator of the round has reported (the API sends this from the last report)."""
        if notice.round == self._round:
            self._evaluated.update(notice.reported or [notice.client_id])

    @workflow.signal
    def request_stop(self, reason: str) -> None:
        """Record why the experiment is being stopped; the cancellation that follows ends it."""
        self._stop_reason = reason

    @workflow.query
    def status(self) -> dict:
        """Where the experiment stands now."""
        return {
            "status": self._status,
            "current_round": self._round,
            "total_rounds": self._total_rounds,
            "selected_clients": list(self._selected),
            "reported_clients": sorted(self._reported),
            "global_model_id": self._global_model_id,
            "last_metrics": dict(self._last),
            "stop_reason": self._stop_reason,
        }
