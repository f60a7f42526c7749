"""Data types shared by the API, the workflow and its activities. Imports neither torch nor I/O."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

KNOWN_DATASETS = ("digits",)
DATASET_ALIASES = {
    "digits": "digits",
    "cifar-10": "cifar10",
    "cifar10": "cifar10",
    "mnist": "mnist",
    "synthetic": "synthetic",
}
KNOWN_ARCHITECTURES = ("CNN", "MLP")
KNOWN_STRATEGIES = ("FedAvg",)
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
    """An experiment's policy: the spec's ``policy_config``."""

    min_clients: int | None = Field(default=None, ge=1, le=100_000)
    max_client_failures: int | None = Field(default=None, ge=0, le=100_000)
    trust_threshold: float | None = Field(default=None, ge=0.0, le=1.0)


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
    round_durations: list[float] = Field(default_factory=list)


class ExperimentInput(BaseModel):
    experiment_id: str
    config: StartRequest
    input_shape: list[int]
    num_classes: int
    round_timeout_s: float
    selection_timeout_s: float
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
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


class Selection(BaseModel):
    selected: list[str]
    excluded: dict[str, str] = Field(default_factory=dict)
    policy_results: dict[str, dict[str, Any]] = Field(default_factory=dict)


class OpenRoundInput(BaseModel):
    experiment_id: str
    round: int
    selected: list[str]
    excluded: dict[str, str] = Field(default_factory=dict)
    policy_results: dict[str, dict[str, Any]] = Field(default_factory=dict)
    global_model: ModelRef
    deadline_s: float


class UpdateNotice(BaseModel):
    """Sent to the workflow when an upload has been stored and recorded."""

    update_id: str
    client_id: str
    round: int


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


class EvaluateInput(BaseModel):
    experiment_id: str
    model: ModelRef
    dataset: str
    architecture: str
    input_shape: list[int]
    num_classes: int


class Evaluation(BaseModel):
    accuracy: float
    loss: float
    evaluation_time: float


class CompleteRoundInput(BaseModel):
    experiment_id: str
    round: int
    total_rounds: int
    model: ModelRef
    evaluation: Evaluation
    updates: list[UpdateRef]
    round_duration: float
    aggregation_time: float


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
