"""Which limits a request spends from: uploads and the validate dry run share the uploads budget."""

from __future__ import annotations

import pytest

from api.ratelimit import Limits
from fedloom_core.settings import Settings


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/api/v1/model/update/site-1", {"general", "uploads"}),
        ("POST", "/api/v1/model/validate/site-1", {"general", "uploads"}),
        ("POST", "/api/v1/training/start", {"general", "training_start"}),
        ("GET", "/api/v1/model/update/u-1", {"general"}),
        ("GET", "/api/v1/clients", {"general"}),
        ("GET", "/health", set()),
    ],
)
def test_requests_spend_from_the_right_limits(method: str, path: str, expected: set[str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    limits = Limits.from_settings(Settings(data_dir=tmp_path))
    scope = {"type": "http", "method": method, "path": path}
    assert {limit.name for limit in limits.applicable(scope)} == expected
