"""Declared, range-checked strategy parameters, and the strategy base class that checks them.

Each strategy lists its parameters as ``Param`` objects in its spec (``specs.py``, no torch);
``ConfiguredStrategy.__init__`` checks what it is given against them (unknown names, wrong types,
values out of range) and fills in the defaults, so a strategy's ``params`` always holds every
setting it uses. The error messages are shown to API users, so each one lists the valid
parameters with their ranges.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from fedloom_core.learning.strategies.base import Strategy

_TYPE_NAMES: dict[type, str] = {bool: "bool", int: "int", float: "float", str: "string"}


@dataclass(frozen=True)
class Param:
    """One setting of a strategy: its type, default and allowed range."""

    name: str
    kind: type
    default: Any
    description: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    choices: tuple[str, ...] | None = None
    required: bool = False
    # Text shown instead of the default value, when the default depends on the round (e.g. "K - f").
    default_text: str | None = None

    def range_text(self) -> str:
        """The allowed values in words, e.g. ``[0, 0.5)`` or ``> 0`` or ``one of FedAvg, Krum``."""
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        if self.kind is bool:
            return "true or false"
        low, high = self.minimum, self.maximum
        if low is not None and high is not None:
            left = "(" if self.exclusive_minimum else "["
            right = ")" if self.exclusive_maximum else "]"
            return f"{left}{_num(low)}, {_num(high)}{right}"
        if low is not None:
            return f"{'>' if self.exclusive_minimum else '>='} {_num(low)}"
        if high is not None:
            return f"{'<' if self.exclusive_maximum else '<='} {_num(high)}"
        return "any"

    def constraint(self) -> str:
        """The allowed values as a predicate, e.g. ``in [0, 0.5)`` or ``> 0`` or ``one of ...``."""
        text = self.range_text()
        return f"in {text}" if text[0] in "[(" else text

    def summary(self) -> str:
        """One line for error messages, e.g. ``trim_fraction (float in [0, 0.5), default 0.1)``."""
        if self.required:
            default = "required"
        elif self.default_text is not None:
            default = f"default {self.default_text}"
        else:
            default = f"default {_show(self.default)}"
        if self.kind is bool or self.choices is not None:
            return f"{self.name} ({self.constraint()}, {default})"
        return f"{self.name} ({_TYPE_NAMES[self.kind]} {self.constraint()}, {default})"

    def schema(self) -> dict[str, Any]:
        """A JSON-friendly description of this parameter, for documentation."""
        entry: dict[str, Any] = {
            "name": self.name,
            "type": _TYPE_NAMES[self.kind],
            "default": self.default,
            "required": self.required,
            "range": self.range_text(),
            "description": self.description,
        }
        if self.default_text is not None:
            entry["default_text"] = self.default_text
        for key, value in (("minimum", self.minimum), ("maximum", self.maximum)):
            if value is not None:
                entry[key] = value
        if self.minimum is not None:
            entry["exclusive_minimum"] = self.exclusive_minimum
        if self.maximum is not None:
            entry["exclusive_maximum"] = self.exclusive_maximum
        if self.choices is not None:
            entry["choices"] = list(self.choices)
        return entry

    def check(self, value: Any) -> Any:
        """Return ``value`` converted to this parameter's type, or raise ValueError saying why not."""
        if value is None and not self.required and self.default is None:
            return None
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"must be true or false, not {value!r}")
            return value
        if self.kind is str:
            if not isinstance(value, str):
                raise ValueError(f"must be a string, not {value!r}")
            if self.choices is not None:
                for choice in self.choices:
                    if value.strip().lower() == choice.lower():
                        return choice
                raise ValueError(f"must be {self.constraint()}, not {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, not {value!r}")
        if self.kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"must be an integer, not {value!r}")
            number: int | float = int(value)
        else:
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(f"must be a finite number, not {value!r}")
        if not self._in_range(number):
            raise ValueError(f"must be {self.constraint()}, not {value!r}")
        return number

    def _in_range(self, number: float) -> bool:
        low, high = self.minimum, self.maximum
        if low is not None and (number < low or (self.exclusive_minimum and number == low)):
            return False
        return not (high is not None and (number > high or (self.exclusive_maximum and number == high)))


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(float(value))


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return str(value)


def describe_params(params: Sequence[Param]) -> str:
    """All parameters in one line, for error messages."""
    return "; ".join(p.summary() for p in params) if params else "none"


def check_params(strategy: str, declared: Sequence[Param], given: Mapping[str, Any]) -> dict[str, Any]:
    """Every declared parameter's value: ``given``'s (checked) or the default; ValueError otherwise."""
    known = {p.name: p for p in declared}
    valid = f"valid parameters of {strategy}: {describe_params(declared)}"
    unknown = sorted(str(k) for k in given if k not in known)
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(map(repr, unknown))} for strategy {strategy}; {valid}")
    values: dict[str, Any] = {}
    for param in declared:
        if param.name not in given:
            if param.required:
                raise ValueError(f"parameter {param.name!r} of strategy {strategy} is required; {valid}")
            values[param.name] = param.default
            continue
        try:
            values[param.name] = param.check(given[param.name])
        except ValueError as exc:
            raise ValueError(f"invalid parameter {param.name!r} of strategy {strategy}: {exc}; {valid}") from None
    return values


def _at_least_one(values: Mapping[str, Any]) -> int:
    return 1


@dataclass(frozen=True)
class StrategySpec:
    """A strategy's name, one-line description, parameters and the fewest updates a round needs (no torch)."""

    name: str
    description: str
    params: tuple[Param, ...]
    # The fewest updates the strategy can aggregate, given its checked parameter values.
    min_updates: Callable[[Mapping[str, Any]], int] = _at_least_one
    # The strategies its ``inner`` parameter may name, whose parameters it accepts too (NormClipping).
    inner_specs: Mapping[str, StrategySpec] | None = None

    def check(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every parameter's checked value (an inner strategy's too); ValueError says what is valid."""
        if self.inner_specs is None:
            return check_params(self.name, self.params, given)
        own_names = {p.name for p in self.params}
        own = check_params(self.name, self.params, {k: v for k, v in given.items() if k in own_names})
        inner = self.inner_specs[own["inner"]]
        try:
            rest = inner.check({k: v for k, v in given.items() if k not in own_names})
        except ValueError as exc:
            raise ValueError(
                f"{exc}; {self.name} itself takes: {describe_params(self.params)}, "
                f"plus the parameters of its inner strategy {inner.name}"
            ) from None
        return {**own, **rest}

    def minimum_updates(self, values: Mapping[str, Any]) -> int:
        """The fewest updates a round needs with these checked ``values`` (fewer: aggregation fails)."""
        return self.min_updates(values)


#: Every strategy class by its name; each registers itself when its module is imported.
REGISTRY: dict[str, type[ConfiguredStrategy]] = {}


class ConfiguredStrategy(Strategy):
    """A strategy whose name, parameters and minimum are its ``SPEC``'s (see ``specs.py``), checked when built."""

    SPEC: ClassVar[StrategySpec]
    PARAMS: ClassVar[tuple[Param, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "SPEC" in cls.__dict__:
            cls.name, cls.PARAMS = cls.SPEC.name, cls.SPEC.params
            REGISTRY[cls.name] = cls

    def __init__(self, **params: Any) -> None:
        super().__init__(**self.SPEC.check(params))

    def minimum_updates(self) -> int:
        """The fewest updates this strategy can aggregate (a round with fewer raises ValueError)."""
        return self.SPEC.minimum_updates(self.params)

    @classmethod
    def param_schema(cls) -> list[dict[str, Any]]:
        """The declared parameters as JSON-friendly dicts."""
        return [p.schema() for p in cls.PARAMS]


# Parameters shared by several strategies.
WEIGHTED = Param("weighted", bool, True, "Weight each update by its number of training samples.")
CHUNK_ELEMS = Param(
    "chunk_elems",
    int,
    1 << 20,
    "Coordinates gathered from all K updates at a time; memory is about K x chunk_elems x 8 bytes.",
    minimum=1,
    maximum=1 << 30,
)
