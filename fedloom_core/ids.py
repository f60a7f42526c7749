"""Identifiers that reach paths, keys and queries: one pattern, checked everywhere."""

from __future__ import annotations

import re

from pydantic import ValidationInfo

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a safe identifier (letters, digits, ``._-``, at most 128), else ValueError."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} is invalid: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


def check_optional_id(value: str | None, info: ValidationInfo) -> str | None:
    """A pydantic field validator: an optional id field, checked and named by its field."""
    return None if value is None else check_id(value, info.field_name or "id")
