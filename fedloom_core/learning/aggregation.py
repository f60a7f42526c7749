"""A round's aggregation plan: the experiment's strategy run over the accepted update files."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedloom_core.learning import weights
from fedloom_core.learning.kernels import Opener, UpdateFile, open_path
from fedloom_core.learning.strategies import build_strategy
from fedloom_core.learning.strategies.base import AggregationContext


@dataclass(frozen=True)
class AggregationOutcome:
    """What aggregation wrote: the new model at ``out``, the strategy state if ``wrote_state``, and its info."""

    parameters_count: int
    wrote_state: bool
    info: dict[str, Any]


def aggregate_files(
    *,
    strategy: str,
    params: Mapping[str, Any],
    weighted: bool,
    round: int,
    seed: int,
    global_path: Path,
    updates: Sequence[UpdateFile],
    out: Path,
    state_path: Path | None,
    state_out: Path,
    opener: Opener = open_path,
) -> AggregationOutcome:
    """Aggregate ``updates`` into ``out`` with the named strategy; ValueError for settings the round cannot use."""
    result = build_strategy(strategy, params, weighted).aggregate(
        AggregationContext(
            round=round,
            global_path=global_path,
            updates=list(updates),
            out_path=out,
            state_path=state_path,
            state_out_path=state_out,
            seed=seed,
            opener=opener,
        )
    )
    # Counted from the header's shapes: reading the new model back cost a copy of it (0.6 s at 1 GB).
    floats = ("F64", "F32", "F16", "BF16")
    parameters = sum(math.prod(s.shape) for s in weights.read_header(out).values() if s.dtype in floats)
    return AggregationOutcome(parameters, result.wrote_state, jsonable(result.info))


def jsonable(info: Mapping[str, Any]) -> dict[str, Any]:
    """Strategy info with numbers as plain floats, fit for a payload and the database."""
    out: dict[str, Any] = {}
    for key, value in info.items():
        if isinstance(value, Mapping):
            out[key] = jsonable(value)
        elif isinstance(value, (list, tuple)):
            out[key] = [float(v) if hasattr(v, "item") else v for v in value]
        elif hasattr(value, "item"):
            out[key] = value.item()
        else:
            out[key] = value
    return out
