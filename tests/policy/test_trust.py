"""Trust, reliability and contribution formulas, checked against hand-computed numbers."""

from __future__ import annotations

import math

import pytest

from fedloom_core.policy import trust as t
from fedloom_core.policy.trust import (
    COSINE_TAU,
    DIRECTION_MARGIN,
    RoundOutcome,
    anomaly_score,
    contribution_shares,
    direction_anomaly,
    norm_anomaly,
    observation,
    reliability,
    replay_trust,
    round_cosine_tau,
    trust_step,
    update_contribution,
    update_trust,
)


def test_constants_are_the_documented_ones() -> None:
    assert (t.TRUST_PRIOR, t.TRUST_LEARNING_RATE) == (1.0, 0.3)
    assert (t.NORM_RATIO_TOLERANCE, t.NORM_RATIO_BOUND, t.COSINE_TAU, t.CONTRIBUTION_EMA) == (1.5, 3.0, 0.0, 0.3)


def test_norm_anomaly() -> None:
    assert norm_anomaly(None) == 0.0
    assert norm_anomaly(0.2) == norm_anomaly(1.0) == norm_anomaly(1.5) == 0.0
    assert norm_anomaly(2.25) == pytest.approx(0.5)  # (2.25 - 1.5) / (3 - 1.5)
    assert norm_anomaly(2.0) == pytest.approx(1 / 3)
    assert norm_anomaly(3.0) == norm_anomaly(30.0) == 1.0
    assert norm_anomaly(math.inf) == norm_anomaly(math.nan) == 1.0
    assert norm_anomaly(3.0, bound=5.0) == pytest.approx(0.4286, abs=1e-4)  # 1.5 / 3.5
    assert norm_anomaly(1.3, bound=1.2) == 1.0 and norm_anomaly(1.1, bound=1.2) == 0.0  # bound below tolerance: step
    with pytest.raises(ValueError):
        norm_anomaly(-1.0)


def test_direction_anomaly() -> None:
    assert direction_anomaly(None) == direction_anomaly(math.nan) == 0.0
    assert direction_anomaly(1.0) == direction_anomaly(0.0) == 0.0
    assert direction_anomaly(-0.5) == pytest.approx(0.5)  # (0 - -0.5) / (0 + 1)
    assert direction_anomaly(-1.0) == 1.0
    assert direction_anomaly(0.0, tau=0.2) == pytest.approx(0.2 / 1.2)
    with pytest.raises(ValueError):
        direction_anomaly(0.5, tau=1.0)


def test_anomaly_is_the_larger_part() -> None:
    assert anomaly_score(2.25, -0.2) == pytest.approx(0.5)
    assert anomaly_score(1.2, -0.8) == pytest.approx(0.8)
    assert anomaly_score(1.0, 0.6) == 0.0
    assert anomaly_score(None, None) == 0.0
    assert anomaly_score(4.0, 0.9, bound=5.5) == pytest.approx(0.625)  # (4 - 1.5) / (5.5 - 1.5)


def test_observation() -> None:
    assert observation(True, True) == 1.0
    assert observation(True, True, 0.25) == 0.75
    assert observation(True, False, 0.0) == 0.0
    assert observation(False, False) == observation(False, True) == 0.0
    assert observation(True, True, 7.0) == 0.0 and observation(True, True, -1.0) == 1.0
    assert observation(True, True, math.nan) == 0.0


def test_update_trust_hand_computed() -> None:
    assert update_trust(1.0, 0.0) == pytest.approx(0.7)
    assert update_trust(0.7, 0.0) == pytest.approx(0.49)
    assert update_trust(0.49, 1.0) == pytest.approx(0.643)  # 0.7 * 0.49 + 0.3
    assert update_trust(0.8, 0.5, rate=0.5) == pytest.approx(0.65)
    assert update_trust(None, 0.0) == pytest.approx(0.7)
    assert update_trust(1.5, 2.0) == 1.0
    with pytest.raises(ValueError):
        update_trust(1.0, 1.0, rate=0.0)


def test_attacker_falls_below_half_by_round_three() -> None:
    final, history = replay_trust(RoundOutcome(r, delivered=True, accepted=False) for r in range(1, 11))
    values = [e.trust for e in history]
    assert values[:3] == pytest.approx([0.7, 0.49, 0.343])
    assert min(r for r, v in enumerate(values, start=1) if v < 0.5) <= 3
    assert all(e.outcome == "rejected" and e.observation == 0.0 for e in history)
    assert final == pytest.approx(0.7**10)
    # Accepted but fully anomalous (a sign-flipper slipping past the filters) falls just as fast.
    a = anomaly_score(1.0, -1.0)
    final, _ = replay_trust(RoundOutcome(r, True, True, a) for r in range(1, 4))
    assert final == pytest.approx(0.343)
    # So does one that never delivers.
    final, history = replay_trust(RoundOutcome(r, False, False) for r in range(1, 4))
    assert final < 0.5 and history[0].outcome == "not_delivered"


def test_honest_client_stays_above_point_nine() -> None:
    # Norm ratios and similarities an honest client shows on non-IID data.
    ratios = [0.8, 1.1, 1.4, 0.9, 1.2, 1.5, 1.0, 0.7, 1.3, 1.1] * 3
    cosines = [0.6, 0.2, 0.4, 0.9, 0.1, 0.5, 0.3, 0.7, 0.05, 0.8] * 3
    outcomes = [
        RoundOutcome(r, True, True, anomaly_score(n, c))
        for r, (n, c) in enumerate(zip(ratios, cosines, strict=True), 1)
    ]
    final, history = replay_trust(outcomes)
    assert final == 1.0 and all(e.trust > 0.9 for e in history)
    # An occasional outlier round (1.8x the median: anomaly 0.2) keeps it above 0.9 too.
    outcomes[4] = RoundOutcome(5, True, True, anomaly_score(1.8, 0.5))
    _, history = replay_trust(outcomes)
    assert history[4].trust == pytest.approx(0.94) and min(e.trust for e in history) > 0.9


def test_trust_step_history_entry() -> None:
    entry = trust_step(0.9, RoundOutcome(4, delivered=True, accepted=True, anomaly=0.5))
    assert entry.as_dict() == {
        "round": 4,
        "outcome": "accepted",
        "anomaly": 0.5,
        "observation": 0.5,
        "trust_before": 0.9,
        "trust": pytest.approx(0.78),  # 0.7 * 0.9 + 0.3 * 0.5
    }
    _, history = replay_trust([RoundOutcome(1, True, False), RoundOutcome(2, True, True)], prior=0.8)
    assert [v for e in history for v in (e.trust_before, e.trust)] == pytest.approx([0.8, 0.56, 0.56, 0.692])


def test_reliability() -> None:
    assert reliability(0, 0) is None
    assert reliability(3, 4) == 0.75
    assert reliability(5, 5) == 1.0 and reliability(0, 2) == 0.0
    for bad in [(3, 2), (-1, 2), (0, -1)]:
        with pytest.raises(ValueError):
            reliability(*bad)


def test_contribution_shares() -> None:
    shares = contribution_shares({"a": 0.3, "b": 0.1, "c": -0.2})
    assert shares == pytest.approx({"a": 0.75, "b": 0.25, "c": 0.0})
    assert contribution_shares({"a": -0.1, "b": 0.0}) == {"a": 0.5, "b": 0.5}
    assert contribution_shares({"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0}) == dict.fromkeys("abcd", 0.25)
    assert contribution_shares({"a": math.nan, "b": 0.2, "c": math.inf}) == {"a": 0.0, "b": 1.0, "c": 0.0}
    assert contribution_shares({}) == {}
    assert sum(contribution_shares({"x": 1e-9, "y": 3.0, "z": 2.5}).values()) == pytest.approx(1.0)


def test_contribution_ema() -> None:
    assert update_contribution(None, 0.4) == 0.4
    assert update_contribution(0.4, 0.1) == pytest.approx(0.31)  # 0.7 * 0.4 + 0.3 * 0.1
    assert update_contribution(0.0, 0.5) == pytest.approx(0.15)
    assert update_contribution(0.5, 0.5, rate=1.0) == 0.5
    score = None
    for share in [0.5, 0.5, 0.5]:
        score = update_contribution(score, share)
    assert score == pytest.approx(0.5)


def test_direction_is_judged_against_the_round() -> None:
    # Near convergence honest deltas cancel: every cosine is negative and none is anomalous.
    converged = [-0.95, -0.9]
    tau = round_cosine_tau(converged)
    assert tau == -1.0
    assert all(anomaly_score(1.0, c, tau=tau) == 0.0 for c in converged)
    # A sign-flipper among agreeing clients is still fully anomalous; the honest ones are not.
    round_ = [0.4, 0.35, 0.3, 0.5, -1.0]
    tau = round_cosine_tau(round_)
    assert tau == pytest.approx(0.35 - DIRECTION_MARGIN)
    assert round_cosine_tau([0.8, 0.9, 0.7]) == COSINE_TAU
    assert anomaly_score(1.0, -1.0, tau=tau) == 1.0
    assert all(anomaly_score(1.0, c, tau=tau) == 0.0 for c in round_[:4])
    # Loosely agreeing non-IID clients: the threshold drops to median - margin, still catching -1.
    tau = round_cosine_tau([0.1, -0.2, 0.05, -1.0])
    assert tau == pytest.approx(-0.075 - DIRECTION_MARGIN)
    assert anomaly_score(1.0, -1.0, tau=tau) == 1.0
    assert anomaly_score(1.0, -0.2, tau=tau) == 0.0
    assert round_cosine_tau([]) == round_cosine_tau([math.nan]) == COSINE_TAU
