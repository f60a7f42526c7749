"""Client selection with client_selection rules: deny, configure, and unchanged behaviour without rules."""

from __future__ import annotations

from typing import Any

from fedloom_core.policy.rules import validate_rules
from fedloom_core.policy.selection import Candidate, select_clients, selection_context

DENY_EU = {
    "id": "deny-eu",
    "name": "Deny EU region",
    "type": "client_selection",
    "priority": 100,
    "effect": "deny",
    "when": {"field": "location.region", "operator": "in", "value": ["eu-west-1", "eu-central-1"]},
}
SMALL_BATCH = {
    "id": "low-compute-batch",
    "name": "Small batches on weak devices",
    "type": "client_selection",
    "priority": 200,
    "effect": "configure",
    "when": {"field": "capabilities.compute_power", "operator": "==", "value": "low"},
    "set": {"batch_size": 8, "local_epochs": 1},
}


def clients() -> list[Candidate]:
    return [
        Candidate("c1", "active", 0.95, location={"region": "us-east-1"}, capabilities={"compute_power": "high"}),
        Candidate("c2", "active", 0.90, location={"region": "eu-west-1"}, capabilities={"compute_power": "high"}),
        Candidate("c3", "registered", 1.0, location={"region": "ap-south-1"}, capabilities={"compute_power": "low"}),
        Candidate("c4", "active", 0.65, location={"region": "us-east-1"}, capabilities={"compute_power": "low"}),
        Candidate("c5", "inactive", 1.0, location={"region": "eu-west-1"}),
    ]


def select(**kw: Any):  # type: ignore[no-untyped-def]
    args: dict[str, Any] = {"round": 1, "min_clients": 1, "client_fraction": 1.0, "seed": 0, "trust_threshold": 0.7}
    args.update(kw)
    return select_clients(clients(), **args)


def test_deny_by_region_excludes_with_the_rule_reason() -> None:
    out = select(rules=validate_rules([DENY_EU]))
    assert out.selected == ["c1", "c3"]
    assert out.eligible == 2
    assert (
        out.excluded["c2"]
        == "Denied by rule deny-eu (Deny EU region): location.region in ['eu-west-1', 'eu-central-1']"
    )
    assert out.policy_results["c2"] == {
        "trust_score": 0.90,
        "compliance": False,
        "policies_applied": ["client_status", "trust_threshold", "deny-eu"],
    }
    assert out.policy_results["c1"]["policies_applied"] == ["client_status", "trust_threshold"]
    assert out.policy_results["c1"]["compliance"] is True


def test_trust_threshold_comes_first_with_its_reason_text() -> None:
    out = select(rules=validate_rules([DENY_EU]))
    assert out.excluded["c4"] == "Trust score below threshold (0.65 < 0.70)"
    assert out.policy_results["c4"]["policies_applied"] == ["client_status", "trust_threshold"]
    assert out.excluded["c5"] == "Client is inactive"


def test_configure_batch_size_for_low_compute() -> None:
    out = select(rules=validate_rules([DENY_EU, SMALL_BATCH]))
    assert out.selected == ["c1", "c3"]
    assert out.policy_results["c3"] == {
        "trust_score": 1.0,
        "compliance": True,
        "policies_applied": ["client_status", "trust_threshold", "low-compute-batch"],
        "configure": {"batch_size": 8, "local_epochs": 1},
    }
    assert "configure" not in out.policy_results["c1"]


def test_time_context_comes_from_arguments() -> None:
    night = validate_rules(
        [
            {
                "id": "no-weekend-nights",
                "name": "Quiet hours",
                "type": "client_selection",
                "effect": "deny",
                "when": {
                    "all": [
                        {"field": "weekday", "operator": ">=", "value": 5},
                        {"any": [{"field": "hour_utc", "operator": "<", "value": 6}]},
                    ]
                },
            }
        ]
    )
    assert select(rules=night).selected == ["c1", "c2", "c3"]  # no clock given: the fields are missing
    assert select(rules=night, now_hour_utc=3, weekday=2).selected == ["c1", "c2", "c3"]
    out = select(rules=night, now_hour_utc=3, weekday=6, min_clients=1)
    assert out.selected == [] and out.eligible == 0
    assert out.excluded["c1"].startswith("Denied by rule no-weekend-nights (Quiet hours): weekday >= 5 and")


def test_rules_see_reliability_and_failures() -> None:
    rs = validate_rules(
        [
            {
                "id": "flaky",
                "name": "Flaky clients",
                "type": "client_selection",
                "effect": "deny",
                "when": {
                    "any": [
                        {"field": "reliability", "operator": "<", "value": 0.5},
                        {"field": "recent_failures", "operator": ">=", "value": 3},
                    ]
                },
            }
        ]
    )
    cands = [
        Candidate("a", "active", 1.0, reliability=0.4),
        Candidate("b", "active", 1.0, reliability=None, recent_failures=1),
        Candidate("c", "active", 1.0, reliability=0.9, recent_failures=3),
    ]
    out = select_clients(cands, round=2, min_clients=1, client_fraction=1.0, seed=0, rules=rs)
    assert out.selected == ["b"] and sorted(out.excluded) == ["a", "c"]
    ctx = selection_context(cands[1], round=2, hour_utc=None, weekday=4)
    assert ctx == {
        "client_id": "b",
        "status": "active",
        "trust_score": 1.0,
        "recent_failures": 1,
        "round": 2,
        "weekday": 4,
        "capabilities": {},
        "location": {},
    }


def test_no_rules_gives_identical_outcome() -> None:
    base = select_clients(
        [Candidate("a", "active", 0.9), Candidate("b", "active", 0.6), Candidate("c", "inactive", 1.0)],
        round=3,
        min_clients=1,
        client_fraction=0.5,
        seed=7,
        trust_threshold=0.7,
    )
    for rules in (None, [], validate_rules([{**DENY_EU, "type": "round_control", "when": None}])):
        again = select_clients(
            [Candidate("a", "active", 0.9), Candidate("b", "active", 0.6), Candidate("c", "inactive", 1.0)],
            round=3,
            min_clients=1,
            client_fraction=0.5,
            seed=7,
            trust_threshold=0.7,
            rules=rules,
            now_hour_utc=12,
            weekday=1,
        )
        assert again == base
    assert base.selected == ["a"]
    assert base.excluded == {
        "b": "Trust score below threshold (0.60 < 0.70)",
        "c": "Client is inactive",
    }
    assert base.policy_results["a"] == {
        "trust_score": 0.9,
        "compliance": True,
        "policies_applied": ["client_status", "trust_threshold"],
    }
