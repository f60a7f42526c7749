"""fedloom's custom search attributes by name and Temporal type, without importing temporalio.

``fedloom serve``'s supervisor builds the dev server's flags from this table and so stays small;
``fedloom_core.temporal.SEARCH_ATTRIBUTES`` holds the typed keys (a test checks they agree).
"""

from __future__ import annotations

# Name -> type as ``temporal server start-dev --search-attribute`` spells it.
SEARCH_ATTRIBUTE_TYPES = {
    "ExperimentId": "Keyword",
    "ExperimentStatus": "Keyword",
    "CurrentRound": "Int",
    "Strategy": "Keyword",
    "BestAccuracy": "Double",
}


def dev_server_flags() -> list[str]:
    """``temporal server start-dev`` flags that register the search attributes at start-up."""
    flags: list[str] = []
    for name, kind in SEARCH_ATTRIBUTE_TYPES.items():
        flags += ["--search-attribute", f"{name}={kind}"]
    return flags
