"""NormClipping: bound each update's influence, then aggregate with any other strategy.

Each update's delta from the global model (all floating-point tensors together) is scaled by
``min(1, max_norm / |delta|)``. Clipped updates are written, one at a time, as full models
(``global + scaled delta``) to a temporary directory beside ``ctx.out_path``; the inner strategy
then aggregates the clipped copies and the untouched updates. When ``ctx.opener`` fetches
updates from elsewhere, the untouched ones are copied there too, so each is fetched once.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fedloom_core.learning.kernels import UpdateFile, open_path
from fedloom_core.learning.strategies.base import AggregateResult, AggregationContext
from fedloom_core.learning.strategies.dp import clip_scale
from fedloom_core.learning.strategies.params import REGISTRY, ConfiguredStrategy
from fedloom_core.learning.strategies.specs import INNER_STRATEGIES as INNER_STRATEGIES
from fedloom_core.learning.strategies.specs import NORMCLIPPING
from fedloom_core.learning.strategies.streaming import canonical, check_structure, delta_sq_norm, work_dtype
from fedloom_core.learning.weights import mapped_tensors, save_state, structure


def clipped_copy(
    update: Mapping[str, torch.Tensor], global_tensors: Mapping[str, torch.Tensor], scale: float
) -> dict[str, torch.Tensor]:
    """``global + scale * (update - global)`` for floating-point tensors; integer tensors unchanged."""
    out = {}
    for name, g in global_tensors.items():
        t = update[name]
        if not g.is_floating_point():
            out[name] = t.clone()
            continue
        wd = work_dtype(g.dtype)
        delta = t.to(wd) - g.to(wd)
        out[name] = delta.mul_(scale).add_(g).to(g.dtype)
    return out


class NormClipping(ConfiguredStrategy):
    """Clip every update's delta to L2 norm ``max_norm``, then aggregate with the ``inner`` strategy."""

    SPEC = NORMCLIPPING

    def __init__(self, **params: Any) -> None:
        # The spec checks NormClipping's own parameters and the inner strategy's (its values are in self.params).
        super().__init__(**params)
        inner_cls = REGISTRY[self.params["inner"]]
        inner_names = {p.name for p in inner_cls.PARAMS}
        self.inner: ConfiguredStrategy = inner_cls(**{k: v for k, v in self.params.items() if k in inner_names})

    def configure_round(self, round: int, client_ids: Sequence[str]) -> Mapping[str, Mapping[str, Any]]:
        """The inner strategy's client settings (e.g. FedProx's ``proximal_mu``)."""
        return self.inner.configure_round(round, client_ids)

    def aggregate(self, ctx: AggregationContext) -> AggregateResult:
        """Clip the updates into a temporary directory, then run the inner strategy on them."""
        ordered = canonical(ctx.updates)
        max_norm = self.params["max_norm"]
        expected = structure(ctx.global_path)
        local_files = ctx.opener is open_path
        norms: dict[str, float] = {}
        clipped: list[str] = []
        with tempfile.TemporaryDirectory(prefix="fedloom-clip-", dir=Path(ctx.out_path).parent) as tmp:
            prepared: list[UpdateFile] = []
            with mapped_tensors(ctx.global_path) as global_tensors:
                for index, update in enumerate(ordered):
                    target = Path(tmp) / f"{index:06d}.safetensors"
                    with ctx.opener(update) as path:
                        check_structure(update.client_id, path, expected)
                        with mapped_tensors(path) as tensors:
                            norm = math.sqrt(delta_sq_norm(tensors, global_tensors))
                            norms[update.client_id] = norm
                            scale = clip_scale(norm, max_norm)
                            if scale < 1.0:
                                save_state(clipped_copy(tensors, global_tensors, scale), target)
                                clipped.append(update.client_id)
                            del tensors
                        if scale == 1.0 and not local_files:
                            shutil.copyfile(path, target)
                    if scale == 1.0 and local_files:
                        prepared.append(update)
                    else:
                        prepared.append(UpdateFile(update.client_id, target, update.num_samples))
            result = self.inner.aggregate(replace(ctx, updates=prepared, opener=open_path))
        info = {**result.info, "clipped": clipped, "norms": norms, "max_norm": max_norm}
        return AggregateResult(wrote_state=result.wrote_state, info=info)
