"""The workflow's activity inputs that depend only on the experiment's input: built complete, in one place."""

from __future__ import annotations

from datetime import datetime

from temporalio.exceptions import ApplicationError

from fedloom_core.messages import (
    INSUFFICIENT_CLIENTS,
    AggregationSpec,
    CompleteRoundInput,
    EvaluationSpec,
    ExperimentInput,
    ExperimentState,
    ModelRef,
    OpenEvaluationInput,
    OpenRoundInput,
    ProcessRoundOutput,
    SelectClientsInput,
    Selection,
    ValidateInput,
)
from fedloom_core.schemas import central_evaluation


def aggregation_spec(inp: ExperimentInput, state: ExperimentState, rnd: int) -> AggregationSpec:
    """The round's strategy, its parameters, the state left by the last round and the round's seed."""
    exp, agg = inp.config.experiment_config, inp.config.aggregation_config
    return AggregationSpec(
        strategy=agg.strategy,
        params=agg.params,
        weighted=agg.weighted,
        state_key=state.strategy_state_key,
        seed=exp.seed * 1_000_003 + rnd,
    )


def evaluation_spec(inp: ExperimentInput) -> EvaluationSpec:
    """The built-in model and dataset the server evaluates each new global model on."""
    exp = inp.config.experiment_config
    return EvaluationSpec(
        dataset=exp.dataset,
        architecture=exp.model_architecture,
        input_shape=inp.input_shape,
        num_classes=inp.num_classes,
        weighted=inp.config.aggregation_config.weighted,
        central=central_evaluation(inp.config),
    )


def min_updates(inp: ExperimentInput) -> int:
    """Fewest accepted updates a round may aggregate."""
    return inp.config.aggregation_config.min_updates or inp.config.experiment_config.min_clients


def check_enough(validation: ValidateInput, done: ProcessRoundOutput, min_updates: int, bounded: bool = False) -> None:
    """Fail the experiment when the round accepted fewer than ``min_updates`` updates.

    ``bounded``: the run asked process_round for counts ("bounded-round-v1"); a result without them
    came from an aggregation worker older than that, which cannot read the updates itself.
    """
    if bounded and done.received is None:
        raise ApplicationError(
            "process_round ran on an aggregation worker that predates bounded-round-v1; upgrade it",
            type="AGGREGATION_WORKER_OUTDATED",
            non_retryable=True,
        )
    counted = done.received is not None  # runs with "bounded-round-v1" carry counts, not the updates
    accepted = done.accepted_count if counted else len(done.validation.accepted)
    received = done.received if counted else len(validation.updates)
    if accepted < min_updates:
        raise ApplicationError(
            f"round {validation.round} closed with {accepted} accepted update(s) of "
            f"{received} received, fewer than min_updates={min_updates}",
            type=INSUFFICIENT_CLIENTS,
            non_retryable=True,
        )


def select_clients(inp: ExperimentInput, rnd: int, round_started: datetime) -> SelectClientsInput:
    """Who may take part in round ``rnd``, judged at the workflow's clock."""
    return SelectClientsInput.for_round(
        inp.experiment_id,
        inp.config,
        inp.policy,
        round=rnd,
        hour_utc=round_started.hour,
        weekday=round_started.weekday(),
        timeout_s=inp.selection_timeout_s,
    )


def open_round(inp: ExperimentInput, rnd: int, selection: Selection, model: ModelRef) -> OpenRoundInput:
    """The round as it opens for uploads: its clients, why others were left out, and its global model."""
    agg = inp.config.aggregation_config
    return OpenRoundInput(
        experiment_id=inp.experiment_id,
        round=rnd,
        selected=list(selection.selected),
        excluded=selection.excluded,
        policy_results=selection.policy_results,
        round_config=selection.round_config,
        details_key=selection.details_key,
        global_model=model,
        deadline_s=inp.round_timeout_s,
        strategy=agg.strategy,
        params=agg.params,
    )


def open_evaluation(inp: ExperimentInput, rnd: int, done: ProcessRoundOutput) -> OpenEvaluationInput:
    """The round's federated evaluation phase: its new model, asked of a fraction of its accepted participants."""
    assert done.aggregated is not None and done.evaluation is not None
    return OpenEvaluationInput(
        experiment_id=inp.experiment_id,
        round=rnd,
        model=done.aggregated.model,
        participants=[u.client_id for u in done.validation.accepted],  # empty with an outcome_key
        outcome_key=done.outcome_key,
        fraction=inp.config.evaluation_config.fraction,
        timeout_s=inp.config.evaluation_config.timeout_s,
        seed=inp.config.experiment_config.seed,
        accuracy=done.evaluation.accuracy,
        loss=done.evaluation.loss,
    )


def complete_round(
    inp: ExperimentInput,
    rnd: int,
    selected: list[str],
    done: ProcessRoundOutput,
    duration: float,
    federated_metrics: dict[str, int | float | None] | None = None,
) -> CompleteRoundInput:
    """What the round produced, for the database: model, evaluation, accepted and rejected updates, scores."""
    assert done.aggregated is not None and done.evaluation is not None
    return CompleteRoundInput(
        experiment_id=inp.experiment_id,
        round=rnd,
        total_rounds=inp.config.experiment_config.rounds,
        model=done.aggregated.model,
        evaluation=done.evaluation,
        updates=done.validation.accepted,
        round_duration=duration,
        aggregation_time=done.aggregation_time,
        # With an outcome_key (bounded runs) the activity reads the per-client parts from the blob store.
        selected=[] if done.outcome_key else selected,
        rejected=done.validation.rejected,
        stats=done.validation.stats,
        strategy_info=done.aggregated.info,
        policy=inp.policy,
        federated_metrics=federated_metrics,
        outcome_key=done.outcome_key,
    )
