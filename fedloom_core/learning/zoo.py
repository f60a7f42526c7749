"""The model zoo: architectures a client trains and the server evaluates."""

from __future__ import annotations

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
    if seed is not None:
        torch.manual_seed(seed)
    model: nn.Module = CNN(input_shape, num_classes) if arch == "CNN" else MLP(input_shape, num_classes)
    return model


def parameters_count(model: nn.Module) -> int:
    """The number of scalar parameters in ``model``."""
    return sum(p.numel() for p in model.parameters())
