"""Data types shared by the API, the workflow and its activities. Imports neither torch nor I/O."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer

KNOWN_DATASETS = ("digits", "mnist", "cifar10", "synthetic")
DATASET_ALIASES = {
    "digits": "digits",
    "cifar-10": "cifar10",
    "cifar10": "cifar10",
    "mnist": "mnist",
    "synthetic": "synthetic",
}
KNOWN_ARCHITECTURES = ("CNN", "MLP")
KNOWN_STRATEGIES = (
    "FedAvg",
    "FedProx",
    "FedAvgM",
    "FedAdam",
    "FedYogi",
    "FedAdagrad",
    "FedMedian",
    "FedTrimmedAvg",
    "Krum",
    "MultiKrum",
    "NormClipping",
    "DPFedAvg",
)
KNOWN_OPTIMIZERS = ("SGD", "Adam")

# Task queues: the workflow and light activities on one; aggregation and evaluation on another,
# so they can run on bigger machines.
WORKFLOW_TASK_QUEUE = "fedloom-experiments"
AGGREGATION_TASK_QUEUE = "fedloom-aggregation"

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a safe identifier (letters, digits, ``._-``, at most 128), else ValueError."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} is invalid: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


def canonical_dataset(name: str) -> str:
    """The canonical dataset name (``CIFAR-10`` -> ``cifar10``), or ValueError listing the known ones."""
    canonical = DATASET_ALIASES.get(str(name).strip().lower())
    if canonical not in KNOWN_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(KNOWN_DATASETS)}")
    return canonical


def canonical_architecture(name: str) -> str:
    """The canonical architecture name, or ValueError listing the known ones."""
    for known in KNOWN_ARCHITECTURES:
        if str(name).strip().upper() == known:
            return known
    raise ValueError(f"unknown model_architecture {name!r}; known: {', '.join(KNOWN_ARCHITECTURES)}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ExperimentConfig(_Strict):
    experiment_id: str | None = None
    rounds: int = Field(default=10, ge=1, le=100_000)
    min_clients: int = Field(default=2, ge=1, le=100_000)
    client_fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    dataset: str = "digits"
    model_architecture: str = "CNN"
    # Extensions: reproducibility and deadlines.
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    round_timeout_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    selection_timeout_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)

    @field_validator("experiment_id")
    @classmethod
    def _id(cls, v: str | None) -> str | None:
        return None if v is None else check_id(v, "experiment_id")

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        return canonical_dataset(v)

    @field_validator("model_architecture")
    @classmethod
    def _arch(cls, v: str) -> str:
        return canonical_architecture(v)


class TrainingConfig(_Strict):
    local_epochs: int = Field(default=1, ge=1, le=1000)
    batch_size: int = Field(default=32, ge=1, le=65536)
    learning_rate: float = Field(default=0.01, gt=0, le=10)
    optimizer: str = "SGD"

    @field_validator("optimizer")
    @classmethod
    def _opt(cls, v: str) -> str:
        for known in KNOWN_OPTIMIZERS:
            if v.strip().lower() == known.lower():
                return known
        raise ValueError(f"unknown optimizer {v!r}; known: {', '.join(KNOWN_OPTIMIZERS)}")


class AggregationConfig(_Strict):
    strategy: str = "FedAvg"
    weighted: bool = True
    min_updates: int | None = Field(default=None, ge=1)
    # Extension: the strategy's own settings (see docs/strategies.md), checked at start.
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        for known in KNOWN_STRATEGIES:
            if v.strip().lower() == known.lower():
                return known
        raise ValueError(f"unknown strategy {v!r}; known: {', '.join(KNOWN_STRATEGIES)}")


class StartRequest(_Strict):
    """The body of ``POST /training/start``."""

    experiment_config: ExperimentConfig = Field(default_factory=ExperimentConfig)
    training_config: TrainingConfig = Field(default_factory=TrainingConfig)
    aggregation_config: AggregationConfig = Field(default_factory=AggregationConfig)


class PolicyConfig(_Strict):
    """An experiment's policy: the spec's ``policy_config``.

    ``rules`` holds declarative policy rules (see ``fedloom_core.policy`` and ``docs/policies.md``);
    they are checked here and kept as the given JSON objects. An empty ``rules`` list is left out of
    the serialized form, so policies without rules serialize exactly as before rules existed.
    """

    min_clients: int | None = Field(default=None, ge=1, le=100_000)
    max_client_failures: int | None = Field(default=None, ge=0, le=100_000)
    trust_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    rules: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("rules")
    @classmethod
    def _rules(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Check the rules with the policy engine's validator; keep them as given."""
        from fedloom_core.policy import validate_rules  # imported here: policy imports this module

        validate_rules(v)
        return v

    @model_serializer(mode="wrap")
    def _omit_empty_rules(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Serialize as usual, leaving ``rules`` out when there are none."""
        data = handler(self)
        if isinstance(data, dict) and not self.rules:
            data.pop("rules", None)
        return data

    # Update validation (extensions). An update is rejected when its delta's L2 norm exceeds
    # max_update_norm, or exceeds max_norm_ratio x the round's median norm, or when its cosine
    # similarity to the mean of the other updates is below min_cosine_similarity.
    max_update_norm: float | None = Field(default=None, gt=0)
    max_norm_ratio: float | None = Field(default=None, gt=1.0)
    min_cosine_similarity: float | None = Field(default=None, ge=-1.0, le=1.0)
    # Leave-one-out contribution scores: K extra evaluations a round (see docs/policies.md).
    contribution_scores: bool = True


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


class Selection(BaseModel):
    selected: list[str]
    excluded: dict[str, str] = Field(default_factory=dict)
    policy_results: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Training settings that round_control configure rules set for every client of the round.
    round_config: dict[str, Any] = Field(default_factory=dict)


class OpenRoundInput(BaseModel):
    experiment_id: str
    round: int
    selected: list[str]
    excluded: dict[str, str] = Field(default_factory=dict)
    policy_results: dict[str, dict[str, Any]] = Field(default_factory=dict)
    round_config: dict[str, Any] = Field(default_factory=dict)
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


class UpdateRef(BaseModel):
    update_id: str
    client_id: str
    blob_key: str
    num_samples: int


class AggregateInput(BaseModel):
    experiment_id: str
    round: int
    updates: list[UpdateRef]
    weighted: bool = True
    previous: ModelRef
    strategy: str = "FedAvg"
    params: dict[str, Any] = Field(default_factory=dict)
    state_key: str | None = None
    seed: int = 0


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


class EvaluateInput(BaseModel):
    experiment_id: str
    model: ModelRef
    dataset: str
    architecture: str
    input_shape: list[int]
    num_classes: int
    # When given: leave-one-out contributions of these (accepted) updates.
    updates: list[UpdateRef] = Field(default_factory=list)
    weighted: bool = True


class Evaluation(BaseModel):
    accuracy: float
    # None when the model's loss is not finite (a diverged or poisoned model).
    loss: float | None
    evaluation_time: float
    # client id -> loss without its update minus loss with all (leave-one-out FedAvg).
    loo_loss_deltas: dict[str, float] = Field(default_factory=dict)


class ProcessRoundInput(BaseModel):
    """A round's heavy work in one activity: validate the received updates, aggregate the accepted
    ones, evaluate the new model. The activity puts the accepted updates into ``aggregation.updates``
    and the new model (and, with contribution scores, the accepted updates) into ``evaluation``;
    what those fields hold on the way in is not used."""

    validation: ValidateInput
    aggregation: AggregateInput
    evaluation: EvaluateInput
    min_updates: int
    contribution_scores: bool = True


class ProcessRoundOutput(BaseModel):
    validation: ValidationOutcome
    # Both None when fewer than min_updates updates were accepted: the workflow fails the round.
    aggregated: AggregateOutput | None = None
    evaluation: Evaluation | None = None
    # Seconds spent aggregating, inside the activity.
    aggregation_time: float = 0.0


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


def dump(model: BaseModel) -> dict[str, Any]:
    """A JSON-ready dict of ``model``."""
    return model.model_dump(mode="json")
