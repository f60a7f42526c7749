"""Krum and Multi-Krum (Blanchard et al., 2017): keep the updates closest to their nearest neighbours.

The squared L2 distance between every pair of updates (all floating-point tensors together) comes
from Gram matrices: the model's coordinates are walked in fixed blocks of ``BLOCK``; each block's
K rows are read from the memory-mapped update files minus the global model's (the deltas, much
smaller than the weights, so little is lost to cancellation), and one batched float32 matrix
product gives the block's K x K Gram matrix, ``|a - b|^2 = |a|^2 + |b|^2 - 2 a.b``, as partial
sums over ``PIECE`` coordinates that are added up in float64 (float64 products would cost twice
as much; float32 sums over whole blocks would lose about 100 times more to rounding). The blocks'
Gram matrices are added up in float64, in block order, so the distances do not depend on
``chunk_elems`` (which only bounds how much of the mapped files stays resident, about
``K x chunk_elems`` values), nor on the thread count. Memory beyond that is ``(2K + 1) x BLOCK``
values per thread, and, for the output, FedAvg's one model.

``score_i`` is the sum of the ``K - f - 2`` smallest distances from update i to the others.
Krum outputs the update with the lowest score; Multi-Krum averages the ``m`` lowest-scored.
Ties go to the smaller client id. Both need ``K > 2f + 2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fedloom_core.learning.kernels import Opener, UpdateFile, fedavg
from fedloom_core.learning.strategies.base import AggregateResult, AggregationContext
from fedloom_core.learning.strategies.blocks import FlatSpace, MappedFile, flat_spaces, open_mapped, run_blocks
from fedloom_core.learning.strategies.params import CHUNK_ELEMS, ConfiguredStrategy, Param
from fedloom_core.learning.strategies.streaming import canonical
from fedloom_core.learning.weights import structure

NUM_BYZANTINE = Param("num_byzantine", int, 0, "Number f of Byzantine updates to tolerate.", minimum=0)
# Coordinates per block: fixed, so the partial sums are the same for any chunk_elems.
BLOCK = 1 << 16
# Coordinates per float32 dot product inside a block (longer float32 sums lose more to rounding:
# a relative error of about 2e-4 over 65536 coordinates, 3e-6 over 1024, measured).
PIECE = 1 << 10


def block_gram(rows: torch.Tensor) -> np.ndarray:
    """The K x K Gram matrix of ``rows`` (K x n): float32 products summed over PIECE coordinates at a
    time (one batched matrix product), the pieces' sums then added in float64, in order."""
    count, n = rows.shape
    whole = n - n % PIECE
    total = np.zeros((count, count), dtype=np.float64)
    if whole:
        batched = rows[:, :whole].reshape(count, whole // PIECE, PIECE).permute(1, 0, 2)
        np.add.reduce(torch.bmm(batched, batched.transpose(1, 2)).numpy(), axis=0, dtype=np.float64, out=total)
    if whole < n:
        rest = rows[:, whole:]
        np.add(total, torch.mm(rest, rest.T).numpy(), out=total)
    return total


def pairwise_sq_distances(
    ordered: Sequence[UpdateFile], opener: Opener, global_path: Path, chunk: int
) -> list[list[float]]:
    """Squared L2 distances between the updates' floating-point tensors, as a symmetric K x K list of lists.

    Blocks run on ``blocks.run_blocks``'s threads, but every sum is taken in a fixed order (within a
    block, then block by block), so the same files give the same distances on every run.
    """
    count = len(ordered)
    expected = structure(global_path)
    gram = np.zeros((count, count), dtype=np.float64)
    with open_mapped(ordered, opener, expected, reference=global_path) as files:
        for space in flat_spaces(expected):
            _add_gram(space, files, chunk, gram)
    upper = np.triu(gram)
    sym = upper + np.triu(upper, 1).T  # the upper triangle mirrored: d(i, j) == d(j, i) bit for bit
    sq = np.diagonal(sym)
    dist = np.clip(sq[:, None] + sq[None, :] - 2.0 * sym, 0.0, None)
    np.fill_diagonal(dist, 0.0)
    return dist.tolist()


def _add_gram(space: FlatSpace, files: Sequence[MappedFile], chunk: int, gram: np.ndarray) -> None:
    """Add the Gram matrix of the updates' deltas (``files[:K]`` minus ``files[K]``) over ``space`` to ``gram``."""
    count = len(files) - 1
    block = min(BLOCK, space.total)
    window = max(block, chunk - chunk % block)
    parts = np.zeros((math.ceil(window / block), count, count), dtype=np.float64)

    def scratch() -> tuple[np.ndarray, np.ndarray]:
        # torch's allocator aligns to 64 bytes, so every matrix handed to BLAS is aligned the same
        # way on every run (BLAS kernels may sum differently for differently aligned data).
        staging = torch.empty((count + 1, block), dtype=space.work).numpy()
        return staging, torch.empty((count, block), dtype=space.work).numpy()

    def kernel(start: int, stop: int, own: tuple[np.ndarray, np.ndarray]) -> None:
        staging, deltas = own
        n = stop - start
        pieces = list(space.pieces(start, stop))
        reference = files[count].block(pieces, staging[count, :n])
        rows = deltas[:, :n]
        for i in range(count):
            np.subtract(files[i].block(pieces, staging[i, :n]), reference, out=rows[i])
        parts[(start % window) // block] = block_gram(torch.from_numpy(rows))

    def done(start: int, stop: int) -> None:
        for part in parts[: math.ceil((stop - start) / block)]:
            np.add(gram, part, out=gram)

    run_blocks(space.total, block, window, kernel, scratch, files, space, done)


def krum_scores(ordered: Sequence[UpdateFile], dist: list[list[float]], num_byzantine: int) -> dict[str, float]:
    """Each update's score: the sum of its ``K - f - 2`` smallest distances to the other updates."""
    count = len(ordered)
    keep = count - num_byzantine - 2
    scores = {}
    for i, update in enumerate(ordered):
        nearest = sorted(dist[i][j] for j in range(count) if j != i)[:keep]
        scores[update.client_id] = sum(nearest)
    return scores


class MultiKrum(ConfiguredStrategy):
    """Average of the ``num_selected`` updates with the lowest Krum scores."""

    name = "MultiKrum"
    PARAMS = (
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
    )

    def minimum_updates(self) -> int:
        """Krum needs more than ``2 f + 2`` updates (and at least ``num_selected``)."""
        return max(2 * self.params["num_byzantine"] + 3, self.params.get("num_selected") or 1)

    def selected_count(self, count: int) -> int:
        """How many updates are averaged when there are ``count`` of them."""
        chosen = self.params["num_selected"]
        return count - self.params["num_byzantine"] if chosen is None else chosen

    def aggregate(self, ctx: AggregationContext) -> AggregateResult:
        """Score the updates, then average the best ``num_selected`` of them with ``aggregation.fedavg``."""
        ordered = canonical(ctx.updates)
        count, f = len(ordered), self.params["num_byzantine"]
        if count <= 2 * f + 2:
            raise ValueError(
                f"{self.name} with num_byzantine={f} needs more than 2 * {f} + 2 = {2 * f + 2} updates, got {count}"
            )
        chosen = self.selected_count(count)
        if chosen > count:
            raise ValueError(f"{self.name}: num_selected={chosen} is more than the {count} updates of the round")
        dist = pairwise_sq_distances(ordered, ctx.opener, Path(ctx.global_path), self.params["chunk_elems"])
        scores = krum_scores(ordered, dist, f)
        ranking = sorted(ordered, key=lambda u: (scores[u.client_id], u.client_id))
        selected = ranking[:chosen]
        fedavg(selected, ctx.out_path, weighted=self.params.get("weighted", False), opener=ctx.opener)
        return AggregateResult(info={"selected": [u.client_id for u in selected], "scores": scores})


class Krum(MultiKrum):
    """The single update with the lowest Krum score, unchanged."""

    name = "Krum"
    PARAMS = (NUM_BYZANTINE, CHUNK_ELEMS)

    def selected_count(self, count: int) -> int:
        """Krum keeps exactly one update."""
        return 1
