"""Coordinate-wise robust rules: FedMedian and FedTrimmedAvg (Yin et al., 2018).

Both look at each coordinate's K values at once, so they cannot fold one update at a time.
Instead they walk the model's floating-point coordinates in blocks: the block's K rows (one per
update, client-id order) are read from the memory-mapped update files, and a comparator network
(``networks.selection_plan``) brings the wanted order statistics of every coordinate onto a few
rows with elementwise minimum and maximum, which are then added up. Every step is exact but the
final sum, whose order is fixed by K, so the result is the same for any block size, thread count
or arrival order. Memory is one window of results (written into the output file when the window
is done, ``output.StreamedOutput``), ``(2K + 2) x block`` scratch values per thread and at most
about ``K x chunk_elems`` mapped values (``blocks.MappedFile``), whatever the model size.
Integer tensors are the first update's, as in FedAvg.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedloom_core.learning.strategies.base import AggregateResult, AggregationContext
from fedloom_core.learning.strategies.blocks import (
    FlatSpace,
    MappedFile,
    block_size,
    budget_window,
    flat_spaces,
    open_mapped,
    run_blocks,
)
from fedloom_core.learning.strategies.networks import Plan, run_plan, selection_plan
from fedloom_core.learning.strategies.output import StreamedOutput
from fedloom_core.learning.strategies.params import ConfiguredStrategy
from fedloom_core.learning.strategies.specs import FEDMEDIAN, FEDTRIMMEDAVG
from fedloom_core.learning.strategies.streaming import canonical, floor_fraction, is_float
from fedloom_core.learning.weights import structure


class CoordinateWise(ConfiguredStrategy):
    """Base of the rules that reduce each coordinate's K values to a scaled sum of sorted positions."""

    def positions(self, count: int) -> tuple[int, int]:
        """The sorted positions ``[lo, hi)`` whose values are added up, given ``count`` updates."""
        raise NotImplementedError

    def finish(self, total: np.ndarray, count: int) -> None:
        """Turn the sum of the positions' values into the result, in place."""
        raise NotImplementedError

    def round_info(self, count: int) -> dict[str, Any]:
        """Facts about this round worth recording, given the number of updates."""
        return {}

    def _reduce(
        self, space: FlatSpace, files: Sequence[MappedFile], plan: Plan, window: int, output: StreamedOutput
    ) -> None:
        """Write the result over ``space``'s coordinates into ``output``, a window at a time."""
        count = len(files)
        dtype = space.numpy_dtype
        block = min(block_size(count + 2, np.dtype(dtype).itemsize, window, minimum=1), space.total)
        window = budget_window(window, block, count, 2 * count + 2)
        span = max(block, window - window % block)  # the windows run_blocks walks
        results = torch.empty(min(span, space.total), dtype=space.work).numpy()

        def scratch() -> tuple[np.ndarray, np.ndarray]:
            return np.empty((count, block), dtype), np.empty((count + 2, block), dtype)

        def kernel(start: int, stop: int, own: tuple[np.ndarray, np.ndarray]) -> None:
            staging, spare = own
            n = stop - start
            pieces = list(space.pieces(start, stop))
            rows = [f.block(pieces, staging[i, :n]) for i, f in enumerate(files)]
            out = results[start % span : start % span + n]
            run_plan(plan, rows, spare[:, :n], out)
            self.finish(out, count)

        def done(start: int, stop: int) -> None:
            output.window(space, start, results[: stop - start])

        run_blocks(space.total, block, window, kernel, scratch, files, space, done)

    def aggregate(self, ctx: AggregationContext) -> AggregateResult:
        """Write the coordinate-wise reduction of the updates, one block of coordinates at a time."""
        ordered = canonical(ctx.updates)
        count = len(ordered)
        expected = structure(ctx.global_path)
        plan = selection_plan(count, *self.positions(count))
        window = self.params["chunk_elems"]
        with open_mapped(ordered, ctx.opener, expected) as files, StreamedOutput(ctx.out_path, expected) as output:
            for name, (dtype_text, _) in expected.items():
                if not is_float(dtype_text):
                    output.tensor(name, files[0].whole(name))
            for space in flat_spaces(expected):
                self._reduce(space, files, plan, window, output)
        return AggregateResult(info=self.round_info(count))


class FedMedian(CoordinateWise):
    """Coordinate-wise median; for an even K, the mean of the two middle values."""

    SPEC = FEDMEDIAN

    def positions(self, count: int) -> tuple[int, int]:
        """The middle value, or the two middle values for an even count."""
        half = count // 2
        return (half, half + 1) if count % 2 else (half - 1, half + 1)

    def finish(self, total: np.ndarray, count: int) -> None:
        """Half the sum of the two middle values for an even count."""
        if count % 2 == 0:
            np.multiply(total, 0.5, out=total)


class FedTrimmedAvg(CoordinateWise):
    """Coordinate-wise trimmed mean: drop the ``floor(beta K)`` largest and smallest values, average the rest."""

    SPEC = FEDTRIMMEDAVG

    def trimmed(self, count: int) -> int:
        """How many values are dropped at each end when there are ``count`` updates."""
        return floor_fraction(self.params["trim_fraction"], count)

    def positions(self, count: int) -> tuple[int, int]:
        """The middle ``K - 2 floor(beta K)`` values."""
        t = self.trimmed(count)
        return t, count - t

    def finish(self, total: np.ndarray, count: int) -> None:
        """The mean of the kept values."""
        kept = count - 2 * self.trimmed(count)
        if kept > 1:
            np.divide(total, kept, out=total)

    def round_info(self, count: int) -> dict[str, Any]:
        """How many values were dropped at each end."""
        return {"trimmed_per_side": self.trimmed(count)}
