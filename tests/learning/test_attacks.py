"""The attack harness does exactly what it says, so defence tests measure real attacks."""

from __future__ import annotations

import pytest
import torch

from fedloom_core.learning.attacks import parse_attack, poison_data, poison_update
from fedloom_core.learning.datasets import Split

G = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor([3])}
T = {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor([4])}


def test_sign_flip_scaled() -> None:
    out = poison_update(parse_attack("sign_flip:10"), G, T)
    assert torch.equal(out["w"], torch.tensor([-9.0, 11.0]))  # 1 - 10 * (±1)
    assert torch.equal(out["n"], torch.tensor([4]))
    assert torch.equal(poison_update(parse_attack("sign_flip"), G, T)["w"], torch.tensor([0.0, 2.0]))


def test_scale_and_gaussian() -> None:
    assert torch.equal(poison_update(parse_attack("scale:3"), G, T)["w"], torch.tensor([4.0, -2.0]))
    noisy = poison_update(parse_attack("gaussian:0.5"), {"w": torch.zeros(20000)}, {"w": torch.zeros(20000)}, seed=1)
    assert abs(float(noisy["w"].std()) - 0.5) < 0.02
    assert not parse_attack("gaussian:1").trains


def test_label_flip() -> None:
    data = Split(torch.zeros(3, 1, 2, 2), torch.tensor([0, 4, 9]))
    assert poison_data(parse_attack("label_flip"), data, 10).y.tolist() == [9, 5, 0]
    assert poison_update(parse_attack("label_flip"), G, T)["w"].tolist() == [2.0, 0.0]


@pytest.mark.parametrize("spec", ["bogus", "scale", "scale:x", "gaussian:-1", "label_flip:2"])
def test_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_attack(spec)
