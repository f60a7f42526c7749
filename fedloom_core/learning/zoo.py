"""The model zoo: architectures a client trains and the server evaluates."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fedloom_core.learning.catalog import canonical_architecture


class CNN(nn.Module):
    """A small convolutional network for images of any ``(height, width, channels)``."""

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        height, width, channels = (int(v) for v in input_shape)
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2) if min(height, width) >= 8 else nn.Identity(),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """A two-layer perceptron over the flattened input."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        size = 1
        for v in input_shape:
            size *= int(v)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(size, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_model(architecture: str, input_shape: Sequence[int], num_classes: int, seed: int | None = None) -> nn.Module:
    """A fresh model; with ``seed`` its initial weights are reproducible."""
    arch = canonical_architecture(architecture)
    model: nn.Module = CNN(input_shape, num_classes) if arch == "CNN" else MLP(input_shape, num_classes)
    if seed is not None:
        seeded_init(model, seed)
    return model


def seeded_init(model: nn.Module, seed: int) -> None:
    """Draw ``model``'s initial weights again from a generator of its own seeded with ``seed``.

    The same values as ``torch.manual_seed(seed)`` before building it, but torch's global generator is
    shared by every thread of the process: a worker building or evaluating another model meanwhile (its
    warm-up, an API request in the same process) drew from it and changed the initial weights.
    """
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            # torch's default for both layers: kaiming-uniform weights, biases uniform in +-1/sqrt(fan_in).
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=gen)
            if module.bias is not None:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(module.bias, -bound, bound, generator=gen)
        elif any(True for _ in module.parameters(recurse=False)):
            raise TypeError(f"no seeded initialisation for {type(module).__name__}")


def parameters_count(model: nn.Module) -> int:
    """The number of scalar parameters in ``model``."""
    return sum(p.numel() for p in model.parameters())
