"""Federated evaluation's pure steps: picking the evaluators and averaging their reports."""

from __future__ import annotations

import math

import pytest

from fedloom_core.learning.federated import average_reports, pick_evaluators

PARTICIPANTS = [f"c{i}" for i in range(10)]


def test_all_participants_evaluate_at_fraction_one_sorted() -> None:
    assert pick_evaluators(["b", "a", "c", "a"], 1.0, seed=0, round=1) == ["a", "b", "c"]


def test_a_fraction_is_rounded_up_at_least_one_and_deterministic() -> None:
    picked = pick_evaluators(PARTICIPANTS, 0.25, seed=7, round=3)
    assert len(picked) == 3 and picked == sorted(picked) and set(picked) <= set(PARTICIPANTS)
    assert pick_evaluators(reversed(PARTICIPANTS), 0.25, seed=7, round=3) == picked
    assert len(pick_evaluators(PARTICIPANTS, 0.01, seed=7, round=3)) == 1
    assert len(pick_evaluators(PARTICIPANTS, 0.3, seed=7, round=3)) == 3
    # Another round (or seed) draws again.
    draws = {tuple(pick_evaluators(PARTICIPANTS, 0.2, seed=7, round=r)) for r in range(1, 20)}
    assert len(draws) > 1


def test_no_participants_no_evaluators_and_bad_fraction_refused() -> None:
    assert pick_evaluators([], 0.5, seed=0, round=1) == []
    for bad in (0.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError):
            pick_evaluators(PARTICIPANTS, bad, seed=0, round=1)


def test_reports_are_averaged_weighted_by_data_samples() -> None:
    avg = average_reports(
        [
            {"data_samples": 100, "loss": 1.0, "accuracy": 0.5, "f1": 0.2},
            {"data_samples": 300, "loss": 2.0, "accuracy": 0.9},
        ]
    )
    assert avg is not None
    assert avg["data_samples"] == 400 and isinstance(avg["data_samples"], int)
    assert avg["accuracy"] == pytest.approx((50 + 270) / 400)
    assert avg["loss"] == pytest.approx((100 + 600) / 400)
    # A metric only some reports carry is averaged over those.
    assert avg["f1"] == pytest.approx(0.2)


def test_reports_without_samples_are_left_out_and_none_gives_none() -> None:
    assert average_reports([]) is None
    assert average_reports([{"data_samples": 0}, {"data_samples": 0, "loss": 3.0}]) is None
    avg = average_reports([{"data_samples": 0, "loss": 99.0}, {"data_samples": 10, "loss": 1.0}])
    assert avg == {"accuracy": None, "loss": 1.0, "data_samples": 10}


def test_non_finite_and_non_numeric_values_are_skipped() -> None:
    avg = average_reports(
        [
            {"data_samples": 10, "loss": math.nan, "accuracy": 0.5, "flag": True},
            {"data_samples": 30, "loss": 2.0, "accuracy": math.inf},
        ]
    )
    assert avg == {"accuracy": 0.5, "loss": 2.0, "data_samples": 40}
