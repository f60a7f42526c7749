"""Measuring a round's updates against the global model: delta norms and cosine similarity.

Two streaming passes over the updates, so memory stays at about two models whatever their
number: the first sums the deltas (update - global) and their norms, the second takes each
delta's dot product with that sum, from which the similarity to the mean of the *other* deltas
follows without materialising it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedloom_core.learning.kernels import Opener, UpdateFile, open_path
from fedloom_core.learning.weights import mapped_tensors


@dataclass(frozen=True)
class UpdateStats:
    client_id: str
    # L2 norm of the update's delta from the global model (all float tensors together).
    norm: float
    # norm / median norm of the round's updates.
    norm_ratio: float
    # Cosine similarity of the delta to the mean delta of the other updates (1.0 when alone).
    cosine_similarity: float


def _deltas(global_tensors: dict[str, torch.Tensor], update: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
    for name, g in global_tensors.items():
        if g.is_floating_point():
            yield name, update[name].to(torch.float64) - g.to(torch.float64)


def measure_updates(global_path, updates: Sequence[UpdateFile], opener: Opener = open_path) -> dict[str, UpdateStats]:  # type: ignore[no-untyped-def]
    """Norm, norm ratio and cosine similarity of each update's delta (canonical client-id order)."""
    ordered = sorted(updates, key=lambda u: u.client_id)
    if not ordered:
        return {}
    with mapped_tensors(global_path) as global_tensors:
        total: dict[str, torch.Tensor] = {}
        sq_norms: dict[str, float] = {}
        for update in ordered:
            with opener(update) as path, mapped_tensors(path) as tensors:
                sq = 0.0
                for name, delta in _deltas(global_tensors, tensors):
                    sq += float(delta.pow(2).sum())
                    if name in total:
                        total[name].add_(delta)
                    else:
                        total[name] = delta.clone()
                sq_norms[update.client_id] = sq
        total_sq = sum(float(t.pow(2).sum()) for t in total.values())
        dots: dict[str, float] = {}
        for update in ordered:
            with opener(update) as path, mapped_tensors(path) as tensors:
                dots[update.client_id] = sum(
                    float((delta * total[name]).sum()) for name, delta in _deltas(global_tensors, tensors)
                )
    norms = {cid: math.sqrt(sq) for cid, sq in sq_norms.items()}
    median = _median(list(norms.values()))
    stats = {}
    for cid, norm in norms.items():
        # The other deltas sum to S - d: |S - d|^2 = |S|^2 - 2 d.S + |d|^2, and d.(S - d) = d.S - |d|^2.
        others_sq = max(total_sq - 2 * dots[cid] + sq_norms[cid], 0.0)
        if len(ordered) == 1 or norm == 0.0 or others_sq == 0.0:
            cosine = 1.0
        else:
            cosine = (dots[cid] - sq_norms[cid]) / (norm * math.sqrt(others_sq))
        ratio = norm / median if median > 0 else (1.0 if norm == 0 else math.inf)
        stats[cid] = UpdateStats(cid, norm, ratio, max(-1.0, min(1.0, cosine)))
    return stats


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
