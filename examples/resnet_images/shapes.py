"""Generated images of coloured shapes (circle, square, triangle) on a noisy background, 16x16 RGB."""

from __future__ import annotations

import torch

SIZE = 16
CLASSES = ("circle", "square", "triangle")


def make_images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images (N, 3, SIZE, SIZE) in [0, 1] and their labels, from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    images = torch.rand(count, 3, SIZE, SIZE, generator=gen) * 0.3
    labels = torch.randint(len(CLASSES), (count,), generator=gen)
    for i in range(count):
        r = int(torch.randint(3, 6, (1,), generator=gen))
        cy, cx = (int(v) for v in torch.randint(r, SIZE - r, (2,), generator=gen))
        dy, dx = rows - cy, cols - cx
        if labels[i] == 0:
            mask = dy**2 + dx**2 <= r**2
        elif labels[i] == 1:
            mask = (dy.abs() <= r) & (dx.abs() <= r)
        else:
            mask = (dy <= r) & (dy >= -r) & (dx.abs() <= (dy + r) / 2)
        colour = 0.5 + 0.5 * torch.rand(3, 1, generator=gen)
        images[i][:, mask] = colour
    return images, labels
