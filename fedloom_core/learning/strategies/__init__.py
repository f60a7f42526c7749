"""Aggregation strategies: a registry by name, construction with checked parameters, and their schema.

``make_strategy("FedAdam", {"server_lr": 0.05})`` returns a ready ``Strategy``; see
``docs/strategies.md`` for each strategy's formula, parameters and memory use.

Importing this package imports no torch: the strategy classes (and ``STRATEGIES``) are loaded when
first used, so the API can check parameters with ``specs.check_strategy`` and the schema without them.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedloom_core.learning.catalog import KNOWN_STRATEGIES
from fedloom_core.learning.strategies.base import AggregateResult, AggregationContext, Strategy
from fedloom_core.learning.strategies.params import REGISTRY, ConfiguredStrategy, Param
from fedloom_core.learning.strategies.specs import (
    canonical_strategy_name,
    experiment_params,
    given_params,
    strategy_params_schema,
)

if TYPE_CHECKING:
    from fedloom_core.learning.strategies.averaging import FedAvg, FedProx
    from fedloom_core.learning.strategies.clipping import NormClipping
    from fedloom_core.learning.strategies.dp import DPFedAvg
    from fedloom_core.learning.strategies.krum import Krum, MultiKrum
    from fedloom_core.learning.strategies.robust import FedMedian, FedTrimmedAvg
    from fedloom_core.learning.strategies.server_opt import FedAdagrad, FedAdam, FedAvgM, FedYogi

    #: Every strategy by its canonical name, in the catalog's (documentation) order.
    STRATEGIES: dict[str, type[ConfiguredStrategy]]

__all__ = [
    "STRATEGIES",
    "AggregateResult",
    "AggregationContext",
    "ConfiguredStrategy",
    "DPFedAvg",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedMedian",
    "FedProx",
    "FedTrimmedAvg",
    "FedYogi",
    "Krum",
    "MultiKrum",
    "NormClipping",
    "Param",
    "Strategy",
    "canonical_strategy_name",
    "make_strategy",
    "strategy_params_schema",
]

# The modules whose classes register themselves in REGISTRY (they import torch).
_CLASS_MODULES = ("averaging", "server_opt", "robust", "krum", "clipping", "dp")


def _strategies() -> dict[str, type[ConfiguredStrategy]]:
    """Every strategy class by its canonical name, in the catalog's order (imports their modules)."""
    for module in _CLASS_MODULES:
        importlib.import_module(f"{__name__}.{module}")
    return {name: REGISTRY[name] for name in KNOWN_STRATEGIES}


def __getattr__(name: str) -> Any:
    """``STRATEGIES`` and the strategy classes, imported on first use."""
    if name == "STRATEGIES" or name in KNOWN_STRATEGIES:
        strategies = _strategies()
        globals().update(strategies, STRATEGIES=strategies)  # later look-ups find them directly
        return strategies if name == "STRATEGIES" else strategies[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_strategy(name: str, params: Mapping[str, Any] | None = None) -> Strategy:
    """A strategy by name with its parameters checked; ValueError says what is wrong and what is valid."""
    spec, given = given_params(name, params)
    return _strategies()[spec.name](**given)


def build_strategy(name: str, params: Mapping[str, Any] | None, weighted: bool) -> Strategy:
    """The strategy for an experiment's ``aggregation_config``: its params, plus ``weighted`` where it takes one."""
    return make_strategy(name, experiment_params(name, params, weighted))
