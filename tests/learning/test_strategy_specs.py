"""The torch-free strategy specs are the classes' own declarations, and checking with them matches building."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from fedloom_core.learning.strategies import STRATEGIES, build_strategy
from fedloom_core.learning.strategies.specs import SPECS, check_strategy


def test_each_class_takes_its_name_params_and_description_from_its_spec() -> None:
    assert list(SPECS) == list(STRATEGIES)
    for name, cls in STRATEGIES.items():
        assert cls.SPEC is SPECS[name] and cls.name == name and cls.PARAMS is SPECS[name].params
        # The schema's description is the spec's; it must say what the class's docstring says.
        assert SPECS[name].description == (cls.__doc__ or "").strip().splitlines()[0]


VALUES = [None, True, 0, 1, 3, 0.5, 0.7, -1, float("inf"), "x", "FedProx", "Krum"]
BASES: list[dict[Any, Any]] = [
    {},
    {"max_norm": 1.0},
    {"clip_norm": 2.0},
    {"max_norm": 1, "inner": "MultiKrum", "num_selected": 9},
    {"max_norm": 1, "inner": "Krum", "num_byzantine": 2},
    {1: 2},
]


def _outcome(make: Any, name: str, params: dict[Any, Any], weighted: bool) -> tuple[Any, ...]:
    try:
        strategy = make(name, params, weighted)
    except ValueError as exc:
        return ("error", str(exc))
    return ("ok", list(strategy.params.items()), strategy.minimum_updates())


@pytest.mark.parametrize("name", [*SPECS, "fedsgd", " multikrum "])
def test_checking_gives_what_building_gives(name: str) -> None:
    param_names = sorted({p.name for spec in SPECS.values() for p in spec.params} | {"lr"})
    outcomes = set()
    for base, param, value, weighted in itertools.product(BASES, param_names, VALUES, (True, False)):
        params = {**base, param: value}
        built = _outcome(build_strategy, name, params, weighted)
        assert _outcome(check_strategy, name, params, weighted) == built, params
        outcomes.add(built[0])
    # Both kinds of outcome were compared (an unknown name only ever errs).
    assert outcomes == ({"error"} if name == "fedsgd" else {"ok", "error"})
