"""Comparator networks: order statistics of K rows of coordinates with elementwise min and max.

Sorting each coordinate's K values one coordinate at a time (``numpy.sort`` on rows of K, or
torch's sort, median and kthvalue along a short dimension) costs tens of nanoseconds per
coordinate in per-slice overhead. A sorting network instead sorts every coordinate of a block
at once: each comparator ``(i, j)`` is one elementwise minimum and one maximum over whole rows,
vectorised and exact (no rounding), so the result does not depend on the block size
or on the number of threads.

The network is Batcher's merge exchange for any ``K`` (or a known smaller one, whichever needs fewer
operations once pruned); ``selection_plan`` then drops every
comparator whose outputs cannot change the sum of the wanted sorted positions (for example the
ordering among the values a trimmed mean keeps), and computes only the needed side of the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# The states of a wire, walking the network backwards from its end.
_DROPPED, _SUMMED, _NEEDED = 0, 1, 2


def merge_exchange(n: int) -> list[tuple[int, int]]:
    """Batcher's merge-exchange sorting network for ``n`` wires, as ``(low, high)`` comparators in order."""
    if n < 2:
        return []
    top = 1 << ((n - 1).bit_length() - 1)
    out = []
    p = top
    while p > 0:
        q, r, d = top, 0, p
        while True:
            out.extend((i, i + d) for i in range(n - d) if i & p == r)
            if q == p:
                break
            d, q, r = q - p, q >> 1, p
        p >>= 1
    return out


# Waksman's 29-comparator sorting network for 10 wires (Knuth, TAOCP vol. 3, 5.3.4), two fewer than
# Batcher's; pruned for FedTrimmedAvg's usual K = 10 it needs 24 minima and maxima against 34.
_KNOWN = {
    10: (
        (4, 9), (3, 8), (2, 7), (1, 6), (0, 5), (1, 4), (6, 9), (0, 3), (5, 8), (0, 2), (3, 6), (7, 9), (0, 1),
        (2, 4), (5, 7), (8, 9), (1, 2), (4, 6), (7, 8), (3, 5), (2, 5), (6, 8), (1, 3), (4, 7), (2, 3), (6, 7),
        (3, 4), (5, 6), (4, 5),
    ),
}  # fmt: skip


def sorting_networks(n: int) -> list[list[tuple[int, int]]]:
    """The sorting networks for ``n`` wires that plans are pruned from: Batcher's, and a known smaller one."""
    return [merge_exchange(n), *([list(_KNOWN[n])] if n in _KNOWN else [])]


@dataclass(frozen=True)
class Step:
    """One comparator: the minimum of wires ``i`` and ``j`` goes to ``i``, the maximum to ``j``."""

    i: int
    j: int
    # Whether each output is read later (a side nobody reads is not computed).
    low: bool
    high: bool


@dataclass(frozen=True)
class Plan:
    """The comparators to run, then the wires whose values add up to the wanted positions' sum."""

    steps: tuple[Step, ...]
    summed: tuple[int, ...]


@lru_cache(maxsize=64)
def selection_plan(n: int, lo: int, hi: int) -> Plan:
    """A plan leaving the values of sorted positions ``[lo, hi)`` of ``n`` (as a multiset) on ``summed``.

    Walking the sorting network backwards, each wire is dropped (its value is never used), summed
    (it reaches the final sum untouched) or needed (a kept comparator reads it). A comparator whose
    two outputs are both dropped, or both summed, is left out: swapping two values the sum adds
    anyway changes nothing but the order of the additions, which stays fixed for a given ``n``.
    """
    if not 0 <= lo < hi <= n:
        raise ValueError(f"positions [{lo}, {hi}) are not within {n} values")
    summed = tuple(range(lo, hi))
    plans = [Plan(_prune(network, n, lo, hi), summed) for network in sorting_networks(n)]
    return min(plans, key=lambda plan: sum(step.low + step.high for step in plan.steps))


def _prune(network: Sequence[tuple[int, int]], n: int, lo: int, hi: int) -> tuple[Step, ...]:
    state = [_SUMMED if lo <= w < hi else _DROPPED for w in range(n)]
    kept: list[Step] = []
    for i, j in reversed(network):
        a, b = state[i], state[j]
        if a == b and a != _NEEDED:
            continue
        kept.append(Step(i, j, low=a != _DROPPED, high=b != _DROPPED))
        state[i] = state[j] = _NEEDED
    return tuple(reversed(kept))


def run_plan(plan: Plan, rows: Sequence[np.ndarray], spare: Sequence[np.ndarray], out: np.ndarray) -> None:
    """Write the sum of ``plan.summed``'s values into ``out`` after running the plan on ``rows``.

    ``rows`` are the K input rows (read only; they may be views of memory-mapped files), all of
    ``out``'s length and dtype. ``spare`` holds at least K + 2 scratch rows of that length, which
    receive every comparator output. The sum adds the summed wires in wire order. numpy's ufuncs
    are used rather than torch's for their lower cost per call on cache-sized rows; both release
    the GIL, so several threads can run plans on different blocks at once.
    """
    wires: list[np.ndarray | None] = list(rows)
    owned: list[int | None] = [None] * len(rows)  # which spare row a wire's value lives in
    free = list(range(len(spare)))
    for step in plan.steps:
        a, b = wires[step.i], wires[step.j]
        low_at = free.pop() if step.low else None
        high_at = free.pop() if step.high else None
        if low_at is not None:
            np.minimum(a, b, out=spare[low_at])
        if high_at is not None:
            np.maximum(a, b, out=spare[high_at])
        for wire, at in ((step.i, low_at), (step.j, high_at)):
            if owned[wire] is not None:
                free.append(owned[wire])
            owned[wire] = at
            wires[wire] = spare[at] if at is not None else None
    values = [wires[w] for w in plan.summed]
    if len(values) == 1:
        np.copyto(out, values[0])
        return
    np.add(values[0], values[1], out=out)
    for value in values[2:]:
        np.add(out, value, out=out)
