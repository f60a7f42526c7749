"""Krum and Multi-Krum (Blanchard et al., 2017): keep the updates closest to their nearest neighbours.

The squared L2 distance between every pair of updates (all floating-point tensors together) comes
from Gram matrices: the model's coordinates are walked in cache-sized blocks; each block's K rows
are read from the memory-mapped update files minus the global model's (the deltas, much smaller
than the weights, so little is lost to cancellation), and batched float32 matrix products (three, over
the two halves of the rows: 3/4 of the multiplications) give the upper triangle of the K x K Gram
matrix of every piece of ``PIECE`` coordinates, ``|a - b|^2 = |a|^2 + |b|^2 - 2 a.b``.
The pieces' matrices are added up in float64, in piece order (float64 products would cost twice as
much; float32 sums over long blocks would lose about 100 times more to rounding), so the distances
do not depend on the block size, ``chunk_elems`` (which only bounds how much of the mapped files
stays resident, about ``K x chunk_elems`` values) or the thread count. Memory beyond that is
``2 (K + 1)`` block rows per thread and one window of the output (``output.StreamedOutput`` writes
each window into the file when it is done).

``score_i`` is the sum of the ``K - f - 2`` smallest distances from update i to the others.
Krum outputs the update with the lowest score, written from its file once the distances are
known. Multi-Krum averages the ``m`` lowest-scored (FedAvg's weights), computed as the global model
plus the weighted sum of their deltas, one matrix-vector product per block, in the distances' pass.
Ties go to the smaller client id. Both need ``K > 2f + 2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedloom_core.learning.kernels import Opener, UpdateFile, fedavg_weights
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
from fedloom_core.learning.strategies.output import StreamedOutput
from fedloom_core.learning.strategies.params import ConfiguredStrategy
from fedloom_core.learning.strategies.specs import KRUM, MULTIKRUM
from fedloom_core.learning.strategies.streaming import canonical, is_float
from fedloom_core.learning.weights import mapped_tensors, save_state, structure

# Coordinates per float32 dot product (longer float32 sums lose more to rounding: a relative error
# of about 2e-4 over 65536 coordinates, 3e-6 over 1024, measured). Blocks are whole pieces.
PIECE = 1 << 10


def block_gram(rows: torch.Tensor) -> np.ndarray:
    """The Gram matrices of ``rows`` (K x n) over each piece of PIECE coordinates (the last one shorter),
    as a (pieces, K, K) float64 array whose upper triangle is set (the lower one is zero or mirrored).

    Float32 products and sums. The rows are split in two halves ``a`` and ``b``: the batched products
    ``a a^T``, ``a b^T`` and ``b b^T`` cover the upper triangle with 3/4 of the multiplications of ``X X^T``.
    """
    count, n = rows.shape
    half = (count + 1) // 2
    whole = n - n % PIECE
    out = np.zeros((whole // PIECE + (whole < n), count, count), dtype=np.float32)

    def fill(at: np.ndarray, part: torch.Tensor) -> None:
        a, b = part[:, :half], part[:, half:]
        at[:, :half, :half] = torch.bmm(a, a.transpose(1, 2)).numpy()
        if count > half:
            at[:, :half, half:] = torch.bmm(a, b.transpose(1, 2)).numpy()
            at[:, half:, half:] = torch.bmm(b, b.transpose(1, 2)).numpy()

    if whole:
        fill(out[: whole // PIECE], rows[:, :whole].reshape(count, whole // PIECE, PIECE).permute(1, 0, 2))
    if whole < n:
        fill(out[-1:], rows[None, :, whole:])
    return out.astype(np.float64)


def distances_from_gram(gram: np.ndarray) -> list[list[float]]:
    """Squared distances from a Gram matrix, symmetric bit for bit (from its upper triangle), zero diagonal."""
    upper = np.triu(gram)
    sym = upper + np.triu(upper, 1).T
    sq = np.diagonal(sym)
    dist = np.clip(sq[:, None] + sq[None, :] - 2.0 * sym, 0.0, None)
    np.fill_diagonal(dist, 0.0)
    return dist.tolist()


def pairwise_sq_distances(
    ordered: Sequence[UpdateFile], opener: Opener, global_path: Path, chunk: int
) -> list[list[float]]:
    """Squared L2 distances between the updates' floating-point tensors, as a symmetric K x K list of lists.

    Blocks run on ``blocks.run_blocks``'s threads, but every sum is taken in a fixed order (within a
    block, then block by block), so the same files give the same distances on every run.
    """
    expected = structure(global_path)
    gram = np.zeros((len(ordered), len(ordered)), dtype=np.float64)
    with open_mapped(ordered, opener, expected, reference=global_path) as files:
        for space in flat_spaces(expected):
            _Walk(space, files, chunk).run(gram)
    return distances_from_gram(gram)


@dataclass
class _Mean:
    """A selection (indices into the updates, client-id order) whose weighted mean is being written."""

    indices: list[int]
    weights: list[float]
    _runs: dict[torch.dtype, list[tuple[int, int, torch.Tensor]]] = field(default_factory=dict)

    def runs(self, dtype: torch.dtype) -> list[tuple[int, int, torch.Tensor]]:
        """``(lo, hi, w)``: the selection as runs of consecutive indices ``[lo, hi)``, each with its weights
        as a 1 x (hi - lo) matrix (rows left out are never multiplied, even by zero: they may hold NaN)."""
        if dtype not in self._runs:  # threads racing here compute the same value
            self._runs[dtype] = self._make_runs(dtype)
        return self._runs[dtype]

    def _make_runs(self, dtype: torch.dtype) -> list[tuple[int, int, torch.Tensor]]:
        out: list[tuple[int, int, torch.Tensor]] = []
        for position, index in enumerate(self.indices):
            if position and index == self.indices[position - 1] + 1:
                lo, _, _ = out[-1]
                out[-1] = (lo, index + 1, out[-1][2])
            else:
                out.append((index, index + 1, torch.empty(0)))
        taken = iter(self.weights)
        return [(lo, hi, torch.tensor([[next(taken) for _ in range(hi - lo)]], dtype=dtype)) for lo, hi, _ in out]


class _Walk:
    """Passes over one flat space of the K updates (``files[:K]``, the global model ``files[K]``): the Gram
    matrix of the deltas, and, once a selection is known, its weighted mean into ``output``, a window at a time.

    The mean of a block is the global model's values plus the weighted sum of the selected deltas, one
    matrix-vector product per run of consecutive selected updates (client-id order): the same operations
    on the same deltas whichever pass computes it, so the result never depends on when it was computed.
    """

    def __init__(
        self, space: FlatSpace, files: Sequence[MappedFile], chunk: int, output: StreamedOutput | None = None
    ) -> None:
        self.space, self.files, self.count, self.output = space, files, len(files) - 1, output
        itemsize = torch.empty((), dtype=space.work).element_size()
        # Blocks sized for K + 1 rows in the cache (not the 2 (K + 1) of scratch): fewer calls per block,
        # measured about 6% faster at K = 10 (65,536 coordinates instead of 32,768).
        self.block = min(block_size(self.count + 1, itemsize, chunk, minimum=PIECE), space.total)
        self.window = budget_window(chunk, self.block, self.count, 2 * (self.count + 1), mapped=self.count + 1)
        self.span = max(self.block, self.window - self.window % self.block)  # the windows run_blocks walks
        # One window's mean, written into ``output`` when the window is done.
        self.results = torch.empty(min(self.span, space.total) if output else 0, dtype=space.work)
        self.mean: _Mean | None = None
        self.covered: list[tuple[int, int]] = []  # windows whose mean is written

    def scratch(self) -> tuple[np.ndarray, np.ndarray]:
        # torch's allocator aligns to 64 bytes, so every matrix handed to BLAS is aligned the same
        # way on every run (BLAS kernels may sum differently for differently aligned data).
        shape, work = (self.count + 1, self.block), self.space.work
        return torch.empty(shape, dtype=work).numpy(), torch.empty(shape, dtype=work).numpy()

    def add_mean(self, start: int, stop: int, deltas: np.ndarray, base: np.ndarray, mean: _Mean) -> None:
        """The window's results for ``[start, stop)``: ``base + sum of w_i * deltas[i]`` over the selection."""
        n = stop - start
        acc = self.results[start % self.span : start % self.span + n].view(1, n)
        table = torch.from_numpy(deltas)
        for position, (lo, hi, weights) in enumerate(mean.runs(self.space.work)):
            if position == 0:
                torch.mm(weights, table[lo:hi, :n], out=acc)
            else:
                acc.addmm_(weights, table[lo:hi, :n])
        np.add(acc.numpy()[0], base, out=acc.numpy()[0])

    def run(
        self, gram: np.ndarray | None, guess: Callable[[], _Mean | None] | None = None, begin: int = 0, end: int = 0
    ) -> None:
        """Walk coordinates ``[begin, end or total)``: add the Gram matrix to ``gram`` (unless None), and the
        mean of ``self.mean`` where one is set; ``guess()`` may set it after each window."""
        count, block, window = self.count, self.block, self.window
        parts: list[np.ndarray] = [np.empty(0)] * math.ceil(window / block)
        active = [self.mean]

        def kernel(start: int, stop: int, own: tuple[np.ndarray, np.ndarray]) -> None:
            staging, deltas = own
            n, mean = stop - start, active[0]
            pieces = list(self.space.pieces(start, stop))
            wanted = range(count) if gram is not None else (mean.indices if mean else ())
            if not wanted:
                return
            base = self.files[count].block(pieces, staging[count, :n])
            for i in wanted:
                np.subtract(self.files[i].block(pieces, staging[i, :n]), base, out=deltas[i, :n])
            if gram is not None:
                parts[(start % window) // block] = block_gram(torch.from_numpy(deltas[:count, :n]))
            if mean is not None:
                self.add_mean(start, stop, deltas, base, mean)

        def done(start: int, stop: int) -> None:
            if gram is not None:  # every piece's Gram matrix added in piece order, whatever the blocks
                pieces = [gram[None], *parts[: math.ceil((stop - start) / block)]]
                np.add.reduce(np.concatenate(pieces), axis=0, out=gram)
            if active[0] is not None and self.output is not None:
                self.output.window(self.space, start, self.results.numpy()[: stop - start])
                self.covered.append((start, stop))
            if guess is not None and self.mean is None:
                self.mean = guess()
            active[0] = self.mean

        run_blocks(
            end or self.space.total, block, window, kernel, self.scratch, self.files, self.space, done, begin=begin
        )

    def fill(self) -> None:
        """Write the mean of ``self.mean`` over every window not yet covered."""
        done_at, position = sorted(self.covered), 0
        for start, stop in [*done_at, (self.space.total, self.space.total)]:
            if position < start:
                self.run(None, begin=position, end=start)
            position = max(position, stop)


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

    SPEC = MULTIKRUM

    def selected_count(self, count: int) -> int:
        """How many updates are averaged when there are ``count`` of them."""
        chosen = self.params["num_selected"]
        return count - self.params["num_byzantine"] if chosen is None else chosen

    def aggregate(self, ctx: AggregationContext) -> AggregateResult:
        """Score the updates, then write the (FedAvg-weighted) mean of the best ``num_selected`` of them.

        One pass computes the distances; the selection the first window's distances point to is
        averaged in the same pass, while the rows are in cache. When the final selection is that one,
        only the first window is read again; otherwise a second pass writes the final selection's mean.
        """
        ordered = canonical(ctx.updates)
        count, f = len(ordered), self.params["num_byzantine"]
        if count <= 2 * f + 2:
            raise ValueError(
                f"{self.name} with num_byzantine={f} needs more than 2 * {f} + 2 = {2 * f + 2} updates, got {count}"
            )
        chosen = self.selected_count(count)
        if chosen > count:
            raise ValueError(f"{self.name}: num_selected={chosen} is more than the {count} updates of the round")
        weighted = self.params.get("weighted", False)
        expected = structure(ctx.global_path)
        gram = np.zeros((count, count), dtype=np.float64)

        def select() -> tuple[list[int], dict[str, float]]:
            scores = krum_scores(ordered, distances_from_gram(gram), f)
            ranking = sorted(range(count), key=lambda i: (scores[ordered[i].client_id], ordered[i].client_id))
            return ranking[:chosen], scores

        def mean_of(indices: list[int]) -> _Mean:
            ids = sorted(indices)  # client-id order, as FedAvg folds
            return _Mean(ids, fedavg_weights([ordered[i] for i in ids], weighted))

        guesses: list[_Mean] = []

        def guess() -> _Mean:
            guesses.append(mean_of(select()[0]))
            return guesses[0]

        with open_mapped(ordered, ctx.opener, expected, reference=ctx.global_path) as files:
            spaces, chunk = flat_spaces(expected), self.params["chunk_elems"]
            if chosen == 1:  # the output is one update's tensors: written from its file once it is known
                for space in spaces:
                    _Walk(space, files, chunk).run(gram)
                ranked, scores = select()
                with mapped_tensors(files[ranked[0]].path) as tensors:
                    save_state({name: tensors[name] for name in expected}, ctx.out_path)
                return AggregateResult(info={"selected": [ordered[ranked[0]].client_id], "scores": scores})
            with StreamedOutput(ctx.out_path, expected) as output:
                walks = [_Walk(space, files, chunk, output) for space in spaces]
                for walk in walks:
                    walk.mean = guesses[0] if guesses else None
                    walk.run(gram, None if guesses else guess)
                ranked, scores = select()
                final = mean_of(ranked)
                for walk in walks:
                    if walk.mean is None or walk.mean.indices != final.indices:
                        walk.mean, walk.covered = final, []
                    walk.fill()
                for name, (dtype_text, _) in expected.items():
                    if not is_float(dtype_text):
                        output.tensor(name, files[final.indices[0]].whole(name))
        return AggregateResult(info={"selected": [ordered[i].client_id for i in ranked], "scores": scores})


class Krum(MultiKrum):
    """The single update with the lowest Krum score, unchanged."""

    SPEC = KRUM

    def selected_count(self, count: int) -> int:
        """Krum keeps exactly one update."""
        return 1
