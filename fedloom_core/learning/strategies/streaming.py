"""Shared building blocks of the strategies: canonical order, structure checks, dtypes and norms.

Updates are read one at a time as zero-copy memory maps (``mapped_tensors``), whose pages are
released when the map closes, or K at a time one window of coordinates at a time
(``blocks.MappedFile``), for the coordinate-wise rules and Krum's distances.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import torch

from fedloom_core.learning.kernels import UpdateFile
from fedloom_core.learning.weights import compare_structure, dtype_name, structure

Structure = dict[str, tuple[str, tuple[int, ...]]]

_DTYPES = {
    dtype_name(d): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}
_NUMPY = {d: torch.empty((), dtype=d).numpy().dtype for d in _DTYPES.values() if d != torch.bfloat16}
_FLOAT_NAMES = {name for name, d in _DTYPES.items() if d.is_floating_point}

# Elements per block when a whole tensor is walked in float64 (norms of deltas).
NORM_BLOCK = 1 << 20


def canonical(updates: Sequence[UpdateFile]) -> list[UpdateFile]:
    """The updates sorted by client id; ValueError when there are none or a client appears twice."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    ordered = sorted(updates, key=lambda u: u.client_id)
    for before, after in zip(ordered, ordered[1:], strict=False):
        if before.client_id == after.client_id:
            raise ValueError(f"client {before.client_id!r} has more than one update in the round")
    return ordered


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype floating-point arithmetic is done in: float64 for float64 tensors, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_float(dtype_text: str) -> bool:
    """Whether a safetensors dtype name (``F32``, ``I64``...) is a floating-point type."""
    return dtype_text in _FLOAT_NAMES


def torch_dtype(dtype_text: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    return _DTYPES[dtype_text]


def check_structure(client_id: str, path: str | Path, expected: Structure) -> None:
    """Raise ValueError unless the update at ``path`` has the global model's tensors, shapes and dtypes."""
    problems = compare_structure(structure(path), expected)
    if problems:
        raise ValueError(f"update of {client_id} does not match the global model: {'; '.join(problems)}")


def ranges(numel: int, chunk: int) -> Iterator[tuple[int, int]]:
    """Consecutive ``(start, stop)`` ranges of at most ``chunk`` elements covering ``range(numel)``."""
    for start in range(0, numel, chunk):
        yield start, min(start + chunk, numel)


def floor_fraction(fraction: float, count: int) -> int:
    """``floor(fraction * count)`` with ``fraction`` read as the decimal it was written as (0.29 * 100 = 29)."""
    return int(Fraction(repr(fraction)) * count)


def generator_for(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` taken modulo 2**64, so any Python int is accepted."""
    return torch.Generator().manual_seed(seed % (1 << 64))


def delta_sq_norm(update: dict[str, torch.Tensor], global_tensors: dict[str, torch.Tensor]) -> float:
    """Squared L2 norm of ``update - global`` over all floating-point tensors, summed in float64 blocks."""
    total = 0.0
    for name, g in global_tensors.items():
        if not g.is_floating_point():
            continue
        u_flat, g_flat = update[name].reshape(-1), g.reshape(-1)
        for start, stop in ranges(g_flat.numel(), NORM_BLOCK):
            d = u_flat[start:stop].to(torch.float64) - g_flat[start:stop].to(torch.float64)
            total += float(torch.dot(d, d))
    return total
