"""Shared building blocks of the strategies: canonical order, structure checks and bounded-memory reads.

Two ways of reading updates keep memory bounded:

* one update at a time, as zero-copy memory maps (``mapped_tensors``): its pages are released
  when its map closes, before the next update is opened;
* K updates at once, a slice of coordinates at a time (``UpdateSlices``), for coordinate-wise
  rules such as the median. These use positioned reads (``os.preadv``) into one staging buffer
  rather than K memory maps: every page read through a live map stays resident and counts in the
  process's RSS until the map closes, so reading K maps to the end would cost K models of RSS.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from fedloom_core.learning.kernels import Opener, UpdateFile
from fedloom_core.learning.weights import TensorSpec, compare_structure, dtype_name, read_header, structure

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


class _PositionedFile:
    """One safetensors file, read a slice of a tensor at a time."""

    def __init__(self, path: str | Path) -> None:
        self.specs: dict[str, TensorSpec] = read_header(path)
        self._fd = os.open(path, os.O_RDONLY)

    def close(self) -> None:
        os.close(self._fd)

    def read(self, name: str, start: int, stop: int, staging: memoryview) -> int:
        """Read elements ``[start, stop)`` of tensor ``name`` (flattened) into ``staging``; return bytes read."""
        spec = self.specs[name]
        size = torch.empty((), dtype=_DTYPES[spec.dtype]).element_size()
        offset, nbytes = spec.begin + start * size, (stop - start) * size
        got = 0
        while got < nbytes:
            if hasattr(os, "preadv"):
                n = os.preadv(self._fd, [staging[got:nbytes]], offset + got)
            else:  # pragma: no cover - platforms without preadv
                data = os.pread(self._fd, nbytes - got, offset + got)
                staging[got : got + len(data)] = data
                n = len(data)
            if n == 0:
                raise ValueError(f"tensor {name!r} is cut short in its file")
            got += n
        return nbytes


class UpdateSlices:
    """K update files open at once, from which the same coordinates of a tensor are gathered together."""

    def __init__(self, files: Sequence[_PositionedFile], max_chunk: int) -> None:
        self._files = files
        # Room for max_chunk elements of the widest dtype (8 bytes).
        self._staging = torch.empty(max_chunk * 8, dtype=torch.uint8)
        self._view = memoryview(self._staging.numpy())

    def __len__(self) -> int:
        return len(self._files)

    def gather(self, name: str, start: int, stop: int, rows: torch.Tensor) -> None:
        """Write elements ``[start, stop)`` of tensor ``name`` of update ``i`` into ``rows[i]`` (any dtype)."""
        for i in range(len(self._files)):
            self.gather_one(i, name, start, stop, rows[i])

    def whole(self, index: int, name: str) -> torch.Tensor:
        """The whole tensor ``name`` of update ``index`` (for the small integer tensors)."""
        spec = self._files[index].specs[name]
        out = torch.empty(spec.shape, dtype=_DTYPES[spec.dtype])
        flat = out.view(-1)
        for start, stop in ranges(flat.numel(), self._staging.numel() // 8):
            self.gather_one(index, name, start, stop, flat[start:stop])
        return out

    def gather_one(self, index: int, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Write elements ``[start, stop)`` of tensor ``name`` of update ``index`` into ``out``."""
        file = self._files[index]
        nbytes = file.read(name, start, stop, self._view)
        dtype = _DTYPES[file.specs[name].dtype]
        raw = self._staging[:nbytes]
        if torch.bfloat16 in (dtype, out.dtype):
            out.copy_(raw.view(dtype))
        else:
            # numpy's single-threaded copy: torch's copy_ into a strided column runs a parallel region
            # per call, which stalls badly when the cores are busy with other work.
            np.copyto(out.numpy(), raw.numpy().view(_NUMPY[dtype]), casting="unsafe")


@contextmanager
def open_all(
    ordered: Sequence[UpdateFile],
    opener: Opener,
    expected: Structure,
    max_chunk: int,
    reference: str | Path | None = None,
) -> Iterator[UpdateSlices]:
    """Open every update (in the given order) for gathering, after checking each against ``expected``.

    ``reference`` (a local file, e.g. the global model) is opened after the updates, as row K.
    Each update stays materialised by ``opener`` (for example downloaded) while the block runs,
    so this needs K files of disk, but only ``max_chunk`` elements of staging memory.
    """
    with ExitStack() as stack:
        files = []
        sources = [(u.client_id, stack.enter_context(opener(u))) for u in ordered]
        if reference is not None:
            sources.append(("the reference model", reference))
        for client_id, path in sources:
            check_structure(client_id, path, expected)
            file = _PositionedFile(path)
            stack.callback(file.close)
            files.append(file)
        yield UpdateSlices(files, max_chunk)


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
