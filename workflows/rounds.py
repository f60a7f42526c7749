"""A round's heavy activities as runs started before "fused-round-v1" schedule them, and their settings.

Deterministic workflow code with no I/O: imported by the experiment workflow (and its sandbox).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.aggregation import AggregationActivities
    from fedloom_core.messages import (
        AggregateInput,
        EvaluateInput,
        ExperimentInput,
        ExperimentState,
        ProcessRoundOutput,
        ValidateInput,
    )
    from workflows import failures, inputs

HEAVY = dict(
    start_to_close_timeout=timedelta(hours=1),
    # The heavy activities heartbeat every 2 s from a background thread: a dead worker is noticed in 10 s.
    heartbeat_timeout=timedelta(seconds=10),
    retry_policy=failures.HEAVY_RETRY,
)


async def process_separately(
    inp: ExperimentInput, state: ExperimentState, validation: ValidateInput, set_status: Callable[[str], None]
) -> ProcessRoundOutput:
    """Validation, aggregation and evaluation as three activities, as runs started before "fused-round-v1" replay."""
    checked = await workflow.execute_activity_method(
        AggregationActivities.validate_updates, validation, task_queue=inp.aggregation_queue, **HEAVY
    )
    inputs.check_enough(validation, ProcessRoundOutput(validation=checked), inputs.min_updates(inp))
    set_status("aggregating")
    agg_started = workflow.now()
    aggregated = await workflow.execute_activity_method(
        AggregationActivities.aggregate_round,
        AggregateInput(
            experiment_id=inp.experiment_id,
            round=validation.round,
            previous=validation.global_model,
            updates=checked.accepted,
            spec=inputs.aggregation_spec(inp, state, validation.round),
        ),
        task_queue=inp.aggregation_queue,
        **HEAVY,
    )
    aggregation_time = (workflow.now() - agg_started).total_seconds()
    set_status("evaluating")
    evaluation = await workflow.execute_activity_method(
        AggregationActivities.evaluate_model,
        EvaluateInput(
            experiment_id=inp.experiment_id,
            model=aggregated.model,
            spec=inputs.evaluation_spec(inp),
            updates=checked.accepted if inp.policy.contribution_scores else [],
        ),
        task_queue=inp.aggregation_queue,
        **HEAVY,
    )
    return ProcessRoundOutput(
        validation=checked, aggregated=aggregated, evaluation=evaluation, aggregation_time=aggregation_time
    )
