"""Plain averaging: FedAvg, FedProx, and the streaming mean the server optimizers start from."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedloom_core.learning.kernels import Opener, UpdateFile, fedavg
from fedloom_core.learning.strategies.base import AggregateResult, AggregationContext
from fedloom_core.learning.strategies.params import ConfiguredStrategy
from fedloom_core.learning.strategies.specs import FEDAVG, FEDPROX
from fedloom_core.learning.strategies.streaming import Structure, canonical, check_structure, work_dtype
from fedloom_core.learning.weights import mapped_tensors


class FedAvg(ConfiguredStrategy):
    """The (sample-weighted) mean of the updates, folded one update at a time in client-id order."""

    SPEC = FEDAVG

    def aggregate(self, ctx: AggregationContext) -> AggregateResult:
        """Write the mean of the updates (``aggregation.fedavg``)."""
        ordered = canonical(ctx.updates)
        fedavg(ordered, ctx.out_path, weighted=self.params["weighted"], opener=ctx.opener)
        return AggregateResult()


class FedProx(FedAvg):
    """FedAvg on the server; each client adds ``mu/2 * |w - w_global|^2`` to its local loss."""

    SPEC = FEDPROX

    def configure_round(self, round: int, client_ids: Sequence[str]) -> Mapping[str, Mapping[str, Any]]:
        """Send ``proximal_mu`` to every selected client."""
        return {cid: {"proximal_mu": self.params["mu"]} for cid in client_ids}


def mean_of_updates(
    ordered: Sequence[UpdateFile], weights: Sequence[float], opener: Opener, expected: Structure
) -> dict[str, torch.Tensor]:
    """The weighted mean of the updates' floating-point tensors, in float32 (float64 for float64 tensors).

    Folded like ``aggregation.fedavg`` (zeros, then ``add_(update, alpha=weight)`` in the given
    order), so for float32 models the values are bit-identical to FedAvg's. Integer tensors are
    the first update's. Each update is checked against the global model's ``expected`` structure.
    """
    acc: dict[str, torch.Tensor] = {}
    for update, weight in zip(ordered, weights, strict=True):
        with opener(update) as path:
            check_structure(update.client_id, path, expected)
            with mapped_tensors(path) as tensors:
                for name, t in tensors.items():
                    if t.is_floating_point():
                        if name not in acc:
                            acc[name] = torch.zeros(t.shape, dtype=work_dtype(t.dtype))
                        acc[name].add_(t, alpha=weight)
                    elif name not in acc:
                        acc[name] = t.clone()
                del tensors
    return acc
