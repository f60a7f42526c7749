"""Coordinate-wise robust rules: FedMedian and FedTrimmedAvg (Yin et al., 2018).

Both look at each coordinate's K values at once, so they cannot fold one update at a time.
Instead they walk every tensor in chunks of ``chunk_elems`` coordinates: the chunk is gathered
from all K updates into one ``chunk x K`` buffer (client-id order), each row is sorted in place,
and the row's median or trimmed mean is written into the output tensor. Memory is about
``K x chunk_elems`` values (float32, or float64 for float64 tensors) plus one output model,
whatever the model size. Integer tensors are the first update's, as in FedAvg.
"""

from __future__ import annotations

from typing import Any

import torch

from fedloom_core.learning.strategies.base import AggregateResult, AggregationContext
from fedloom_core.learning.strategies.params import CHUNK_ELEMS, ConfiguredStrategy, Param
from fedloom_core.learning.strategies.streaming import (
    canonical,
    floor_fraction,
    is_float,
    open_all,
    ranges,
    torch_dtype,
    work_dtype,
)
from fedloom_core.learning.weights import save_state, structure


class CoordinateWise(ConfiguredStrategy):
    """Base of the rules that reduce each coordinate's sorted K values to one value."""

    def reduce(self, rows: torch.Tensor) -> torch.Tensor:
        """One value per row of ``rows`` (shape ``n x K``, each row sorted ascending)."""
        raise NotImplementedError

    def round_info(self, count: int) -> dict[str, Any]:
        """Facts about this round worth recording, given the number of updates."""
        return {}

    def aggregate(self, ctx: AggregationContext) -> AggregateResult:
        """Write the coordinate-wise reduction of the updates, one chunk of coordinates at a time."""
        ordered = canonical(ctx.updates)
        count = len(ordered)
        expected = structure(ctx.global_path)
        chunk = self.params["chunk_elems"]
        result: dict[str, torch.Tensor] = {}
        with open_all(ordered, ctx.opener, expected, chunk) as slices:
            for name, (dtype_text, shape) in expected.items():
                if not is_float(dtype_text):
                    result[name] = slices.whole(0, name)
                    continue
                dtype = torch_dtype(dtype_text)
                out = torch.empty(shape, dtype=dtype)
                flat = out.view(-1)
                if flat.numel() == 0:
                    result[name] = out
                    continue
                buffer = torch.empty((min(chunk, flat.numel()), count), dtype=work_dtype(dtype))
                for start, stop in ranges(flat.numel(), chunk):
                    rows = buffer[: stop - start]
                    # rows.T[i] is column i: update i's values for these coordinates.
                    slices.gather(name, start, stop, rows.T)
                    rows.numpy().sort(axis=1)  # in place, no index tensor (torch.sort would add K x chunk int64)
                    flat[start:stop].copy_(self.reduce(rows))
                result[name] = out
                del buffer
        save_state(result, ctx.out_path)
        return AggregateResult(info=self.round_info(count))


class FedMedian(CoordinateWise):
    """Coordinate-wise median; for an even K, the mean of the two middle values."""

    name = "FedMedian"
    PARAMS = (CHUNK_ELEMS,)

    def reduce(self, rows: torch.Tensor) -> torch.Tensor:
        """The middle value of each sorted row (mean of the two middle ones for even K)."""
        k = rows.shape[1]
        if k % 2:
            return rows[:, k // 2]
        return (rows[:, k // 2 - 1] + rows[:, k // 2]) * 0.5


class FedTrimmedAvg(CoordinateWise):
    """Coordinate-wise trimmed mean: drop the ``floor(beta K)`` largest and smallest values, average the rest."""

    name = "FedTrimmedAvg"
    PARAMS = (
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
    )

    def trimmed(self, count: int) -> int:
        """How many values are dropped at each end when there are ``count`` updates."""
        return floor_fraction(self.params["trim_fraction"], count)

    def reduce(self, rows: torch.Tensor) -> torch.Tensor:
        """The mean of the middle ``K - 2 floor(beta K)`` values of each sorted row."""
        k = rows.shape[1]
        t = self.trimmed(k)
        return rows[:, t : k - t].sum(dim=1) / (k - 2 * t)

    def round_info(self, count: int) -> dict[str, Any]:
        """How many values were dropped at each end."""
        return {"trimmed_per_side": self.trimmed(count)}
