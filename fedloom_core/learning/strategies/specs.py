"""Every strategy's declared parameters and minimum-updates rule, and checking them. Imports no torch.

This is the one place a strategy's ``Param``s are declared: the strategy classes (which need
torch) take theirs from here, and the API checks an experiment's ``aggregation_config`` with
``check_strategy`` without importing torch (about 260 MB of the API process's memory).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedloom_core.learning.catalog import KNOWN_STRATEGIES
from fedloom_core.learning.strategies.params import CHUNK_ELEMS, WEIGHTED, Param, StrategySpec


def _krum_minimum(values: Mapping[str, Any]) -> int:
    """Krum needs more than ``2 f + 2`` updates (and at least ``num_selected``)."""
    return max(2 * values["num_byzantine"] + 3, values.get("num_selected") or 1)


def _unit_interval(name: str, default: float, description: str) -> Param:
    """A float parameter in [0, 1)."""
    return Param(name, float, default, description, minimum=0.0, maximum=1.0, exclusive_maximum=True)


def _positive(name: str, default: float, description: str) -> Param:
    """A float parameter > 0."""
    return Param(name, float, default, description, minimum=0.0, exclusive_minimum=True)


SERVER_LR_ADAPTIVE = _positive("server_lr", 0.01, "Server learning rate eta: coordinates move by about eta a round.")
BETA_1 = _unit_interval("beta_1", 0.9, "Decay of the first moment m.")
BETA_2 = _unit_interval("beta_2", 0.99, "Decay of the second moment v.")
TAU = _positive("tau", 1e-3, "Adaptivity tau: added to sqrt(v); v starts at tau**2.")
NUM_BYZANTINE = Param("num_byzantine", int, 0, "Number f of Byzantine updates to tolerate.", minimum=0)

#: The strategies NormClipping can wrap: every strategy but itself, in the catalog's order.
INNER_STRATEGIES = tuple(name for name in KNOWN_STRATEGIES if name != "NormClipping")

FEDAVG = StrategySpec(
    "FedAvg",
    "The (sample-weighted) mean of the updates, folded one update at a time in client-id order.",
    (WEIGHTED,),
)
FEDPROX = StrategySpec(
    "FedProx",
    "FedAvg on the server; each client adds ``mu/2 * |w - w_global|^2`` to its local loss.",
    (Param("mu", float, 0.01, "Weight of the clients' proximal term.", minimum=0.0), WEIGHTED),
)
FEDAVGM = StrategySpec(
    "FedAvgM",
    "Server momentum: ``v <- momentum * v + delta``; ``w <- w + server_lr * v``.",
    (
        _positive("server_lr", 1.0, "Server learning rate."),
        _unit_interval("momentum", 0.9, "Server momentum."),
        WEIGHTED,
    ),
)
_ADAPTIVE = (SERVER_LR_ADAPTIVE, BETA_1, BETA_2, TAU, WEIGHTED)
FEDADAM = StrategySpec("FedAdam", "Adam on the server: ``v <- beta_2 v + (1 - beta_2) delta**2``.", _ADAPTIVE)
FEDYOGI = StrategySpec(
    "FedYogi", "Yogi on the server: ``v <- v - (1 - beta_2) delta**2 sign(v - delta**2)``.", _ADAPTIVE
)
FEDADAGRAD = StrategySpec(
    "FedAdagrad",
    "Adagrad on the server: ``v <- v + delta**2`` (``beta_1 = 0`` gives plain Adagrad on delta).",
    (SERVER_LR_ADAPTIVE, BETA_1, TAU, WEIGHTED),
)
FEDMEDIAN = StrategySpec(
    "FedMedian", "Coordinate-wise median; for an even K, the mean of the two middle values.", (CHUNK_ELEMS,)
)
FEDTRIMMEDAVG = StrategySpec(
    "FedTrimmedAvg",
    "Coordinate-wise trimmed mean: drop the ``floor(beta K)`` largest and smallest values, average the rest.",
    (
        Param(
            "trim_fraction",
            float,
            0.1,
            "Fraction beta of the updates dropped at each end, per coordinate (floor(beta * K) each side).",
            minimum=0.0,
            maximum=0.5,
            exclusive_maximum=True,
        ),
        CHUNK_ELEMS,
    ),
)
KRUM = StrategySpec(
    "Krum", "The single update with the lowest Krum score, unchanged.", (NUM_BYZANTINE, CHUNK_ELEMS), _krum_minimum
)
MULTIKRUM = StrategySpec(
    "MultiKrum",
    "Average of the ``num_selected`` updates with the lowest Krum scores.",
    (
        NUM_BYZANTINE,
        Param(
            "num_selected",
            int,
            None,
            "Number m of lowest-scored updates averaged (1 <= m <= K).",
            minimum=1,
            default_text="K - num_byzantine",
        ),
        Param("weighted", bool, False, "Weight the selected updates by their number of samples."),
        CHUNK_ELEMS,
    ),
    _krum_minimum,
)
DPFEDAVG = StrategySpec(
    "DPFedAvg",
    "Unweighted mean of clipped deltas plus Gaussian noise of std ``noise_multiplier * clip_norm / K``.",
    (
        Param(
            "clip_norm",
            float,
            None,
            "Clipping bound C on the L2 norm of each update's delta (all float tensors together).",
            minimum=0.0,
            exclusive_minimum=True,
            required=True,
        ),
        Param("noise_multiplier", float, 1.0, "Noise multiplier z: noise std is z * C / K.", minimum=0.0),
    ),
)

_WRAPPABLE = (FEDAVG, FEDPROX, FEDAVGM, FEDADAM, FEDYOGI, FEDADAGRAD, FEDMEDIAN, FEDTRIMMEDAVG)
_WRAPPABLE += (KRUM, MULTIKRUM, DPFEDAVG)
# The specs NormClipping can wrap, by name in the catalog's order (KeyError here if one is missing).
_INNER = {name: {s.name: s for s in _WRAPPABLE}[name] for name in INNER_STRATEGIES}

NORMCLIPPING = StrategySpec(
    "NormClipping",
    "Clip every update's delta to L2 norm ``max_norm``, then aggregate with the ``inner`` strategy.",
    (
        Param(
            "inner",
            str,
            "FedAvg",
            "Strategy that aggregates the clipped updates; its own parameters are accepted alongside.",
            choices=INNER_STRATEGIES,
        ),
        Param(
            "max_norm",
            float,
            None,
            "Bound C on the L2 norm of each update's delta (all float tensors together).",
            minimum=0.0,
            exclusive_minimum=True,
            required=True,
        ),
    ),
    # The inner strategy's minimum: its parameter values are among NormClipping's.
    lambda values: _INNER[values["inner"]].minimum_updates(values),
    inner_specs=_INNER,
)

#: Every strategy's spec by its canonical name, in the catalog's (documentation) order.
SPECS: dict[str, StrategySpec] = {name: {**_INNER, NORMCLIPPING.name: NORMCLIPPING}[name] for name in KNOWN_STRATEGIES}


def canonical_strategy_name(name: str) -> str:
    """The registered spelling of ``name`` (matched case-insensitively); ValueError listing the known ones."""
    if isinstance(name, str):
        wanted = name.strip().lower()
        for known in SPECS:
            if known.lower() == wanted:
                return known
    raise ValueError(f"unknown strategy {name!r}; known strategies: {', '.join(SPECS)}")


def strategy_params_schema(name: str) -> dict[str, Any]:
    """A JSON-friendly description of a strategy and each parameter (name, type, default, range)."""
    spec = SPECS[canonical_strategy_name(name)]
    schema: dict[str, Any] = {
        "strategy": spec.name,
        "description": spec.description,
        "params": [p.schema() for p in spec.params],
    }
    if spec.inner_specs is not None:
        schema["accepts_inner_params"] = True
    return schema


def given_params(name: str, params: Mapping[str, Any] | None) -> tuple[StrategySpec, dict[str, Any]]:
    """The named strategy's spec and a copy of ``params``; ValueError for an unknown name or a non-string key."""
    spec = SPECS[canonical_strategy_name(name)]
    given = dict(params or {})
    bad_keys = [k for k in given if not isinstance(k, str)]
    if bad_keys:
        raise ValueError(f"parameter names must be strings, not {bad_keys!r}")
    return spec, given


def experiment_params(name: str, params: Mapping[str, Any] | None, weighted: bool) -> dict[str, Any]:
    """An ``aggregation_config``'s params, plus its ``weighted`` flag where the strategy itself takes one."""
    merged = dict(params or {})
    if any(p.name == "weighted" for p in SPECS[canonical_strategy_name(name)].params):
        merged.setdefault("weighted", weighted)
    return merged


@dataclass(frozen=True)
class CheckedStrategy:
    """A strategy name with its parameters checked (every value filled in), without building it."""

    spec: StrategySpec
    params: dict[str, Any]

    @property
    def name(self) -> str:
        return self.spec.name

    def minimum_updates(self) -> int:
        """The fewest updates the strategy can aggregate (as ``Strategy.minimum_updates``)."""
        return self.spec.minimum_updates(self.params)


def check_strategy(name: str, params: Mapping[str, Any] | None, weighted: bool) -> CheckedStrategy:
    """``build_strategy``'s checks without torch: ValueError with the same message for bad params."""
    spec, given = given_params(name, experiment_params(name, params, weighted))
    return CheckedStrategy(spec, spec.check(given))
