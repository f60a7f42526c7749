"""The light table of search attributes (used by ``fedloom serve``) matches the typed keys."""

from __future__ import annotations

import pytest

from fedloom_core.search_attributes import SEARCH_ATTRIBUTE_TYPES, dev_server_flags
from fedloom_core.temporal import SEARCH_ATTRIBUTES

pytestmark = pytest.mark.unit


def test_table_matches_typed_keys() -> None:
    kinds = {"KEYWORD": "Keyword", "INT": "Int", "DOUBLE": "Double"}
    typed = {key.name: kinds[key.indexed_value_type.name] for key in SEARCH_ATTRIBUTES}
    assert typed == SEARCH_ATTRIBUTE_TYPES


def test_dev_server_flags() -> None:
    flags = dev_server_flags()
    assert flags[:2] == ["--search-attribute", "ExperimentId=Keyword"]
    assert len(flags) == 2 * len(SEARCH_ATTRIBUTES)
