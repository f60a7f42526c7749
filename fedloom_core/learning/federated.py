"""Federated evaluation's pure steps: who evaluates a round's new model, and the average of their reports.

No torch and no I/O: the workflow's light activities call these, and the unit tests check them directly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence

# Always present in an average, None when no report carried them.
HEADLINE_METRICS = ("accuracy", "loss")


def pick_evaluators(participants: Iterable[str], fraction: float, *, seed: int, round: int) -> list[str]:
    """A ``fraction`` of the round's participants (at least one), drawn with a seed fixed by the round, sorted."""
    if not (0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    ordered = sorted(set(participants))
    if not ordered:
        return []
    count = max(1, min(len(ordered), math.ceil(fraction * len(ordered) - 1e-9)))
    if count == len(ordered):
        return ordered
    return sorted(random.Random(seed * 1_000_003 + round).sample(ordered, count))


def average_reports(reports: Sequence[Mapping[str, float]]) -> dict[str, int | float | None] | None:
    """The reports' metrics averaged weighted by ``data_samples``, or None when no report has samples.

    A report with ``data_samples`` 0 (the client could not evaluate) is left out. Each metric is averaged
    over the reports that carry it as a finite number; ``data_samples`` in the result is the total.
    """
    counted = [r for r in reports if _samples(r) > 0]
    if not counted:
        return None
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for report in counted:
        n = _samples(report)
        for name, value in report.items():
            if name == "data_samples" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):
                continue
            sums[name] = sums.get(name, 0.0) + float(value) * n
            weights[name] = weights.get(name, 0) + n
    result: dict[str, int | float | None] = {name: None for name in HEADLINE_METRICS}
    result.update({name: sums[name] / weights[name] for name in sorted(sums)})
    result["data_samples"] = sum(_samples(r) for r in counted)
    return result


def _samples(report: Mapping[str, float]) -> int:
    n = report.get("data_samples", 0)
    return int(n) if isinstance(n, int | float) and not isinstance(n, bool) and math.isfinite(n) and n > 0 else 0
