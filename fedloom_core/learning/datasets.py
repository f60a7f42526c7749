"""Datasets, the deterministic client partitioner and the server's held-out test split.

``digits`` ships with scikit-learn and is split here (a fixed 20% held out); ``mnist`` and ``cifar10`` are read
from the user's files in the datasets directory (see :mod:`fedloom_core.learning.dataset_files`) and keep their own
train/test split, as does the seeded ``synthetic`` dataset. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedloom_core.learning import dataset_files
from fedloom_core.learning.catalog import canonical_dataset
from fedloom_core.learning.partition import iid_partitions, partition_indices

TEST_FRACTION = 0.2
# Datasets read from the user's files in the datasets directory; the others need no files.
FILE_DATASETS = ("mnist", "cifar10")
SPLIT_SEED = 20240601

# torch is imported where tensors are made: the API process uses this module's names and shapes
# only, and stays without torch (about 250 MB of RSS).
if TYPE_CHECKING:
    import torch


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
    if canonical == "mnist":
        return DatasetInfo("mnist", (28, 28, 1), 10)
    if canonical == "cifar10":
        return DatasetInfo("cifar10", (32, 32, 3), 10)
    if canonical == "synthetic":
        return DatasetInfo("synthetic", dataset_files.SYNTHETIC_SHAPE, dataset_files.NUM_CLASSES)
    raise ValueError(f"unknown dataset {name!r}")  # pragma: no cover - guarded above


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: its own file read directly (importing sklearn.datasets costs ~1 s and
    ~100 MB of RSS in every client and the worker), else through ``load_digits``."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is not None and path.is_file():
        data = np.loadtxt(path, delimiter=",")  # what load_digits reads: 64 pixels, then the label
        images, target = data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    else:  # pragma: no cover - a scikit-learn that keeps its data elsewhere
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images, target = bunch.images, bunch.target
    x = (images.astype(np.float32) / 16.0)[:, None, :, :]
    return x, target.astype(np.int64)


def _split(x: np.ndarray, y: np.ndarray) -> Split:
    import torch

    return Split(torch.from_numpy(x), torch.from_numpy(y))


@lru_cache(maxsize=4)
def _train_test(canonical: str, root: Path | None) -> tuple[Split, Split]:
    if canonical == "digits":
        x, y = _load_digits()
        order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
        n_test = int(round(len(y) * TEST_FRACTION))
        test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])
        return _split(x[train_idx], y[train_idx]), _split(x[test_idx], y[test_idx])
    if canonical == "synthetic":
        return _split(*dataset_files.load_synthetic("train")), _split(*dataset_files.load_synthetic("test"))
    assert root is not None
    loader = dataset_files.load_mnist if canonical == "mnist" else dataset_files.load_cifar10
    return _split(*loader(root, "train")), _split(*loader(root, "test"))


def _cached(name: str) -> tuple[Split, Split]:
    canonical = canonical_dataset(name)
    return _train_test(canonical, dataset_files.datasets_root() if canonical in FILE_DATASETS else None)


def check_available(name: str) -> None:
    """Raise DatasetNotFoundError, naming the path expected, unless ``name``'s files are on disk (reads none).

    ``digits`` and ``synthetic`` need no files and are always available.
    """
    canonical = canonical_dataset(name)
    if canonical in FILE_DATASETS:
        try:
            dataset_files.check_files(canonical, dataset_files.datasets_root())
        except dataset_files.DatasetNotFoundError as exc:
            raise dataset_files.DatasetNotFoundError(f"{exc} (digits and synthetic need no files)") from None


def load_train(name: str) -> Split:
    """The training split, which clients partition among themselves."""
    return _cached(name)[0]


def load_test(name: str) -> Split:
    """The held-out test split that only the server evaluates on."""
    return _cached(name)[1]


def iid_partition(num_samples: int, index: int, count: int, seed: int = 0) -> np.ndarray:
    """Indices of client ``index``'s shard (0-based) of ``count`` IID shards, fixed by ``seed``."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"partition {index}/{count} is out of range")
    return iid_partitions(num_samples, count, seed)[index]


def client_partition(
    name: str,
    index: int,
    count: int,
    seed: int = 0,
    *,
    strategy: str = "iid",
    alpha: float = 0.5,
    shards_per_client: int = 2,
) -> Split:
    """Client ``index`` (0-based) of ``count``'s slice of the training split under ``strategy``.

    ``strategy`` is ``iid``, ``dirichlet`` (label skew set by ``alpha``) or ``shards`` (``shards_per_client``
    label-sorted shards each); see :mod:`fedloom_core.learning.partition`. The split depends only on the arguments.
    """
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"partition {index}/{count} is out of range")
    train = load_train(name)
    parts = partition_indices(
        train.y.numpy(), count, strategy, seed=seed, alpha=alpha, shards_per_client=shards_per_client
    )
    import torch

    idx = torch.from_numpy(parts[index])
    return Split(train.x[idx], train.y[idx])
