"""Contribution without central evaluation: shares of the round's progress, and score_round using them."""

from __future__ import annotations

import math

import pytest

from fedloom_core.policy.trust import ClientStanding, progress_shares, score_round


def test_shares_are_positive_cosine_times_samples_normalised() -> None:
    shares = progress_shares({"a": 1.0, "b": 0.5, "c": -0.4}, {"a": 100, "b": 200, "c": 300})
    assert shares["a"] == pytest.approx(0.5) and shares["b"] == pytest.approx(0.5)
    assert shares["c"] == 0.0
    assert sum(shares.values()) == pytest.approx(1.0)


def test_all_against_or_non_finite_gives_equal_shares() -> None:
    assert progress_shares({"a": -1.0, "b": math.nan}, {"a": 1, "b": 1}) == {"a": 0.5, "b": 0.5}
    assert progress_shares({}, {}) == {}
    # A missing sample count counts as 1.
    assert progress_shares({"a": 1.0, "b": 1.0}, {"a": 3}) == {"a": 0.75, "b": 0.25}


def _score(**kw):  # type: ignore[no-untyped-def]
    base = dict(
        selected=["a", "b"],
        delivered={"a", "b"},
        accepted={"a", "b"},
        rejected={},
        stats={"a": {"anomaly": 0.0}, "b": {"anomaly": 0.5}},
        loo_loss_deltas={},
        standing={"a": ClientStanding(contribution_score=0.2)},
        round=2,
        max_failures=None,
    )
    return {r.client_id: r for r in score_round(**{**base, **kw})}


def test_score_round_uses_progress_shares_without_leave_one_out() -> None:
    results = _score(progress={"a": 0.75, "b": 0.25})
    assert results["a"].contribution == 0.75 and results["b"].contribution == 0.25
    assert results["a"].standing.contribution_score == pytest.approx(0.7 * 0.2 + 0.3 * 0.75)
    # Trust still follows the anomaly score, which needs no test data.
    assert results["a"].standing.trust_score == pytest.approx(1.0)
    assert results["b"].standing.trust_score == pytest.approx(0.7 + 0.3 * 0.5)


def test_leave_one_out_deltas_win_when_the_server_evaluated() -> None:
    results = _score(loo_loss_deltas={"a": 0.0, "b": 0.2}, progress={"a": 1.0, "b": 0.0})
    assert results["a"].contribution == 0.0 and results["b"].contribution == 1.0


def test_no_measure_leaves_contribution_as_it_was() -> None:
    results = _score()
    assert results["a"].contribution is None
    assert results["a"].standing.contribution_score == 0.2
