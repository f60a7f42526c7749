"""The torch-free name lists of the catalog (used by the workflow and request validation) match the code."""

from __future__ import annotations

from fedloom_core.learning.catalog import KNOWN_ARCHITECTURES, KNOWN_DATASETS, KNOWN_STRATEGIES
from fedloom_core.learning.datasets import dataset_info
from fedloom_core.learning.strategies import STRATEGIES
from fedloom_core.learning.strategies.clipping import INNER_STRATEGIES
from fedloom_core.learning.strategies.params import REGISTRY
from fedloom_core.learning.zoo import build_model


def test_strategy_names_match_the_registry() -> None:
    """Every strategy class registers itself; the catalog names exactly those, and NormClipping wraps the rest."""
    assert tuple(STRATEGIES) == KNOWN_STRATEGIES
    assert set(REGISTRY) == set(KNOWN_STRATEGIES)
    assert all(STRATEGIES[name].name == name for name in KNOWN_STRATEGIES)
    assert set(INNER_STRATEGIES) == set(KNOWN_STRATEGIES) - {"NormClipping"}


def test_every_dataset_and_architecture_is_buildable() -> None:
    for name in KNOWN_DATASETS:
        info = dataset_info(name)
        for arch in KNOWN_ARCHITECTURES:
            assert build_model(arch, info.input_shape, info.num_classes) is not None
