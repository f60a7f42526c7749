"""Deterministic client partitioners: IID, Dirichlet label skew and pathological label shards.

Every partitioner splits the indices ``0..n-1`` of a training split into ``count`` disjoint, sorted index
arrays that together cover all of them, and depends only on the labels, the parameters and ``seed``: each
client computes the same partition on its own and keeps its slice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

STRATEGIES = ("iid", "dirichlet", "shards")


def _check_count(num_samples: int, count: int) -> None:
    if count < 1:
        raise ValueError(f"the number of clients must be at least 1, got {count}")
    if num_samples < count:
        raise ValueError(f"cannot give each of {count} clients a sample: the split has only {num_samples}")


def iid_partitions(num_samples: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` IID shards of ``num_samples`` indices whose sizes differ by at most one."""
    if count < 1:
        raise ValueError(f"the number of clients must be at least 1, got {count}")
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part) for part in np.array_split(order, count)]


def dirichlet_partitions(labels: np.ndarray, count: int, alpha: float = 0.5, seed: int = 0) -> list[np.ndarray]:
    """Label-skewed shards: each class's samples are split among the clients by Dirichlet(``alpha``) shares.

    Classes are visited in ascending order. Each class's indices are shuffled, client shares
    ``p ~ Dirichlet(alpha, ..., alpha)`` are drawn, and the shuffled indices are cut at the rounded
    cumulative shares. Smaller ``alpha`` concentrates each class on fewer clients.

    No client is left empty: while one is, the client holding the most samples (lowest index on ties)
    gives it one sample of its own most frequent class (lowest label on ties, highest index of that class).
    Each move fills one empty client, and a donor with at least two samples always exists because the
    split holds at least ``count`` samples, so this ends after at most ``count - 1`` moves and changes the
    Dirichlet draw as little as possible.
    """
    labels = _as_labels(labels)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    _check_count(len(labels), count)
    rng = np.random.default_rng(seed)
    assigned: list[list[np.ndarray]] = [[] for _ in range(count)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(count, float(alpha)))
        if not np.all(np.isfinite(shares)) or shares.sum() <= 0:  # pragma: no cover - numerical corner
            shares = np.eye(count)[int(rng.integers(count))]
        cuts = np.round(np.cumsum(shares)[:-1] / shares.sum() * len(members)).astype(np.int64)
        for client, part in enumerate(np.split(members, np.clip(cuts, 0, len(members)))):
            assigned[client].append(part)
    parts = [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in assigned]
    while True:
        empty = [i for i, part in enumerate(parts) if len(part) == 0]
        if not empty:
            return parts
        donor = max(range(count), key=lambda i: (len(parts[i]), -i))
        donor_labels = labels[parts[donor]]
        values, counts = np.unique(donor_labels, return_counts=True)
        common = values[int(np.argmax(counts))]
        moved = parts[donor][np.flatnonzero(donor_labels == common)[-1]]
        parts[donor] = parts[donor][parts[donor] != moved]
        parts[empty[0]] = np.array([moved], dtype=np.int64)


def shard_partitions(labels: np.ndarray, count: int, shards_per_client: int = 2, seed: int = 0) -> list[np.ndarray]:
    """Pathological non-IID shards: sort by label, cut into ``count * shards_per_client`` shards, deal them.

    The indices are shuffled and then stably sorted by label, with the order of the classes itself
    shuffled by ``seed``; the sorted list is cut into equal shards (sizes differ by at most one). Shard
    ``j`` goes to client ``perm[j % count]`` for a seeded permutation ``perm``, so each client gets
    ``shards_per_client`` shards spaced ``count`` apart. When every class fills exactly
    ``count * shards_per_client / C`` whole shards (C classes, ``shards_per_client <= C``), shards that far
    apart always hold different classes and each client gets exactly ``shards_per_client`` classes.
    """
    labels = _as_labels(labels)
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be at least 1, got {shards_per_client}")
    _check_count(len(labels), count)
    total = count * shards_per_client
    if total > len(labels):
        raise ValueError(
            f"{count} clients x {shards_per_client} shards = {total} shards, more than the {len(labels)} samples"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    class_rank = np.empty(int(classes.max()) + 1 if len(classes) else 0, dtype=np.int64)
    class_rank[classes] = rng.permutation(len(classes))
    shuffled = rng.permutation(len(labels))
    ordered = shuffled[np.argsort(class_rank[labels[shuffled]], kind="stable")]
    owners = rng.permutation(count)
    assigned: list[list[np.ndarray]] = [[] for _ in range(count)]
    for j, shard in enumerate(np.array_split(ordered, total)):
        assigned[int(owners[j % count])].append(shard)
    return [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in assigned]


def partition_indices(
    labels: np.ndarray,
    count: int,
    strategy: str = "iid",
    *,
    seed: int = 0,
    alpha: float = 0.5,
    shards_per_client: int = 2,
) -> list[np.ndarray]:
    """All ``count`` clients' index arrays under ``strategy`` (``iid``, ``dirichlet`` or ``shards``)."""
    kind = check_strategy(strategy)
    labels = _as_labels(labels)
    if kind == "iid":
        return iid_partitions(len(labels), count, seed)
    if kind == "dirichlet":
        return dirichlet_partitions(labels, count, alpha, seed)
    return shard_partitions(labels, count, shards_per_client, seed)


def check_strategy(strategy: str) -> str:
    """The canonical (lower-case) strategy name, or ValueError listing the known ones."""
    kind = str(strategy).strip().lower()
    if kind not in STRATEGIES:
        raise ValueError(f"unknown partition strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    return kind


def strategy_label(strategy: str, alpha: float = 0.5, shards_per_client: int = 2) -> str:
    """A short name of a strategy and its parameter, e.g. ``dirichlet(alpha=0.5)``."""
    kind = check_strategy(strategy)
    if kind == "dirichlet":
        return f"dirichlet(alpha={alpha:g})"
    if kind == "shards":
        return f"shards(per_client={shards_per_client})"
    return "iid"


def label_summary(labels: ArrayLike, partitions: Sequence[ArrayLike]) -> list[dict[int, int]]:
    """Per client, how many samples of each label it holds (labels it lacks are omitted)."""
    labels = _as_labels(labels)
    summary = []
    for part in partitions:
        values, counts = np.unique(labels[np.asarray(part, dtype=np.int64)], return_counts=True)
        summary.append({int(v): int(c) for v, c in zip(values, counts, strict=True)})
    return summary


def label_entropy(counts: dict[int, int]) -> float:
    """The entropy in bits of one client's label distribution (0 for a single class)."""
    total = sum(counts.values())
    if total == 0:
        return 0.0
    probs = np.array([c / total for c in counts.values() if c > 0])
    return float(-(probs * np.log2(probs)).sum())


def mean_label_entropy(labels: ArrayLike, partitions: Sequence[ArrayLike]) -> float:
    """The mean over clients of their label entropy in bits: lower means more label skew."""
    summary = label_summary(labels, partitions)
    return float(np.mean([label_entropy(counts) for counts in summary])) if summary else 0.0


def describe_partition(
    labels: ArrayLike,
    partitions: Sequence[ArrayLike],
    strategy: str = "iid",
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    max_clients: int = 10,
) -> str:
    """A multi-line description for logs: sizes, label skew and each client's label counts."""
    summary = label_summary(labels, partitions)
    sizes = [sum(counts.values()) for counts in summary]
    head = (
        f"{strategy_label(strategy, alpha, shards_per_client)} over {len(summary)} clients: "
        f"{sum(sizes)} samples, {min(sizes, default=0)}-{max(sizes, default=0)} per client, "
        f"mean label entropy {mean_label_entropy(labels, partitions):.2f} bits"
    )
    lines = [head]
    for i, counts in enumerate(summary[:max_clients]):
        lines.append(f"  client {i + 1}: {sizes[i]} samples, {len(counts)} classes {counts}")
    if len(summary) > max_clients:
        lines.append(f"  ... {len(summary) - max_clients} more clients")
    return "\n".join(lines)


def _as_labels(labels: ArrayLike) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {array.shape}")
    if array.size and (not np.issubdtype(array.dtype, np.integer) or array.min() < 0):
        raise ValueError("labels must be non-negative integers")
    return array.astype(np.int64, copy=False)
