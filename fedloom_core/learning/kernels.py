"""Streaming, order-independent aggregation of client updates.

Updates are folded one at a time into a single accumulator, in a canonical order (sorted by
client id), so memory stays at about one model plus one memory-mapped tensor (each tensor's
mapped pages are dropped once it is folded) whatever the number of clients, and the same updates
give the same bytes whatever order they arrived in.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedloom_core.learning.weights import mapped_tensors, save_state

# torch is imported where tensors are made: the API imports this module without needing torch.
if TYPE_CHECKING:
    import torch


def fold(acc: torch.Tensor, update: torch.Tensor, weight: float) -> None:
    """``acc += weight * update`` in place, on torch's intra-op threads."""
    acc.add_(update, alpha=weight)


def start_fold(update: torch.Tensor, weight: float) -> torch.Tensor:
    """A new accumulator holding ``0 + weight * update`` (``update`` float32 or float64).

    The same arithmetic as zeros followed by ``fold`` (so ``-0.0`` products still come out ``+0.0``),
    without writing the zeros first: one pass over the accumulator instead of two.
    """
    import torch

    acc = torch.empty(update.shape, dtype=update.dtype)
    torch.add(torch.zeros((), dtype=update.dtype), update, alpha=weight, out=acc)
    return acc


def release_pages(mapped: torch.Tensor) -> None:
    """Drop the resident pages of a view into a private file map (``mapped_tensors``) that is read no more.

    A mapped page counts in the process's RSS until the map closes; dropping each tensor's pages once it
    is folded keeps an aggregation at one accumulator plus one tensor, not one plus a whole update.
    The pages are clean copies of the file, read again from it if touched. Linux only; elsewhere a no-op.
    """
    if _MADVISE is None or mapped.numel() == 0:
        return
    start = mapped.data_ptr()
    end = start + mapped.numel() * mapped.element_size()
    first, last = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
    if last > first:
        _MADVISE(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


def return_free_memory() -> None:
    """Hand the allocator's free memory back to the OS (glibc ``malloc_trim``); elsewhere a no-op.

    Tensors freed on a worker thread stay in glibc's arena once its mmap threshold has grown past them,
    so FedAvg's freed 1 GB accumulator kept counting in the worker's RSS under the round's next step.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _libc_function(name: str, argtypes: tuple):  # type: ignore[no-untyped-def]
    """A libc function on Linux (None elsewhere, or when this libc lacks it)."""
    if not sys.platform.startswith("linux"):
        return None
    fn = getattr(ctypes.CDLL(None, use_errno=True), name, None)
    if fn is not None:
        fn.argtypes = argtypes
    return fn


_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_MADVISE = _libc_function("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))
_MALLOC_TRIM = _libc_function("malloc_trim", (ctypes.c_size_t,))


@dataclass(frozen=True)
class UpdateFile:
    client_id: str
    path: Path
    num_samples: int


def fedavg_weights(updates: Sequence[UpdateFile], weighted: bool = True) -> list[float]:
    """Each update's weight: its share of the samples, or equal shares when unweighted."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    if weighted:
        total = sum(u.num_samples for u in updates)
        if total <= 0:
            raise ValueError("weighted aggregation needs a positive number of samples")
        return [u.num_samples / total for u in updates]
    return [1.0 / len(updates)] * len(updates)


Opener = Callable[[UpdateFile], AbstractContextManager[Path]]


def open_path(update: UpdateFile) -> AbstractContextManager[Path]:
    """The default opener: the update is already a local file."""
    return nullcontext(update.path)


def fedavg(
    updates: Sequence[UpdateFile], out_path: str | Path, weighted: bool = True, opener: Opener = open_path
) -> dict[str, torch.Tensor]:
    """Write the (weighted) average of ``updates`` to ``out_path`` and return it.

    ``opener`` turns an update into a local file for the duration of its fold (for example a
    download from S3), so only one update is materialised at a time.

    Floating-point tensors are accumulated in float32 (or float64 when they are float64);
    integer tensors are taken from the first update in canonical order.
    """
    import torch

    ordered = sorted(updates, key=lambda u: u.client_id)
    weights = fedavg_weights(ordered, weighted)
    acc: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for update, weight in zip(ordered, weights, strict=True):
        with opener(update) as path, mapped_tensors(path) as tensors:
            if not acc:
                for name, t in tensors.items():
                    dtypes[name] = t.dtype
                    if not t.is_floating_point():
                        acc[name] = t.clone()
                    elif t.dtype in (torch.float32, torch.float64):
                        acc[name] = start_fold(t, weight)
                    else:  # accumulated in float32: the first update is added to zeros like the rest
                        acc[name] = torch.zeros(t.shape, dtype=torch.float32)
                        fold(acc[name], t, weight)
                    release_pages(t)
            else:
                _check_like(update.client_id, tensors, acc, dtypes)
                for name, t in tensors.items():
                    if t.is_floating_point():
                        fold(acc[name], t, weight)
                    release_pages(t)
            del tensors
    result = {name: acc[name].to(dtypes[name]) for name in acc}
    save_state(result, out_path)
    return result


def _check_like(
    client_id: str, tensors: dict[str, torch.Tensor], acc: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype]
) -> None:
    """Raise ValueError unless ``tensors`` has the names, shapes and dtypes of the first update."""
    if tensors.keys() != acc.keys():
        raise ValueError(f"update of {client_id} has different tensors than the others")
    for name, t in tensors.items():
        if t.shape != acc[name].shape or t.dtype != dtypes[name]:
            raise ValueError(
                f"update of {client_id}: tensor {name!r} is {t.dtype} {list(t.shape)}, "
                f"expected {dtypes[name]} {list(acc[name].shape)}"
            )
