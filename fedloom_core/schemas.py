"""Request and response bodies of the REST API (the spec's experiment, training, aggregation and policy configs)."""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from fedloom_core.ids import check_id, check_optional_id
from fedloom_core.learning.catalog import (
    KNOWN_OPTIMIZERS,
    KNOWN_STRATEGIES,
    builtin_architecture,
    builtin_dataset,
    canonical_dataset,
)
from fedloom_core.policy.defaults import DEFAULT_MAX_NORM_RATIO, DEFAULT_MAX_WEIGHT_RATIO, DEFAULT_TRUST_THRESHOLD
from fedloom_core.policy.rules import validate_rules


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RetentionConfig(_Strict):
    """An experiment's storage retention; a field left out takes the server's setting (FEDLOOM_KEEP_*)."""

    # False keeps everything this experiment stores.
    enabled: bool | None = None
    keep_updates: bool | None = None
    keep_last_models: int | None = Field(default=None, ge=1, le=100_000)
    keep_model_every: int | None = Field(default=None, ge=0, le=100_000)


class ExperimentConfig(_Strict):
    experiment_id: str | None = None
    rounds: int = Field(default=10, ge=1, le=100_000)
    min_clients: int = Field(default=2, ge=1, le=100_000)
    client_fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    # A built-in architecture, or any other name for a custom model the server never builds.
    model_architecture: str = "CNN"
    # A built-in dataset, or (with a custom architecture) any name for the data the sites hold.
    dataset: str = "digits"
    # Extension: start from another experiment's global model (warm start).
    initial_model_id: str | None = None
    # Extensions: reproducibility and deadlines.
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    round_timeout_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    selection_timeout_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    # Extension: which rounds' updates and global models are kept (docs/operations.md).
    retention: RetentionConfig | None = None

    _ids = field_validator("experiment_id", "initial_model_id")(check_optional_id)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str, info: ValidationInfo) -> str:
        """A built-in model trains on a built-in dataset; a custom one on whatever the sites call their data."""
        if builtin_architecture(info.data.get("model_architecture", "CNN")) is not None:
            return canonical_dataset(v)
        return builtin_dataset(v) or check_id(v, "dataset")

    @field_validator("model_architecture")
    @classmethod
    def _arch(cls, v: str) -> str:
        return builtin_architecture(v) or check_id(v, "model_architecture")

    @property
    def builtin(self) -> bool:
        """Whether the server knows this model (and can build and evaluate it)."""
        return builtin_architecture(self.model_architecture) is not None


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


class EvaluationConfig(_Strict):
    """How each round's new global model is evaluated: on the server's test split, by the clients, or both."""

    # None: on for the built-in models and datasets; a custom model is never evaluated centrally.
    central: bool | None = None
    # None: off for the built-in models, on for custom ones (the server holds none of their data).
    federated: bool | None = None
    # Of the round's participants, the fraction asked to evaluate (at least one).
    fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    # How long the evaluation phase waits for the clients' reports.
    timeout_s: float = Field(default=60.0, gt=0, le=24 * 3600)


class StartRequest(_Strict):
    """The body of ``POST /training/start``."""

    experiment_config: ExperimentConfig = Field(default_factory=ExperimentConfig)
    training_config: TrainingConfig = Field(default_factory=TrainingConfig)
    aggregation_config: AggregationConfig = Field(default_factory=AggregationConfig)
    evaluation_config: EvaluationConfig = Field(default_factory=EvaluationConfig)


def central_evaluation(req: StartRequest) -> bool:
    """Whether the server evaluates each new model on its own test split."""
    builtin = req.experiment_config.builtin
    return builtin and (req.evaluation_config.central is not False)


def federated_evaluation(req: StartRequest) -> bool:
    """Whether clients evaluate each new model on their local data."""
    wanted = req.evaluation_config.federated
    return (not req.experiment_config.builtin) if wanted is None else wanted


class PolicyConfig(_Strict):
    """An experiment's policy: the spec's ``policy_config``.

    ``rules`` holds declarative policy rules (see ``fedloom_core.policy.rules`` and ``docs/policies.md``);
    they are checked here and kept as the given JSON objects. An empty ``rules`` list is left out of
    the serialized form, so policies without rules serialize exactly as before rules existed.
    """

    min_clients: int | None = Field(default=None, ge=1, le=100_000)
    max_client_failures: int | None = Field(default=None, ge=0, le=100_000)
    # The default policy's bounds (fedloom_core.policy.defaults) apply unless set; null turns one off.
    trust_threshold: float | None = Field(default=DEFAULT_TRUST_THRESHOLD, ge=0.0, le=1.0)
    rules: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("rules")
    @classmethod
    def _rules(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Check the rules with the policy engine's validator; keep them as given."""
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
    max_norm_ratio: float | None = Field(default=DEFAULT_MAX_NORM_RATIO, gt=1.0)
    min_cosine_similarity: float | None = Field(default=None, ge=-1.0, le=1.0)
    # No accepted update's data_samples counts for more than this many times the round's median.
    max_weight_ratio: float | None = Field(default=DEFAULT_MAX_WEIGHT_RATIO, ge=1.0)
    # Leave-one-out contribution scores: K extra evaluations a round (see docs/policies.md).
    contribution_scores: bool = True


def dump(model: BaseModel) -> dict[str, Any]:
    """A JSON-ready dict of ``model``."""
    return model.model_dump(mode="json")
