"""Krum and Multi-Krum (Blanchard et al., 2017): keep the updates closest to their nearest neighbours.

The squared L2 distance between every pair of updates (all floating-point tensors together) is
accumulated chunk by chunk: a chunk of ``chunk_elems`` coordinates is gathered from all K
updates and the global model in float64, and the chunk's contribution to every distance comes
from one K x K Gram matrix of the deltas. State is the K x K distance matrix; memory about
``(K + 1) x chunk_elems x 8`` bytes plus, for the output, FedAvg's one model.

``score_i`` is the sum of the ``K - f - 2`` smallest distances from update i to the others.
Krum outputs the update with the lowest score; Multi-Krum averages the ``m`` lowest-scored.
Ties go to the smaller client id. Both need ``K > 2f + 2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from fedloom_core.learning.kernels import Opener, UpdateFile, fedavg
from fedloom_core.learning.strategies.base import AggregateResult, AggregationContext
from fedloom_core.learning.strategies.params import CHUNK_ELEMS, ConfiguredStrategy, Param
from fedloom_core.learning.strategies.streaming import canonical, is_float, open_all, ranges
from fedloom_core.learning.weights import structure

NUM_BYZANTINE = Param("num_byzantine", int, 0, "Number f of Byzantine updates to tolerate.", minimum=0)


def pairwise_sq_distances(
    ordered: Sequence[UpdateFile], opener: Opener, global_path: Path, chunk: int
) -> list[list[float]]:
    """Squared L2 distances between the updates' floating-point tensors, as a K x K list of lists.

    Per chunk, the updates' coordinates minus the global model's (the deltas, much smaller than the
    weights, so little is lost to cancellation) are gathered in float64 and the distances follow
    from their Gram matrix: ``|a - b|^2 = |a|^2 + |b|^2 - 2 a.b``.
    """
    count = len(ordered)
    expected = structure(global_path)
    dist = torch.zeros((count, count), dtype=torch.float64)
    with open_all(ordered, opener, expected, chunk, reference=global_path) as slices:
        for name, (dtype_text, shape) in expected.items():
            numel = math.prod(shape)
            if not is_float(dtype_text) or numel == 0:
                continue
            buffer = torch.empty((count + 1, min(chunk, numel)), dtype=torch.float64)
            for start, stop in ranges(numel, chunk):
                rows = buffer[:, : stop - start]
                slices.gather(name, start, stop, rows)
                deltas = rows[:count].sub_(rows[count])
                gram = deltas @ deltas.T
                sq = gram.diagonal()
                dist += (sq[:, None] + sq[None, :] - 2 * gram).clamp_(min=0.0)
            del buffer
    dist.fill_diagonal_(0.0)
    return dist.tolist()


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
