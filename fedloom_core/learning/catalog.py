"""Names of the built-in datasets, architectures, strategies and optimizers. Imports no torch."""

from __future__ import annotations

KNOWN_DATASETS = ("digits", "mnist", "cifar10", "synthetic")
DATASET_ALIASES = {
    "digits": "digits",
    "cifar-10": "cifar10",
    "cifar10": "cifar10",
    "mnist": "mnist",
    "synthetic": "synthetic",
}
KNOWN_ARCHITECTURES = ("CNN", "MLP")
KNOWN_STRATEGIES = (
    "FedAvg",
    "FedProx",
    "FedAvgM",
    "FedAdam",
    "FedYogi",
    "FedAdagrad",
    "FedMedian",
    "FedTrimmedAvg",
    "Krum",
    "MultiKrum",
    "NormClipping",
    "DPFedAvg",
)
KNOWN_OPTIMIZERS = ("SGD", "Adam")


def canonical_dataset(name: str) -> str:
    """The canonical dataset name (``CIFAR-10`` -> ``cifar10``), or ValueError listing the known ones."""
    canonical = DATASET_ALIASES.get(str(name).strip().lower())
    if canonical not in KNOWN_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(KNOWN_DATASETS)}")
    return canonical


def canonical_architecture(name: str) -> str:
    """The canonical architecture name, or ValueError listing the known ones."""
    for known in KNOWN_ARCHITECTURES:
        if str(name).strip().upper() == known:
            return known
    raise ValueError(f"unknown model_architecture {name!r}; known: {', '.join(KNOWN_ARCHITECTURES)}")


def builtin_architecture(name: str) -> str | None:
    """The canonical name of a built-in architecture, or None for a model the server does not know."""
    for known in KNOWN_ARCHITECTURES:
        if str(name).strip().upper() == known:
            return known
    return None


def builtin_dataset(name: str) -> str | None:
    """The canonical name of a built-in dataset, or None for data only the sites hold."""
    canonical = DATASET_ALIASES.get(str(name).strip().lower())
    return canonical if canonical in KNOWN_DATASETS else None
