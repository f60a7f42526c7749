"""The policy rule language: validation errors that name rule and field, and evaluation semantics."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from fedloom_core.policy.rules import (
    CONTEXT_SCHEMAS,
    MAX_CONDITIONS,
    PolicyError,
    Rule,
    evaluate,
    field_spec,
    matches,
    render_condition,
    validate_rules,
)
from fedloom_core.schemas import PolicyConfig, dump


def rule(rid: str = "r1", **kw: Any) -> dict[str, Any]:
    """A valid client_selection allow rule, with ``kw`` overriding its fields."""
    base: dict[str, Any] = {"id": rid, "name": rid.upper(), "type": "client_selection", "effect": "allow"}
    base.update(kw)
    return base


def cond(field: str, operator: str, value: Any) -> dict[str, Any]:
    return {"field": field, "operator": operator, "value": value}


def rules(*raw: dict[str, Any]) -> list[Rule]:
    return validate_rules(list(raw))


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        # unknown field for the rule's type
        ([rule(when=cond("gpu", "==", 1))], ["rule #0", "'r1'", "'when'", "unknown field 'gpu'"]),
        (
            [rule(type="round_control", when=cond("trust_score", ">", 0.5))],
            ["'r1'", "unknown field 'trust_score'", "round_control"],
        ),
        ([rule(when=cond("update_norm", ">", 1.0))], ["unknown field 'update_norm'", "client_selection"]),
        ([rule(when=cond("capabilities.", "==", "x"))], ["unknown field 'capabilities.'"]),
        # operator / value mismatches
        ([rule(when=cond("trust_score", "<", [0.5]))], ["'when'", "'<'", "'trust_score'", "not a list"]),
        ([rule(when=cond("status", "in", "active"))], ["'in'", "'status'", "non-empty list"]),
        ([rule(when=cond("status", "not_in", []))], ["'not_in'", "non-empty list"]),
        ([rule(when=cond("trust_score", ">=", "0.5"))], ["'trust_score'", "number"]),
        ([rule(when=cond("trust_score", "==", "high"))], ["'trust_score'", "'high'", "string"]),
        ([rule(when=cond("status", ">", 3))], ["'>'", "'status'", "number field"]),
        ([rule(when=cond("client_id", "in", ["a", 2]))], ["'client_id'", "2 (a number)"]),
        ([rule(when=cond("capabilities.gpu", "<", True))], ["'capabilities.gpu'", "number value"]),
        ([rule(when=cond("round", "==", None))], ["'when.value'", "null"]),
        ([rule(when=cond("round", "==", {"a": 1}))], ["'when.value'", "string, finite number or boolean"]),
        ([rule(when=cond("round", "~=", 1))], ["'when.operator'"]),
        ([rule(when={"all": [cond("round", ">", 1), cond("colour", "==", "red")]})], ["'when.all[1]'", "'colour'"]),
        ([rule(when={"none": []})], ["'when'", "condition"]),
        ([rule(when={"all": []})], ["'when.all'"]),
        # set on a non-configure rule; unknown / invalid set keys; configure without set
        ([rule(effect="deny", set={"batch_size": 8})], ["'r1'", "'set'", "only allowed on configure", "'deny'"]),
        ([rule(effect="configure", set={"epochs": 2})], ["'r1'", "'set.epochs'"]),
        ([rule(effect="configure", set={"batch_size": 0})], ["'set.batch_size'", "greater than or equal to 1"]),
        ([rule(effect="configure", set={"batch_size": 8.5})], ["'set.batch_size'"]),
        ([rule(effect="configure", set={"learning_rate": 0})], ["'set.learning_rate'", "greater than 0"]),
        ([rule(effect="configure", set={"proximal_mu": -0.1})], ["'set.proximal_mu'"]),
        ([rule(effect="configure", set={"local_epochs": "2"})], ["'set.local_epochs'"]),
        ([rule(effect="configure")], ["'r1'", "'set'", "at least one key"]),
        ([rule(effect="configure", set={})], ["'set'", "at least one key"]),
        (
            [rule(type="update_validation", effect="configure", set={"batch_size": 8})],
            ["'effect'", "client_selection and round_control"],
        ),
        # duplicate ids name the second rule and the first
        ([rule("a"), rule("b"), rule("a")], ["rule #2", "'a'", "'id'", "duplicate", "rule #0"]),
        # shape of the rule itself
        ([rule(type="admission")], ["'type'"]),
        ([rule(effect="maybe")], ["'effect'"]),
        ([rule(priority="high")], ["'priority'"]),
        ([rule(color="red")], ["'color'", "Extra inputs"]),
        ([rule("bad id")], ["'bad id'", "'id'"]),
        ([{"name": "x", "type": "client_selection", "effect": "allow"}], ["rule #0", "'id'"]),
        ([rule("ok"), "not a rule"], ["rule #1", "object"]),
    ],
)
def test_validation_errors_name_rule_and_field(raw: list[Any], names: list[str]) -> None:
    with pytest.raises(PolicyError) as err:
        validate_rules(raw)
    message = str(err.value)
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"


def test_validation_limits_depth_and_condition_count() -> None:
    leaf = cond("round", ">=", 1)
    four = {"all": [{"any": [{"all": [{"any": [leaf]}]}]}]}
    assert validate_rules([rule(when=four)])
    with pytest.raises(PolicyError, match=r"'when\.all\[0\]\.all\[0\]\.any\[0\]\.all\[0\]'.*deeper than 4"):
        validate_rules([rule(when={"all": [four]})])
    many = {"any": [{"all": [leaf] * 25}, {"all": [leaf] * 25}]}
    assert validate_rules([rule(when=many)])
    with pytest.raises(PolicyError, match=f"more than {MAX_CONDITIONS} conditions"):
        validate_rules([rule(when={"any": [{"all": [leaf] * 25}, {"all": [leaf] * 26}]})])


def test_validation_accepts_every_schema_field_and_prefixed_keys() -> None:
    for rule_type, schema in CONTEXT_SCHEMAS.items():
        for name, spec in schema.items():
            name = name.replace("*", "some_key")
            value = "x" if str in spec.types else 1
            assert field_spec(rule_type, name) is spec
            effect = "allow" if rule_type == "update_validation" else "deny"
            validate_rules([rule(type=rule_type, effect=effect, when=cond(name, "==", value))])
    assert field_spec("client_selection", "location.region") is not None
    assert field_spec("client_selection", "location.a.b") is None
    assert field_spec("update_validation", "capabilities.memory_gb") is not None


def test_validation_keeps_types_and_not_is_required() -> None:
    [r] = rules(rule(effect="configure", set={"learning_rate": 1, "batch_size": 16}))
    assert r.settings == {"learning_rate": 1.0, "batch_size": 16}
    assert r.when is None and r.priority == 0
    with pytest.raises(PolicyError, match="must be a list"):
        validate_rules({"id": "x"})


def test_policy_config_validates_rules_and_serializes_as_before() -> None:
    ok = PolicyConfig.model_validate({"trust_threshold": 0.7, "rules": [rule(when=cond("round", ">", 1))]})
    assert dump(ok)["rules"] == [rule(when=cond("round", ">", 1))]
    assert "rules" not in dump(PolicyConfig(trust_threshold=0.7))
    with pytest.raises(ValidationError, match=r"rule #0 \(id 'r1'\): field 'when': unknown field 'gpu'"):
        PolicyConfig.model_validate({"rules": [rule(when=cond("gpu", "==", 1))]})


# --- evaluation --------------------------------------------------------------------------------


CTX: dict[str, Any] = {
    "client_id": "c1",
    "status": "active",
    "trust_score": 0.9,
    "recent_failures": 0,
    "round": 3,
    "capabilities": {"compute_power": "low", "memory_gb": 8, "gpu": False},
    "location": {"region": "eu-west-1"},
}


def test_no_rules_and_no_match_default_to_allowed() -> None:
    assert evaluate([], "client_selection", CTX).allowed
    d = evaluate(rules(rule(effect="deny", when=cond("round", ">", 10))), "client_selection", CTX)
    assert d.allowed and d.applied == [] and d.reasons == [] and d.configure == {}


def test_priority_higher_wins_and_ties_keep_list_order() -> None:
    rs = rules(
        rule("allow-all", priority=1),
        rule(
            "deny-eu", name="Deny EU region", effect="deny", priority=5, when=cond("location.region", "==", "eu-west-1")
        ),
        rule("allow-trusted", priority=5, when=cond("trust_score", ">=", 0.8)),
    )
    d = evaluate(rs, "client_selection", CTX)
    assert not d.allowed
    assert d.applied == ["deny-eu"]
    assert d.reasons == ["rule deny-eu (Deny EU region): location.region == 'eu-west-1'"]
    # Swapping the tied rules lets the allow decide first.
    d = evaluate([rs[0], rs[2], rs[1]], "client_selection", CTX)
    assert d.allowed and d.applied == ["allow-trusted"]


def test_first_allow_or_deny_decides_and_stops() -> None:
    rs = rules(
        rule("deny-low-trust", effect="deny", priority=10, when=cond("trust_score", "<", 0.5)),
        rule("allow-eu", priority=5, when=cond("location.region", "==", "eu-west-1")),
        rule("deny-all", effect="deny", priority=1),
        rule("lr-after", effect="configure", priority=0, set={"learning_rate": 0.5}),
    )
    d = evaluate(rs, "client_selection", CTX)
    assert d.allowed and d.applied == ["allow-eu"] and d.configure == {}
    d = evaluate(rs, "client_selection", {**CTX, "location": {"region": "us-east-1"}})
    assert not d.allowed and d.applied == ["deny-all"] and d.reasons[-1].startswith("rule deny-all (DENY-ALL): always")


def test_configure_accumulates_with_higher_priority_winning_per_key() -> None:
    rs = rules(
        rule("small-batch", effect="configure", priority=1, set={"batch_size": 8, "local_epochs": 2}),
        rule(
            "tiny-batch",
            effect="configure",
            priority=9,
            set={"batch_size": 4},
            when=cond("capabilities.memory_gb", "<=", 8),
        ),
        rule("prox", effect="configure", priority=1, set={"proximal_mu": 0.01, "local_epochs": 5}),
        rule("allow", priority=0),
    )
    d = evaluate(rs, "client_selection", CTX)
    assert d.allowed
    assert d.configure == {"batch_size": 4, "local_epochs": 2, "proximal_mu": 0.01}
    assert d.applied == ["tiny-batch", "small-batch", "prox", "allow"]
    # A deny carries no configuration.
    d = evaluate([*rs[:3], *rules(rule("no", effect="deny"))], "client_selection", CTX)
    assert not d.allowed and d.configure == {} and d.applied == ["tiny-batch", "small-batch", "prox", "no"]


def test_all_any_nesting() -> None:
    when = {
        "any": [
            {"all": [cond("location.region", "in", ["eu-west-1", "eu-central-1"]), cond("round", ">=", 3)]},
            {"all": [cond("trust_score", ">", 0.99), {"any": [cond("status", "==", "registered")]}]},
        ]
    }
    [r] = rules(rule(effect="deny", when=when))
    assert matches(r.when, CTX)
    assert not matches(r.when, {**CTX, "round": 2})
    assert matches(r.when, {**CTX, "round": 2, "trust_score": 1.0, "status": "registered"})
    assert not matches(r.when, {**CTX, "round": 2, "trust_score": 1.0})
    assert render_condition(r.when) == (
        "(location.region in ['eu-west-1', 'eu-central-1'] and round >= 3) or "
        "(trust_score > 0.99 and status == 'registered')"
    )


@pytest.mark.parametrize("operator", ["<", "<=", "==", "!=", ">=", ">", "in", "not_in"])
def test_missing_field_never_matches(operator: str) -> None:
    value = [1, 2] if operator in ("in", "not_in") else 1
    for name in ("reliability", "hour_utc", "capabilities.gpu_count"):
        [r] = rules(rule(effect="deny", when=cond(name, operator, value)))
        assert not evaluate([r], "client_selection", {**CTX, "reliability": None}).applied
    assert not matches(rules(rule(when=cond("location.city", "!=", "x")))[0].when, {**CTX, "location": "oops"})


def test_in_not_in_and_prefixed_keys() -> None:
    def hit(c: dict[str, Any], ctx: dict[str, Any] = CTX) -> bool:
        return matches(rules(rule(when=c))[0].when, ctx)

    assert hit(cond("location.region", "in", ["us-east-1", "eu-west-1"]))
    assert not hit(cond("location.region", "not_in", ["us-east-1", "eu-west-1"]))
    assert hit(cond("location.region", "not_in", ["us-east-1"]))
    assert hit(cond("capabilities.compute_power", "==", "low"))
    assert hit(cond("capabilities.memory_gb", ">=", 8)) and not hit(cond("capabilities.memory_gb", ">", 8))
    assert hit(cond("capabilities.gpu", "==", False)) and hit(cond("capabilities.gpu", "in", [False, "none"]))
    assert hit(cond("status", "!=", "inactive"))
    assert hit(cond("trust_score", "in", [0.9, 1])) and hit(cond("round", "==", 3.0))
    # A flat dotted key is found too.
    assert hit(cond("location.region", "==", "us"), {"location.region": "us"})


def test_incompatible_runtime_types_are_false_never_errors() -> None:
    odd = {
        **CTX,
        "trust_score": "high",
        "round": True,
        "recent_failures": float("nan"),
        "capabilities": {"memory_gb": "8", "compute_power": ["low"], "gpu": 0},
    }
    for c in [
        cond("trust_score", ">", 0.5),
        cond("trust_score", "!=", 0.5),
        cond("round", "==", 1),
        cond("round", "in", [1, 3]),
        cond("recent_failures", "!=", 1),
        cond("recent_failures", "not_in", [1]),
        cond("capabilities.memory_gb", ">=", 8),
        cond("capabilities.memory_gb", "not_in", [8]),
        cond("capabilities.compute_power", "==", "low"),
        cond("capabilities.compute_power", "not_in", ["high"]),
        cond("capabilities.gpu", "==", False),
    ]:
        [r] = rules(rule(effect="deny", when=c))
        assert evaluate([r], "client_selection", odd).allowed, c


def test_rules_of_other_types_are_ignored_and_unknown_type_is_an_error() -> None:
    rs = rules(rule("rc", type="round_control", effect="deny"), rule("uv", type="update_validation", effect="deny"))
    assert evaluate(rs, "client_selection", CTX).allowed
    d = evaluate(rs, "update_validation", {**CTX, "update_norm_ratio": 5.0})
    assert not d.allowed and d.applied == ["uv"]
    with pytest.raises(ValueError, match="unknown rule type"):
        evaluate(rs, "admission", CTX)


def test_reason_text_includes_the_rules_reason() -> None:
    [r] = rules(
        rule(
            "big",
            name="Huge update",
            type="update_validation",
            effect="deny",
            reason="likely scaled attack",
            when={"all": [cond("update_norm_ratio", ">", 4), cond("cosine_similarity", "<", 0)]},
        )
    )
    d = evaluate([r], "update_validation", {"update_norm_ratio": 5.5, "cosine_similarity": -0.2})
    assert d.reasons == [
        "rule big (Huge update): update_norm_ratio > 4 and cosine_similarity < 0; likely scaled attack"
    ]


def test_values_are_data_never_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    payload = "__import__('os').system('touch MARKER')"
    raw = [
        rule("p1", effect="deny", when=cond("client_id", "==", payload)),
        rule("p2", effect="deny", when={"any": [cond("location.region", "in", [payload, "x"])]}),
        rule("p3", name=payload, effect="deny", reason=payload, when=cond("capabilities.cmd", "!=", payload)),
    ]
    rs = validate_rules(raw)
    d = evaluate(rs, "client_selection", {**CTX, "capabilities": {"cmd": payload}})
    assert d.allowed and d.applied == []
    d = evaluate(rs, "client_selection", {**CTX, "client_id": payload})
    assert not d.allowed and d.applied == ["p1"] and payload in d.reasons[0]
    with pytest.raises(PolicyError):
        validate_rules([rule(when=cond(payload, "==", 1))])
    PolicyConfig.model_validate({"rules": raw})
    assert not (tmp_path / "MARKER").exists() and not os.path.exists("MARKER")
