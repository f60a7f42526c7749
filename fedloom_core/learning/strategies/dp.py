"""DPFedAvg: central differential privacy with fixed clipping (McMahan et al., 2018; Andrew et al., 2021).

Each update's delta from the global model is clipped to L2 norm ``clip_norm`` (C), the clipped
deltas are averaged unweighted over the K updates, and Gaussian noise of standard deviation
``noise_multiplier * C / K`` is added to every coordinate of that average:

    new = global + (1/K) sum_i delta_i * min(1, C / |delta_i|) + N(0, (z C / K)^2)

The noise comes from a ``torch.Generator`` seeded with ``ctx.seed``, drawn tensor by tensor in
sorted tensor-name order, so a retried round writes the same bytes. It is a research-grade
mechanism: the generator is not a cryptographic one, and privacy accounting (epsilon, delta
over the rounds, which also depends on how clients are sampled) is left to the caller.
"""

from __future__ import annotations

import math

import torch

from fedloom_core.learning.strategies.base import AggregateResult, AggregationContext
from fedloom_core.learning.strategies.params import ConfiguredStrategy
from fedloom_core.learning.strategies.specs import DPFEDAVG
from fedloom_core.learning.strategies.streaming import (
    canonical,
    check_structure,
    delta_sq_norm,
    generator_for,
    work_dtype,
)
from fedloom_core.learning.weights import mapped_tensors, save_state, structure


def clip_scale(norm: float, max_norm: float) -> float:
    """The factor ``min(1, max_norm / norm)`` that brings a delta of L2 norm ``norm`` within ``max_norm``."""
    return max_norm / norm if norm > max_norm else 1.0


class DPFedAvg(ConfiguredStrategy):
    """Unweighted mean of clipped deltas plus Gaussian noise of std ``noise_multiplier * clip_norm / K``."""

    SPEC = DPFEDAVG

    def aggregate(self, ctx: AggregationContext) -> AggregateResult:
        """Fold the clipped deltas in client-id order, then add the seeded noise."""
        ordered = canonical(ctx.updates)
        count = len(ordered)
        clip_norm, multiplier = self.params["clip_norm"], self.params["noise_multiplier"]
        expected = structure(ctx.global_path)
        acc: dict[str, torch.Tensor] = {}
        with mapped_tensors(ctx.global_path) as global_tensors:
            for update in ordered:
                with ctx.opener(update) as path:
                    check_structure(update.client_id, path, expected)
                    with mapped_tensors(path) as tensors:
                        scale = clip_scale(math.sqrt(delta_sq_norm(tensors, global_tensors)), clip_norm)
                        for name, g in global_tensors.items():
                            if not g.is_floating_point():
                                acc.setdefault(name, tensors[name].clone())
                                continue
                            wd = work_dtype(g.dtype)
                            delta = tensors[name].to(wd) - g.to(wd)
                            if name not in acc:
                                acc[name] = torch.zeros(g.shape, dtype=wd)
                            acc[name].add_(delta, alpha=scale / count)
                            del delta
                        del tensors
            std = multiplier * clip_norm / count
            generator = generator_for(ctx.seed)
            result: dict[str, torch.Tensor] = {}
            for name in sorted(global_tensors):
                g = global_tensors[name]
                if not g.is_floating_point():
                    result[name] = acc.pop(name)
                    continue
                new = acc.pop(name).add_(g)
                if std > 0:
                    new.add_(torch.randn(g.shape, generator=generator, dtype=new.dtype), alpha=std)
                result[name] = new.to(g.dtype)
        save_state(result, ctx.out_path)
        # Only the mechanism's settings: which updates were clipped, or their norms, would leak data.
        return AggregateResult(info={"noise_multiplier": multiplier, "noise_std": std, "clip_norm": clip_norm})
