"""The torch-free name lists in contracts (used by the workflow and request validation) match the code."""

from __future__ import annotations

from fedloom_core.learning.catalog import KNOWN_ARCHITECTURES, KNOWN_DATASETS, KNOWN_STRATEGIES
from fedloom_core.learning.datasets import dataset_info
from fedloom_core.learning.strategies import STRATEGIES
from fedloom_core.learning.zoo import build_model


def test_strategy_names_match_the_registry() -> None:
    assert tuple(STRATEGIES) == KNOWN_STRATEGIES


def test_every_dataset_and_architecture_is_buildable() -> None:
    for name in KNOWN_DATASETS:
        info = dataset_info(name)
        for arch in KNOWN_ARCHITECTURES:
            assert build_model(arch, info.input_shape, info.num_classes) is not None
