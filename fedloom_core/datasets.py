"""Datasets, the deterministic client partitioner and the server's held-out test split."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from fedloom_core.contracts import canonical_dataset

TEST_FRACTION = 0.2
SPLIT_SEED = 20240601


@dataclass(frozen=True)
class Split:
    """Inputs as float32 (N, C, H, W) and integer labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    input_shape: tuple[int, int, int]  # (height, width, channels), as the spec writes it
    num_classes: int


def dataset_info(name: str) -> DatasetInfo:
    """Shape and class count of a dataset."""
    canonical = canonical_dataset(name)
    if canonical == "digits":
        return DatasetInfo("digits", (8, 8, 1), 10)
    raise ValueError(f"unknown dataset {name!r}")  # pragma: no cover - guarded above


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    return x, bunch.target.astype(np.int64)


@lru_cache(maxsize=4)
def _train_test(name: str) -> tuple[Split, Split]:
    canonical_dataset(name)
    x, y = _load_digits()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    n_test = int(round(len(y) * TEST_FRACTION))
    test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])
    return (
        Split(torch.from_numpy(x[train_idx]), torch.from_numpy(y[train_idx])),
        Split(torch.from_numpy(x[test_idx]), torch.from_numpy(y[test_idx])),
    )


def load_train(name: str) -> Split:
    """The training split, which clients partition among themselves."""
    return _train_test(name)[0]


def load_test(name: str) -> Split:
    """The held-out test split that only the server evaluates on."""
    return _train_test(name)[1]


def iid_partition(num_samples: int, index: int, count: int, seed: int = 0) -> np.ndarray:
    """Indices of client ``index``'s shard (0-based) of ``count`` IID shards, fixed by ``seed``."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"partition {index}/{count} is out of range")
    order = np.random.default_rng(seed).permutation(num_samples)
    return np.sort(np.array_split(order, count)[index])


def client_partition(name: str, index: int, count: int, seed: int = 0) -> Split:
    """Client ``index`` of ``count``'s IID slice of the training split."""
    train = load_train(name)
    idx = torch.from_numpy(iid_partition(len(train), index, count, seed))
    return Split(train.x[idx], train.y[idx])
