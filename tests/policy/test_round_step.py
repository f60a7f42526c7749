"""The round's pure steps, without Temporal or a database: the update verdict, its rule context, and scoring."""

from __future__ import annotations

import math

import pytest

from fedloom_core.policy.rules import validate_rules
from fedloom_core.policy.selection import Candidate, client_configs, round_control
from fedloom_core.policy.trust import TRUST_LEARNING_RATE, ClientStanding, score_round
from fedloom_core.policy.validation import UpdateStats, judge_updates, validation_context
from fedloom_core.schemas import PolicyConfig


def _stats(**norms: tuple[float, float, float]) -> dict[str, UpdateStats]:
    return {cid: UpdateStats(cid, *v) for cid, v in norms.items()}


def test_norm_bounds_come_before_similarity_and_rules() -> None:
    stats = _stats(a=(1.0, 1.0, 0.9), b=(50.0, 5.0, 0.9), c=(1.1, 1.1, -0.8))
    policy = PolicyConfig(max_norm_ratio=3.0, min_cosine_similarity=0.0)
    verdict = judge_updates(stats, {"a": 10, "b": 10, "c": 10}, policy, {}, round=1, hour_utc=0, weekday=0)
    assert verdict.accepted == ["a"]
    assert "above max_norm_ratio 3" in verdict.rejected["b"]
    assert "below min_cosine_similarity 0" in verdict.rejected["c"]
    # Every update is measured and scored for anomaly, accepted or not.
    assert set(verdict.stats) == {"a", "b", "c"}
    assert verdict.stats["a"]["anomaly"] == 0.0
    assert verdict.stats["b"]["anomaly"] == 1.0


def test_update_validation_rules_see_the_clients_standing() -> None:
    rules = [
        {
            "id": "trusted-only",
            "name": "trusted only",
            "type": "update_validation",
            "effect": "deny",
            "when": {"field": "trust_score", "operator": "<", "value": 0.5},
        }
    ]
    validate_rules(rules)
    policy = PolicyConfig(rules=rules)
    standing = {"low": Candidate("low", "active", 0.3), "high": Candidate("high", "active", 0.9)}
    stats = _stats(low=(1.0, 1.0, 1.0), high=(1.0, 1.0, 1.0))
    verdict = judge_updates(stats, {"low": 5, "high": 5}, policy, standing, round=2, hour_utc=3, weekday=4)
    assert verdict.accepted == ["high"]
    assert "trusted-only" in verdict.rejected["low"]


def test_validation_context_defaults_for_an_unknown_client_and_flattens_capabilities() -> None:
    st = UpdateStats("x", 2.0, 1.5, 0.25)
    unknown = validation_context(None, st, client_id="x", num_samples=7, round=3, hour_utc=1, weekday=2)
    assert (unknown["status"], unknown["trust_score"], unknown["recent_failures"]) == ("registered", 1.0, 0)
    assert (unknown["update_norm"], unknown["update_norm_ratio"], unknown["num_samples"]) == (2.0, 1.5, 7)
    known = Candidate("x", "active", 0.8, capabilities={"gpu": True}, location={"region": "eu"}, reliability=0.5)
    ctx = validation_context(known, st, client_id="x", num_samples=7, round=3, hour_utc=1, weekday=2)
    assert ctx["capabilities.gpu"] is True and ctx["location.region"] == "eu"
    assert (ctx["trust_score"], ctx["reliability"]) == (0.8, 0.5)


def test_score_round_moves_trust_counts_and_contribution() -> None:
    prior = {"a": ClientStanding(trust_score=1.0, contribution_score=0.5, selections=3, deliveries=3)}
    results = score_round(
        selected=["a", "b", "c"],
        delivered={"a", "b"},
        accepted={"a"},
        rejected={"b": "too large"},
        stats={"a": {"anomaly": 0.0}, "b": {"anomaly": 0.2}},
        loo_loss_deltas={"a": 0.3},
        standing=prior,
        round=4,
        max_failures=0,
    )
    by_id = {r.client_id: r for r in results}
    a, b, c = by_id["a"], by_id["b"], by_id["c"]
    assert a.standing.trust_score == 1.0 and (a.standing.selections, a.standing.deliveries) == (4, 4)
    assert a.contribution == 1.0  # the only positive delta takes the whole share
    assert a.standing.contribution_score == pytest.approx(0.7 * 0.5 + 0.3 * 1.0)
    assert b.standing.trust_score == pytest.approx(1.0 - TRUST_LEARNING_RATE)
    assert (b.reason, b.client_status) == ("too large", "active")
    assert (c.reason, c.client_status) == ("no update before the deadline", "inactive")
    # One failure is above max_failures=0: both failing clients leave the experiment.
    assert b.standing.status == c.standing.status == "inactive" and a.standing.status == "active"
    assert prior["a"].selections == 3, "the caller's records are not changed"


def test_round_control_and_client_configs() -> None:
    rules = validate_rules(
        [
            {
                "id": "wait-for-five",
                "name": "wait for five",
                "type": "round_control",
                "effect": "deny",
                "when": {"field": "eligible_clients", "operator": "<", "value": 5},
            }
        ]
    )
    held = round_control(rules, round=1, hour_utc=0, weekday=0, registered=10, eligible=4)
    assert not held.allowed and "wait-for-five" in held.reasons[-1]
    assert round_control(rules, round=1, hour_utc=0, weekday=0, registered=10, eligible=5).allowed
    assert round_control(None, round=1, hour_utc=0, weekday=0, registered=0, eligible=0).allowed
    configs = client_configs(
        ["a", "b", "c"],
        {"epochs": 2},
        {"a": {"proximal_mu": 0.1}},
        {"b": {"configure": {"epochs": 5}}},
    )
    assert configs == {"a": {"epochs": 2, "proximal_mu": 0.1}, "b": {"epochs": 5}, "c": {"epochs": 2}}
    assert client_configs(["a"], {}, {}, {}) == {}


def test_non_finite_norm_ratio_is_fully_anomalous_and_rejected_by_a_bound() -> None:
    stats = _stats(a=(1.0, math.inf, 1.0))
    verdict = judge_updates(stats, {"a": 1}, PolicyConfig(max_norm_ratio=2.0), {}, round=1, hour_utc=0, weekday=0)
    assert verdict.accepted == [] and verdict.stats["a"]["anomaly"] == 1.0
