"""Known-malicious client behaviours, for tests and demonstrations of the defences.

``--attack`` takes one of:

- ``sign_flip`` or ``sign_flip:<s>``: upload global - s * (trained - global) (s defaults to 1);
- ``scale:<f>``: upload global + f * (trained - global);
- ``gaussian:<sigma>``: upload global + N(0, sigma^2) noise, without training;
- ``label_flip``: train on labels c -> (num_classes - 1 - c), upload honestly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedloom_core.learning.datasets import Split

KINDS = ("sign_flip", "scale", "gaussian", "label_flip")


@dataclass(frozen=True)
class Attack:
    kind: str
    factor: float = 1.0

    @property
    def trains(self) -> bool:
        """Whether the attacker trains at all (the gaussian attacker does not)."""
        return self.kind != "gaussian"


def parse_attack(spec: str) -> Attack:
    """Parse ``kind[:number]``; ValueError with the accepted forms otherwise."""
    kind, _, arg = spec.strip().partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown attack {spec!r}; use sign_flip[:s], scale:<f>, gaussian:<sigma> or label_flip")
    if kind == "label_flip":
        if arg:
            raise ValueError("label_flip takes no argument")
        return Attack(kind)
    if not arg:
        if kind == "sign_flip":
            return Attack(kind, 1.0)
        raise ValueError(f"{kind} needs a number, e.g. {kind}:10")
    try:
        factor = float(arg)
    except ValueError:
        raise ValueError(f"attack {spec!r}: {arg!r} is not a number") from None
    if kind == "gaussian" and factor < 0:
        raise ValueError("gaussian sigma must be >= 0")
    return Attack(kind, factor)


def poison_data(attack: Attack, data: Split, num_classes: int) -> Split:
    """The data the attacker trains on: labels flipped for label_flip, else unchanged."""
    if attack.kind == "label_flip":
        return Split(data.x, (num_classes - 1) - data.y)
    return data


def poison_update(
    attack: Attack, global_state: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], seed: int = 0
) -> dict[str, torch.Tensor]:
    """The weights the attacker uploads instead of ``trained``."""
    out: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(seed)
    for name, g in global_state.items():
        t = trained[name]
        if not t.is_floating_point():
            out[name] = t.clone()
        elif attack.kind == "sign_flip":
            out[name] = g - attack.factor * (t - g)
        elif attack.kind == "scale":
            out[name] = g + attack.factor * (t - g)
        elif attack.kind == "gaussian":
            out[name] = g + attack.factor * torch.randn(g.shape, generator=gen, dtype=g.dtype)
        else:
            out[name] = t.clone()
    return out
