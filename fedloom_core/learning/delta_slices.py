"""Deltas of several models from a base model, a slice of coordinates at a time, in float64.

Round statistics (norms, dot products, cosines) need every update's delta at each coordinate, but
not all coordinates at once: working on ``SLICE_ELEMS`` coordinates of every update together holds
``K x SLICE_ELEMS`` float64 values, and each slice's mapped pages are dropped once it is read, so a
1 GB model's round is measured in tens of MB instead of several model sizes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from fedloom_core.learning.kernels import release_pages

# Coordinates per slice: 1M float64 values (8 MB) per model.
SLICE_ELEMS = 1 << 20


def delta_slices(
    base: Mapping[str, torch.Tensor],
    others: list[Mapping[str, torch.Tensor]],
    names: Iterable[str] | None = None,
    slice_elems: int = SLICE_ELEMS,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, D)`` with ``D[k] = others[k][name] - base[name]`` over one slice of coordinates, in float64.

    ``names`` (default: ``base``'s floating-point tensors, in its order) must be in every model. The
    mapped pages of each slice are released after it is yielded: callers read ``D`` before moving on.
    """
    chosen = [n for n, t in base.items() if t.is_floating_point()] if names is None else list(names)
    for name in chosen:
        flat_base = base[name].reshape(-1)
        flats = [other[name].reshape(-1) for other in others]
        total = flat_base.numel()
        for start in range(0, total, slice_elems):
            end = min(start + slice_elems, total)
            block = torch.empty((len(flats), end - start), dtype=torch.float64)
            for row, flat in zip(block, flats, strict=True):
                row.copy_(flat[start:end])
            block -= flat_base[start:end].to(torch.float64)
            yield name, block
            for flat in (flat_base, *flats):
                release_pages(flat[start:end])
