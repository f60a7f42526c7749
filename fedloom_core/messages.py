"""Workflow and activity messages: what travels through Temporal (references, never weights). Imports no torch."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from fedloom_core.schemas import PolicyConfig, StartRequest

# Task queues: the workflow and light activities on one; aggregation and evaluation on another,
# so they can run on bigger machines.
WORKFLOW_TASK_QUEUE = "fedloom-experiments"
AGGREGATION_TASK_QUEUE = "fedloom-aggregation"

# Failure types that end an experiment without retrying, raised by activities and the workflow.
INSUFFICIENT_CLIENTS = "INSUFFICIENT_CLIENTS"
ROUND_DENIED = "ROUND_DENIED"


class ModelRef(BaseModel):
    """A global model stored in the blob store; the workflow carries this, never the weights."""

    model_id: str
    blob_key: str
    sha256: str
    round: int
    size_bytes: int = 0
    parameters_count: int = 0


class ExperimentState(BaseModel):
    """What the workflow carries across continue-as-new."""

    next_round: int = 1
    global_model: ModelRef | None = None
    # Blob key of the strategy's server state (e.g. FedAdam's moments) after the last round.
    strategy_state_key: str | None = None
    round_durations: list[float] = Field(default_factory=list)


class ExperimentInput(BaseModel):
    experiment_id: str
    config: StartRequest
    input_shape: list[int]
    num_classes: int
    round_timeout_s: float
    selection_timeout_s: float
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    # Continue-as-new after this many rounds in one run (also whenever Temporal suggests it).
    continue_as_new_every: int | None = Field(default=None, ge=1)
    # Where aggregation and evaluation run; tests give each run its own queue.
    aggregation_queue: str = AGGREGATION_TASK_QUEUE
    state: ExperimentState = Field(default_factory=ExperimentState)


class ExperimentResult(BaseModel):
    experiment_id: str
    status: str
    rounds_completed: int
    final_model_id: str | None = None
    final_accuracy: float | None = None
    reason: str | None = None


class SelectClientsInput(BaseModel):
    experiment_id: str
    round: int
    min_clients: int
    client_fraction: float
    seed: int
    timeout_s: float
    trust_threshold: float | None = None
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    hour_utc: int = 0
    weekday: int = 0

    @classmethod
    def for_round(
        cls,
        experiment_id: str,
        config: StartRequest,
        policy: PolicyConfig,
        *,
        round: int,
        hour_utc: int,
        weekday: int,
        timeout_s: float = 0.0,
    ) -> SelectClientsInput:
        """The selection of ``round`` of an experiment with this start config and policy, judged at that hour
        (the workflow's round and ``GET /clients/select``'s dry run both build it here)."""
        exp = config.experiment_config
        return cls(
            experiment_id=experiment_id,
            round=round,
            min_clients=exp.min_clients,
            client_fraction=exp.client_fraction,
            seed=exp.seed,
            timeout_s=timeout_s,
            trust_threshold=policy.trust_threshold,
            policy=policy,
            hour_utc=hour_utc,
            weekday=weekday,
        )


class Selection(BaseModel):
    """A round's selection as the workflow carries it: bounded by the round's size, not the registry's.

    The per-client exclusions and policy results are stored under ``details_key`` in the blob store
    (see ``fedloom_core.storage.candidates``); ``excluded`` and ``policy_results`` are filled only in
    results recorded before that, which replay as they were.
    """

    selected: list[str]
    excluded: dict[str, str] = Field(default_factory=dict)
    policy_results: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Training settings that round_control configure rules set for every client of the round.
    round_config: dict[str, Any] = Field(default_factory=dict)
    # How many clients were left out, by kind of reason (a bounded number of kinds).
    exclusion_counts: dict[str, int] = Field(default_factory=dict)
    details_key: str | None = None


class OpenRoundInput(BaseModel):
    experiment_id: str
    round: int
    selected: list[str]
    excluded: dict[str, str] = Field(default_factory=dict)
    policy_results: dict[str, dict[str, Any]] = Field(default_factory=dict)
    round_config: dict[str, Any] = Field(default_factory=dict)
    # Blob holding the exclusions and policy results when the selection stored them there.
    details_key: str | None = None
    global_model: ModelRef
    deadline_s: float
    strategy: str = "FedAvg"
    params: dict[str, Any] = Field(default_factory=dict)


class UpdateNotice(BaseModel):
    """Sent to the workflow when an upload has been stored and recorded.

    The API sends it once a round has an update from every selected client, with all of them in
    ``reported``; a notice without ``reported`` (older senders, the tests' harness) reports
    ``client_id`` alone.
    """

    update_id: str
    client_id: str
    round: int
    reported: list[str] = Field(default_factory=list)


class RoundRef(BaseModel):
    experiment_id: str
    round: int


class RoundClosed(BaseModel):
    """A round closed for uploads (runs with "bounded-round-v1"): how many updates it received, not which."""

    received: int


class UpdateRef(BaseModel):
    update_id: str
    client_id: str
    blob_key: str
    num_samples: int


class AggregationSpec(BaseModel):
    """How an experiment aggregates: its strategy, parameters and server state."""

    strategy: str = "FedAvg"
    params: dict[str, Any] = Field(default_factory=dict)
    weighted: bool = True
    # Blob key of the strategy's server state after the previous round (FedAdam's moments, ...).
    state_key: str | None = None
    seed: int = 0


class AggregateInput(BaseModel):
    experiment_id: str
    round: int
    previous: ModelRef
    updates: list[UpdateRef]
    spec: AggregationSpec


class AggregateOutput(BaseModel):
    model: ModelRef
    state_key: str | None = None
    info: dict[str, Any] = Field(default_factory=dict)


class ValidateInput(BaseModel):
    experiment_id: str
    round: int
    global_model: ModelRef
    updates: list[UpdateRef]
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    hour_utc: int = 0
    weekday: int = 0


class ValidationOutcome(BaseModel):
    accepted: list[UpdateRef]
    # client id -> why its update was left out
    rejected: dict[str, str] = Field(default_factory=dict)
    # client id -> {update_norm, norm_ratio, cosine_similarity, anomaly}
    stats: dict[str, dict[str, float]] = Field(default_factory=dict)


class EvaluationSpec(BaseModel):
    """How a round's new model is evaluated on the server: the built-in model and dataset."""

    dataset: str
    architecture: str
    input_shape: list[int]
    num_classes: int
    weighted: bool = True
    # False when the server has no test data for the model (a custom model, or switched off).
    central: bool = True


class EvaluateInput(BaseModel):
    experiment_id: str
    model: ModelRef
    spec: EvaluationSpec
    # With two or more: the leave-one-out contribution of each of these (accepted) updates.
    updates: list[UpdateRef] = Field(default_factory=list)


class Evaluation(BaseModel):
    # None when the server did not evaluate the model (no central evaluation).
    accuracy: float | None
    # None when the model's loss is not finite (a diverged or poisoned model).
    loss: float | None
    evaluation_time: float
    # client id -> loss without its update minus loss with all (leave-one-out FedAvg).
    loo_loss_deltas: dict[str, float] = Field(default_factory=dict)
    # Without central evaluation: client id -> its share of the round's progress (trust.progress_shares).
    progress_shares: dict[str, float] = Field(default_factory=dict)


class ProcessRoundInput(BaseModel):
    """A round's heavy work in one activity: validate the received updates, aggregate the accepted ones
    and evaluate the new model (with leave-one-out scores when the policy asks for contribution scores)."""

    validation: ValidateInput
    aggregation: AggregationSpec
    evaluation: EvaluationSpec
    min_updates: int
    # Runs with "bounded-round-v1": the activity reads the round's updates from the database (the
    # validation carries none) and stores the per-client outcome in the blob store (``outcome_key``).
    bounded: bool = False


class ProcessRoundOutput(BaseModel):
    validation: ValidationOutcome
    # Both None when fewer than min_updates updates were accepted: the workflow fails the round.
    aggregated: AggregateOutput | None = None
    evaluation: Evaluation | None = None
    # Seconds spent aggregating, inside the activity.
    aggregation_time: float = 0.0
    # Bounded results (``ProcessRoundInput.bounded``): the validation, the evaluation and the strategy's
    # info then carry no per-client data; counts summarise the round and the blob under ``outcome_key``
    # (``fedloom_core.storage.round_outcomes``) holds the accepted updates, verdicts and scores.
    received: int | None = None
    accepted_count: int = 0
    # How many updates were rejected, by kind of reason (a bounded number of kinds).
    rejection_counts: dict[str, int] = Field(default_factory=dict)
    outcome_key: str | None = None


class CompleteRoundInput(BaseModel):
    experiment_id: str
    round: int
    total_rounds: int
    model: ModelRef
    evaluation: Evaluation
    updates: list[UpdateRef]
    round_duration: float
    aggregation_time: float
    selected: list[str] = Field(default_factory=list)
    rejected: dict[str, str] = Field(default_factory=dict)
    stats: dict[str, dict[str, float]] = Field(default_factory=dict)
    strategy_info: dict[str, Any] = Field(default_factory=dict)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    # The clients' evaluation of the new model averaged by data_samples; None without federated evaluation.
    federated_metrics: dict[str, int | float | None] | None = None
    # Runs with "bounded-round-v1": updates, rejected, stats, strategy_info and the evaluation's
    # per-client scores are read from this blob (``fedloom_core.storage.round_outcomes``), not carried.
    outcome_key: str | None = None


class OpenEvaluationInput(BaseModel):
    """A round's federated evaluation phase as it opens: the model to evaluate and whom to ask."""

    experiment_id: str
    round: int
    model: ModelRef
    # The round's accepted participants, of which a seeded fraction is asked.
    participants: list[str]
    fraction: float = 1.0
    seed: int = 0
    # How long the phase waits for reports (its deadline is recorded for the evaluate tasks).
    timeout_s: float = 60.0
    # The server's own evaluation of the model (None without central evaluation), kept with the model.
    accuracy: float | None = None
    loss: float | None = None
    # Runs with "bounded-round-v1": the participants are the accepted updates' clients in this blob.
    outcome_key: str | None = None


class EvaluationNotice(BaseModel):
    """Sent to the workflow once every evaluator of the round has reported (``reported`` names them)."""

    client_id: str
    round: int
    reported: list[str] = Field(default_factory=list)


class FederatedResult(BaseModel):
    """The closed evaluation phase: the averaged metrics (None when no report had samples) and the report count."""

    metrics: dict[str, int | float | None] | None = None
    reports: int = 0


class InitInput(BaseModel):
    experiment_id: str
    architecture: str
    input_shape: list[int]
    num_classes: int
    seed: int


class FinishInput(BaseModel):
    experiment_id: str
    status: str
    rounds_completed: int
    final_model_id: str | None = None
    reason: str | None = None
    error_code: str | None = None
