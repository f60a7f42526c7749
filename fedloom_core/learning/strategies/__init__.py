"""Aggregation strategies: a registry by name, construction with checked parameters, and their schema.

``make_strategy("FedAdam", {"server_lr": 0.05})`` returns a ready ``Strategy``; see
``docs/strategies.md`` for each strategy's formula, parameters and memory use.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedloom_core.learning.catalog import KNOWN_STRATEGIES
from fedloom_core.learning.strategies.averaging import FedAvg, FedProx
from fedloom_core.learning.strategies.base import AggregateResult, AggregationContext, Strategy
from fedloom_core.learning.strategies.clipping import NormClipping
from fedloom_core.learning.strategies.dp import DPFedAvg
from fedloom_core.learning.strategies.krum import Krum, MultiKrum
from fedloom_core.learning.strategies.params import REGISTRY, ConfiguredStrategy, Param
from fedloom_core.learning.strategies.robust import FedMedian, FedTrimmedAvg
from fedloom_core.learning.strategies.server_opt import FedAdagrad, FedAdam, FedAvgM, FedYogi

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

#: Every strategy by its canonical name, in the catalog's (documentation) order.
STRATEGIES: dict[str, type[ConfiguredStrategy]] = {name: REGISTRY[name] for name in KNOWN_STRATEGIES}


def canonical_strategy_name(name: str) -> str:
    """The registered spelling of ``name`` (matched case-insensitively); ValueError listing the known ones."""
    if isinstance(name, str):
        wanted = name.strip().lower()
        for known in STRATEGIES:
            if known.lower() == wanted:
                return known
    raise ValueError(f"unknown strategy {name!r}; known strategies: {', '.join(STRATEGIES)}")


def make_strategy(name: str, params: Mapping[str, Any] | None = None) -> Strategy:
    """A strategy by name with its parameters checked; ValueError says what is wrong and what is valid."""
    cls = STRATEGIES[canonical_strategy_name(name)]
    given = dict(params or {})
    bad_keys = [k for k in given if not isinstance(k, str)]
    if bad_keys:
        raise ValueError(f"parameter names must be strings, not {bad_keys!r}")
    return cls(**given)


def strategy_params_schema(name: str) -> dict[str, Any]:
    """A JSON-friendly description of a strategy and each parameter (name, type, default, range)."""
    cls = STRATEGIES[canonical_strategy_name(name)]
    schema: dict[str, Any] = {
        "strategy": cls.name,
        "description": (cls.__doc__ or "").strip().splitlines()[0],
        "params": cls.param_schema(),
    }
    if cls is NormClipping:
        schema["accepts_inner_params"] = True
    return schema


def build_strategy(name: str, params: Mapping[str, Any] | None, weighted: bool) -> Strategy:
    """The strategy for an experiment's ``aggregation_config``: its params, plus ``weighted`` where it takes one."""
    merged = dict(params or {})
    if any(p["name"] == "weighted" for p in strategy_params_schema(name)["params"]):
        merged.setdefault("weighted", weighted)
    return make_strategy(name, merged)
