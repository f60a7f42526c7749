"""K update files read together, a block of coordinates at a time, with memory bounded by a window.

The floating-point tensors of a model are laid end to end in one flat coordinate space per work
dtype (float32, or float64 for float64 tensors), in the order the safetensors format stores them
(by dtype, then by name), so a window of the space is usually one contiguous run of bytes in every
file. Each window's runs are memory-mapped on their own and unmapped when the window is done: a
block of coordinates is then a zero-copy view of the map, and the process never holds more than
about ``K x window`` elements of the files (the kernel maps whole page-cache folios around a
fault, up to 2 MiB, but never beyond a mapping, so a map of the whole file would hold more). A
block that spans tensors, or whose file dtype differs from the work dtype, is copied into a
staging row.

``run_blocks`` spreads a window's blocks over a few threads: the kernels (numpy ufuncs, BLAS)
release the GIL, and threads that take the next block when they are free keep going when
another process holds one of the cores, where a parallel region would wait for it.
"""

from __future__ import annotations

import bisect
import itertools
import math
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedloom_core.learning.kernels import Opener, UpdateFile
from fedloom_core.learning.strategies.streaming import Structure, check_structure, torch_dtype, work_dtype
from fedloom_core.learning.weights import TensorSpec, read_header

# The order in which safetensors lays out tensors by dtype (see weights.save_state).
_LAYOUT_RANK = {n: i for i, n in enumerate(("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "I8", "U8", "BOOL"))}
# numpy has no bfloat16: its bits are mapped as int16 and converted through torch.
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.int16}
# Byte runs of a window closer than this are mapped together (the gap costs address space only).
_JOIN_GAP = 64 << 10


@dataclass(frozen=True)
class FlatSpace:
    """The floating-point tensors of one work dtype laid end to end."""

    work: torch.dtype
    # (name, first coordinate in the space, number of elements), in layout order.
    tensors: tuple[tuple[str, int, int], ...]
    total: int
    _firsts: list[int] = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._firsts.extend(first for _, first, _ in self.tensors)

    @property
    def numpy_dtype(self) -> type:
        return np.float64 if self.work == torch.float64 else np.float32

    def pieces(self, start: int, stop: int) -> Iterator[tuple[str, int, int, int]]:
        """``(name, begin, end, at)``: elements ``[begin, end)`` of tensor ``name`` are coordinates ``at...``."""
        index = bisect.bisect_right(self._firsts, start) - 1
        while index < len(self.tensors):
            name, first, numel = self.tensors[index]
            if first >= stop:
                break
            begin, end = max(start, first) - first, min(stop, first + numel) - first
            yield name, begin, end, first + begin
            index += 1

    def unflatten(self, flat: torch.Tensor, expected: Structure) -> dict[str, torch.Tensor]:
        """The tensors of ``flat`` (this space's values) in their own shapes and dtypes."""
        out = {}
        for name, first, numel in self.tensors:
            dtype_text, shape = expected[name]
            part = flat[first : first + numel].view(shape)
            dtype = torch_dtype(dtype_text)
            out[name] = part if dtype == self.work else part.to(dtype)
        return out


def flat_spaces(expected: Structure) -> list[FlatSpace]:
    """One flat space per work dtype over the non-empty floating-point tensors of ``expected``."""
    grouped: dict[torch.dtype, list[tuple[str, int, int]]] = {}
    ordered = sorted(expected.items(), key=lambda kv: (_LAYOUT_RANK.get(kv[1][0], len(_LAYOUT_RANK)), kv[0]))
    for name, (dtype_text, shape) in ordered:
        dtype = torch_dtype(dtype_text)
        numel = math.prod(shape)
        if not dtype.is_floating_point or numel == 0:
            continue
        members = grouped.setdefault(work_dtype(dtype), [])
        first = members[-1][1] + members[-1][2] if members else 0
        members.append((name, first, numel))
    return [FlatSpace(work, tuple(members), members[-1][1] + members[-1][2]) for work, members in grouped.items()]


class MappedFile:
    """One safetensors file, from which a window of a flat space at a time is memory-mapped and read."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.specs: dict[str, TensorSpec] = read_header(path)
        self._fd = os.open(path, os.O_RDONLY)
        self._size = os.fstat(self._fd).st_size
        # The current window's maps: first byte of each (sorted), and (map, its bytes as numpy).
        self._starts: list[int] = []
        self._maps: list[tuple[mmap.mmap, np.ndarray]] = []
        # When the window is one run of the work dtype's bytes: its values, and the coordinate they start at.
        self._flat: np.ndarray | None = None
        self._flat_at = 0

    def close(self) -> None:
        self.leave()
        os.close(self._fd)

    def _bytes(self, name: str, begin: int, end: int) -> tuple[int, int]:
        spec = self.specs[name]
        size = (spec.end - spec.begin) // math.prod(spec.shape)
        return spec.begin + begin * size, spec.begin + end * size

    def enter(self, space: FlatSpace, start: int, stop: int) -> None:
        """Map the bytes holding coordinates ``[start, stop)`` of ``space`` (one map per run of bytes)."""
        self.leave()
        spans = [(self._bytes(name, begin, end), name) for name, begin, end, _ in space.pieces(start, stop)]
        runs: list[list[int]] = []
        for lo, hi in sorted(span for span, _ in spans):
            if runs and lo <= runs[-1][1] + _JOIN_GAP:
                runs[-1][1] = max(runs[-1][1], hi)
            else:
                runs.append([lo, hi])
        for lo, hi in runs:
            first = lo - lo % mmap.ALLOCATIONGRANULARITY
            view = mmap.mmap(self._fd, hi - first, offset=first, access=mmap.ACCESS_COPY)
            self._starts.append(first)
            self._maps.append((view, np.frombuffer(view, dtype=np.uint8)))
        dtype = np.dtype(space.numpy_dtype)
        lo, hi = spans[0][0][0], spans[-1][0][1]
        if (
            len(runs) == 1
            and lo % dtype.itemsize == 0
            and all(np.dtype(_NUMPY[self.specs[name].dtype]) == dtype for _, name in spans)
            and all(before[0][1] == after[0][0] for before, after in zip(spans, spans[1:], strict=False))
        ):
            self._flat, self._flat_at = self._maps[0][1][lo - self._starts[0] : hi - self._starts[0]].view(dtype), start

    def leave(self) -> None:
        """Unmap the current window (its pages stay in the page cache)."""
        maps, self._maps, self._starts, self._flat = self._maps, [], [], None
        for view, data in maps:
            del data
            try:
                view.close()
            except BufferError:  # a block view is still alive; the map closes with the last of them
                pass

    def piece(self, name: str, begin: int, end: int) -> np.ndarray:
        """Elements ``[begin, end)`` of tensor ``name``, within the current window, as a numpy view (a copy
        if misaligned); bfloat16 comes as its int16 bits."""
        lo, hi = self._bytes(name, begin, end)
        index = bisect.bisect_right(self._starts, lo) - 1
        data = self._maps[index][1][lo - self._starts[index] : hi - self._starts[index]]
        dtype = np.dtype(_NUMPY[self.specs[name].dtype])
        return (data if lo % dtype.itemsize == 0 else data.copy()).view(dtype)

    def block(self, pieces: Sequence[tuple[str, int, int, int]], staging: np.ndarray) -> np.ndarray:
        """The coordinates of ``pieces`` (``FlatSpace.pieces`` of one block in the current window): a view
        of the map when one tensor of the work dtype holds them all, else copied into ``staging``."""
        start = pieces[0][3]
        if self._flat is not None:
            at = start - self._flat_at
            return self._flat[at : at + sum(end - begin for _, begin, end, _ in pieces)]
        if len(pieces) == 1:
            name, begin, end, _ = pieces[0]
            data = self.piece(name, begin, end)
            if data.dtype == staging.dtype:
                return data
        for name, begin, end, at in pieces:
            data, target = self.piece(name, begin, end), staging[at - start : at - start + end - begin]
            if self.specs[name].dtype == "BF16":
                torch.from_numpy(target).copy_(torch.from_numpy(data).view(torch.bfloat16))
            else:
                np.copyto(target, data, casting="unsafe")
        return staging

    def whole(self, name: str) -> torch.Tensor:
        """A copy of tensor ``name`` (for the small integer tensors)."""
        spec = self.specs[name]
        dtype = torch_dtype(spec.dtype)
        raw = bytearray(os.pread(self._fd, spec.end - spec.begin, spec.begin))
        if len(raw) != spec.end - spec.begin:
            raise ValueError(f"tensor {name!r} is cut short in its file")
        return (torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)).reshape(spec.shape)


@contextmanager
def open_mapped(
    ordered: Sequence[UpdateFile], opener: Opener, expected: Structure, reference: str | Path | None = None
) -> Iterator[list[MappedFile]]:
    """Map every update (in the given order) after checking each against ``expected``.

    ``reference`` (a local file, e.g. the global model) is mapped after the updates, as entry K.
    Each update stays materialised by ``opener`` (for example downloaded) while the block runs.
    """
    with ExitStack() as stack:
        files = []
        sources = [(u.client_id, stack.enter_context(opener(u))) for u in ordered]
        if reference is not None:
            sources.append(("the reference model", reference))
        for client_id, path in sources:
            check_structure(client_id, path, expected)
            file = MappedFile(path)
            stack.callback(file.close)
            files.append(file)
        yield files


# Scratch bytes per thread for one block's rows. Larger blocks spread each ufunc call's fixed cost and
# its GIL hand-off over more coordinates; past a few MiB the rows fall out of the shared L3 cache.
# Measured for FedMedian at K = 10 x 44 MB on 2 threads: 1 MiB 357 ms, 4 MiB 157-198 ms, 16 MiB 186 ms.
CACHE_BYTES = 4 << 20


def block_size(rows: int, itemsize: int, window: int, minimum: int = 1 << 10) -> int:
    """Coordinates per block: a power of two (at least ``minimum``) whose ``rows`` rows fit CACHE_BYTES,
    and a multiple of ``minimum`` within ``window`` (``minimum`` itself for a smaller window)."""
    fit = CACHE_BYTES // (rows * itemsize)
    size = max(minimum, 1 << max(0, fit.bit_length() - 1))
    return minimum if window < minimum else min(size, window - window % minimum)


def budget_window(chunk: int, block: int, count: int, scratch_rows: int, mapped: int | None = None) -> int:
    """Coordinates per window such that ``mapped`` (default K) mapped rows plus every thread's
    ``scratch_rows`` block rows stay within ``K x chunk`` values (at least one block)."""
    window = (count * chunk - worker_count() * scratch_rows * block) // (mapped or count)
    return max(block, window - window % block)


def worker_count() -> int:
    """Threads for the block kernels: torch's intra-op thread count (``OMP_NUM_THREADS``), at least one."""
    return max(1, torch.get_num_threads())


def run_blocks(
    total: int,
    block: int,
    window: int,
    kernel: Callable[[int, int, Any], None],
    scratch: Callable[[], Any],
    files: Sequence[MappedFile],
    space: FlatSpace,
    done: Callable[[int, int], None] | None = None,
    begin: int = 0,
    threads: int | None = None,
) -> None:
    """Call ``kernel(start, stop, scratch)`` for blocks of at most ``block`` coordinates covering
    ``range(begin, total)``, a window of about ``window`` coordinates at a time: each window is mapped in
    every file first (``MappedFile.enter``), and ``done(start, stop)`` runs after its last block.
    Each thread has its own ``scratch()`` and takes the window's next block whenever it is free;
    blocks never overlap, so which thread runs which block does not matter."""
    threads = threads or worker_count()
    span = max(block, window - window % block)
    shares = [scratch() for _ in range(threads)]
    pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="fedloom-blocks") if threads > 1 else None

    def drain(starts: list[int], taken: Iterator[int], stop_at: int, own: Any) -> None:
        for index in taken:
            if index >= len(starts):
                return
            kernel(starts[index], min(starts[index] + block, stop_at), own)

    try:
        for w_start in range(begin, total, span):
            w_stop = min(w_start + span, total)
            for f in files:
                f.enter(space, w_start, w_stop)
            starts = list(range(w_start, w_stop, block))
            taken = itertools.count()  # next() on a count is atomic under the GIL
            helpers = [pool.submit(drain, starts, taken, w_stop, own) for own in shares[1:]] if pool else []
            drain(starts, taken, w_stop, shares[0])
            for helper in helpers:
                helper.result()
            if done is not None:
                done(w_start, w_stop)
    finally:
        if pool is not None:
            pool.shutdown()
        for f in files:
            f.leave()
