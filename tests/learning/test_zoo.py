"""Seeded initial weights: the same bytes whatever else the process draws from torch's global generator."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from fedloom_core.learning.zoo import build_model, seeded_init

SHAPES = [("CNN", (8, 8, 1), 10), ("CNN", (32, 32, 3), 10), ("MLP", (8, 8, 1), 10)]


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize(("arch", "shape", "classes"), SHAPES)
def test_seeded_weights_are_torch_manual_seed_ones(arch: str, shape: tuple, classes: int) -> None:
    """The values torch's own initialisation gives after ``torch.manual_seed`` (what earlier runs stored)."""
    torch.manual_seed(3)
    reference = build_model(arch, shape, classes)
    assert _same(build_model(arch, shape, classes, seed=3), reference)
    assert not _same(build_model(arch, shape, classes, seed=4), reference)


def test_seeded_weights_ignore_other_threads_drawing_from_the_global_generator() -> None:
    """The worker warms up (builds and evaluates a model) while an experiment's initial model is made:
    those draws from torch's global generator must not reach the seeded weights."""
    reference = build_model("CNN", (8, 8, 1), 10, seed=0)
    stop = threading.Event()

    def draw() -> None:
        while not stop.is_set():
            torch.rand(256)
            build_model("MLP", (8, 8, 1), 10)

    threads = [threading.Thread(target=draw) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        built = [build_model("CNN", (8, 8, 1), 10, seed=0) for _ in range(30)]
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert all(_same(m, reference) for m in built)


def test_a_layer_without_a_seeded_initialisation_is_refused() -> None:
    with pytest.raises(TypeError, match="BatchNorm1d"):
        seeded_init(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), 0)
