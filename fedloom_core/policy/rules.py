"""The policy rule language: declarative, typed rules and their evaluator.

Policies are data, never code: a rule is a JSON object with a typed condition tree, an effect and a
priority. Nothing here evaluates strings as code; every value is compared with ``<``, ``==``, ``in``
and friends on plain Python values. See ``docs/policies.md`` for the language and its semantics.

Evaluation semantics, in short:

* Rules of the requested type are walked by priority, highest first; equal priorities keep the
  order of the rule list.
* A matching ``configure`` rule contributes its ``set`` (a key set by a higher-priority rule is kept)
  and evaluation goes on.
* The first matching ``allow`` or ``deny`` rule decides and ends the evaluation; a deny carries no
  configuration. With no matching ``allow``/``deny`` the subject is **allowed** (default allow).
* A condition on a field missing from the context (or ``None`` there) is false, whatever the
  operator. A comparison between incompatible runtime types is false, never an exception.
"""

from __future__ import annotations

import math
import operator as op
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictFloat,
    StrictInt,
    Tag,
    ValidationError,
    field_validator,
)

from fedloom_core.ids import check_id

RuleType = Literal["client_selection", "update_validation", "round_control"]
Operator = Literal["<", "<=", "==", "!=", ">=", ">", "in", "not_in"]
Effect = Literal["allow", "deny", "configure"]

RULE_TYPES: tuple[str, ...] = ("client_selection", "update_validation", "round_control")
MAX_RULES = 200
MAX_DEPTH = 4  # nesting of all/any groups in one rule
MAX_CONDITIONS = 50  # conditions in one rule
MAX_LIST_ITEMS = 1000  # items in one in/not_in list
_ORDERING = {"<": op.lt, "<=": op.le, ">=": op.ge, ">": op.gt}


class PolicyError(ValueError):
    """A policy rule is invalid; the message names the rule (index and id) and the field."""


class FieldSpec(NamedTuple):
    """A context field's accepted Python types and its meaning."""

    types: tuple[type, ...]
    description: str


_NUM = (int, float)
_ANY_SCALAR = (str, int, float, bool)
_SELECTION: dict[str, FieldSpec] = {
    "client_id": FieldSpec((str,), "The client's id."),
    "status": FieldSpec((str,), "The client's status: registered, active or inactive."),
    "trust_score": FieldSpec(_NUM, "The client's trust score in [0, 1] (see fedloom_core.policy.trust)."),
    "reliability": FieldSpec(_NUM, "On-time deliveries / selections in [0, 1]; missing if never selected."),
    "recent_failures": FieldSpec((int,), "Rounds the client recently failed (missed, late or rejected)."),
    "round": FieldSpec((int,), "The round being decided, counted from 1."),
    "hour_utc": FieldSpec((int,), "Hour of the workflow's clock, 0-23 UTC; missing if the caller gives none."),
    "weekday": FieldSpec((int,), "Day of the workflow's clock, 0 = Monday ... 6 = Sunday; missing if not given."),
    "capabilities.*": FieldSpec(_ANY_SCALAR, "Any key the client declared in its capabilities."),
    "location.*": FieldSpec(_ANY_SCALAR, "Any key the client declared in its location (e.g. region)."),
}
_UPDATE: dict[str, FieldSpec] = {
    **_SELECTION,
    "update_norm": FieldSpec(_NUM, "L2 norm of the update (new weights minus the round's global model)."),
    "update_norm_ratio": FieldSpec(_NUM, "update_norm divided by the median update norm of the round."),
    "cosine_similarity": FieldSpec(_NUM, "Cosine similarity of the update to the mean of the other updates."),
    "num_samples": FieldSpec((int,), "Training samples the client reports for the update."),
}
_ROUND: dict[str, FieldSpec] = {
    "round": _SELECTION["round"],
    "hour_utc": _SELECTION["hour_utc"],
    "weekday": _SELECTION["weekday"],
    "registered_clients": FieldSpec((int,), "Clients registered with the server."),
    "eligible_clients": FieldSpec((int,), "Clients eligible for the round (status and trust checks passed)."),
}
CONTEXT_SCHEMAS: dict[str, dict[str, FieldSpec]] = {
    "client_selection": _SELECTION,
    "update_validation": _UPDATE,
    "round_control": _ROUND,
}
"""Per rule type: context field name -> FieldSpec. ``prefix.*`` stands for any ``prefix.<key>``."""


def field_spec(rule_type: str, name: str) -> FieldSpec | None:
    """The FieldSpec of ``name`` for ``rule_type`` rules, or None if rules of that type cannot use it."""
    schema = CONTEXT_SCHEMAS.get(rule_type, {})
    if name in schema and not name.endswith(".*"):
        return schema[name]
    prefix, dot, key = name.partition(".")
    if dot and key and all(ch.isalnum() or ch in "_-" for ch in key):
        return schema.get(f"{prefix}.*")
    return None


def _kind(value: Any) -> str | None:
    """The comparison kind of a value: ``bool``, ``number``, ``string``, or None (not comparable, e.g. NaN)."""
    if isinstance(value, bool | str):
        return "bool" if isinstance(value, bool) else "string"
    if isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value)):
        return "number"
    return None


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Condition(_Model):
    """One comparison: ``{"field": ..., "operator": ..., "value": ...}``."""

    field: str = Field(min_length=1, max_length=200)
    operator: Operator
    value: Any

    @field_validator("value")
    @classmethod
    def _json_value(cls, v: Any) -> Any:
        """Check that the value is a non-null JSON scalar or a bounded list of them."""
        items = v if isinstance(v, list) else [v]
        if isinstance(v, list) and len(v) > MAX_LIST_ITEMS:
            raise ValueError(f"a list value has at most {MAX_LIST_ITEMS} items")
        for item in items:
            if item is None:
                raise ValueError("null is not comparable (a condition on a missing field is always false)")
            if _kind(item) is None or (isinstance(item, float) and math.isinf(item)):
                raise ValueError("value must be a string, finite number or boolean, or a list of them")
        return v


class AllOf(_Model):
    """A group that matches when all of its members match: ``{"all": [...]}``."""

    all_: list[When] = Field(alias="all", min_length=1, max_length=MAX_CONDITIONS)


class AnyOf(_Model):
    """A group that matches when at least one member matches: ``{"any": [...]}``."""

    any_: list[When] = Field(alias="any", min_length=1, max_length=MAX_CONDITIONS)


def _when_tag(v: Any) -> str | None:
    """Which shape a ``when`` node has: a condition, an ``all`` group or an ``any`` group (None: neither)."""
    if isinstance(v, Condition | AllOf | AnyOf):
        return {Condition: "<condition>", AllOf: "<all>", AnyOf: "<any>"}[type(v)]
    if not isinstance(v, dict):
        return None
    if "all" in v or "any" in v:
        return "<all>" if "all" in v else "<any>"
    return "<condition>" if {"field", "operator", "value"} & v.keys() else None


When = Annotated[
    Annotated[Condition, Tag("<condition>")] | Annotated[AllOf, Tag("<all>")] | Annotated[AnyOf, Tag("<any>")],
    Discriminator(
        _when_tag,
        custom_error_type="invalid_condition",
        custom_error_message="must be a condition {field, operator, value} or a group {all: [...]} / {any: [...]}",
    ),
]
AllOf.model_rebuild()
AnyOf.model_rebuild()


class ConfigureSet(_Model):
    """What a ``configure`` rule may set: training parameters of the selected client or the round."""

    batch_size: StrictInt | None = Field(default=None, ge=1, le=65536)
    local_epochs: StrictInt | None = Field(default=None, ge=1, le=1000)
    learning_rate: StrictFloat | None = Field(default=None, gt=0, le=10)
    proximal_mu: StrictFloat | None = Field(default=None, ge=0, le=1000)


class Rule(_Model):
    """A policy rule: when ``when`` matches a context of its ``type``, apply ``effect``."""

    id: str
    name: str = Field(min_length=1, max_length=200)
    type: RuleType
    priority: StrictInt = Field(default=0, ge=-1_000_000, le=1_000_000)
    effect: Effect
    when: When | None = None
    set_: ConfigureSet | None = Field(default=None, alias="set")
    reason: str | None = Field(default=None, max_length=500)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        """Check that the id is a safe identifier (it appears in reasons and policies_applied)."""
        return check_id(v, "rule id")

    @property
    def settings(self) -> dict[str, Any]:
        """The values this rule sets (only the keys it names); empty for non-configure rules."""
        return {} if self.set_ is None else self.set_.model_dump(exclude_none=True)


@dataclass
class Decision:
    """The outcome of evaluating rules of one type on one context.

    ``applied`` lists the ids of the rules that matched, in evaluation order; ``reasons`` holds one
    human-readable line per applied rule, so after a deny the last reason is the deciding one.
    """

    allowed: bool = True
    configure: dict[str, Any] = field(default_factory=dict)
    applied: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


def _label(index: int, raw: Any) -> str:
    """How error messages name a rule: ``rule #<index> (id '<id>')``."""
    rid = raw.id if isinstance(raw, Rule) else raw.get("id") if isinstance(raw, dict) else None
    return f"rule #{index}" + (f" (id {rid!r})" if isinstance(rid, str) else "")


def _loc(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as a dotted path, e.g. ``when.all[0].operator``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith("<"):  # discriminator tags are not fields
            out += f".{part}" if out else str(part)
    return out or "rule"


def _check_condition(cond: Condition, rule_type: str, label: str, path: str) -> None:
    """Check that a condition's field exists for ``rule_type`` and that operator and value fit its type."""
    where = f"{label}: field {path!r}"
    spec = field_spec(rule_type, cond.field)
    if spec is None:
        known = ", ".join(CONTEXT_SCHEMAS[rule_type])
        raise PolicyError(f"{where}: unknown field {cond.field!r} for {rule_type} rules; known: {known}")
    kinds = {"string" if t is str else "bool" if t is bool else "number" for t in spec.types}
    o, v = cond.operator, cond.value
    subject = f"{where}: operator {o!r} on field {cond.field!r}"
    if o in ("in", "not_in"):
        if not isinstance(v, list) or not v:
            raise PolicyError(f"{subject} needs a non-empty list value, got {_fmt(v)}")
        values = v
    elif isinstance(v, list):
        hint = "; use 'in' / 'not_in' for a list" if o in ("==", "!=") else ""
        raise PolicyError(f"{subject} takes a single value, not a list{hint}")
    else:
        values = [v]
    if o in _ORDERING and ("number" not in kinds or _kind(v) != "number"):
        raise PolicyError(f"{subject} needs a number field and a number value, got {_fmt(v)}")
    for item in values:
        if _kind(item) not in kinds:
            want = " or ".join(sorted(kinds))
            raise PolicyError(f"{subject} compares a {want} field to {_fmt(item)} (a {_kind(item)})")


def _check_when(
    node: Condition | AllOf | AnyOf, rule_type: str, label: str, path: str, depth: int, count: list[int]
) -> None:
    """Check a condition tree; ``depth`` counts the groups around ``node``, ``count`` the conditions seen."""
    if isinstance(node, Condition):
        count[0] += 1
        if count[0] > MAX_CONDITIONS:
            raise PolicyError(f"{label}: field {path!r}: more than {MAX_CONDITIONS} conditions in one rule")
        _check_condition(node, rule_type, label, path)
        return
    if depth >= MAX_DEPTH:
        raise PolicyError(f"{label}: field {path!r}: groups are nested deeper than {MAX_DEPTH} levels")
    key, members = ("all", node.all_) if isinstance(node, AllOf) else ("any", node.any_)
    for i, member in enumerate(members):
        _check_when(member, rule_type, label, f"{path}.{key}[{i}]", depth + 1, count)


def _check_rule(rule: Rule, label: str) -> None:
    """Check what a parsed rule's model cannot: ``set`` against the effect, and the condition tree."""
    if rule.effect != "configure" and rule.set_ is not None:
        raise PolicyError(f"{label}: field 'set' is only allowed on configure rules (effect is {rule.effect!r})")
    if rule.effect == "configure":
        if not rule.settings:
            raise PolicyError(f"{label}: field 'set': a configure rule must set at least one key")
        if rule.type == "update_validation":
            raise PolicyError(f"{label}: field 'effect': configure applies to client_selection and round_control")
    if rule.when is not None:
        _check_when(rule.when, rule.type, label, "when", 0, [0])


def validate_rules(rules_json: Any) -> list[Rule]:
    """Parse and check a list of rule objects, raising PolicyError naming the rule and the field."""
    if not isinstance(rules_json, list | tuple):
        raise PolicyError(f"rules must be a list of rule objects, got {type(rules_json).__name__}")
    if len(rules_json) > MAX_RULES:
        raise PolicyError(f"at most {MAX_RULES} rules are allowed, got {len(rules_json)}")
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(rules_json):
        label = _label(index, raw)
        if not isinstance(raw, dict | Rule):
            raise PolicyError(f"{label}: must be an object, got {type(raw).__name__}")
        try:
            rule = raw if isinstance(raw, Rule) else Rule.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            raise PolicyError(f"{label}: field {_loc(err['loc'])!r}: {err['msg']}") from None
        _check_rule(rule, label)
        if rule.id in seen:
            raise PolicyError(f"{label}: field 'id': duplicate rule id {rule.id!r} (also rule #{seen[rule.id]})")
        seen[rule.id] = index
        rules.append(rule)
    return rules


def _lookup(context: Mapping[str, Any], name: str) -> tuple[bool, Any]:
    """``(found, value)`` of a field: a flat key first, else ``context[prefix][key]`` for dotted names."""
    if name in context:
        value = context[name]
    else:
        prefix, dot, key = name.partition(".")
        sub = context.get(prefix) if dot else None
        if not isinstance(sub, Mapping) or key not in sub:
            return False, None
        value = sub[key]
    return value is not None, value


def _compare(actual: Any, operator: str, expected: Any) -> bool:
    """Compare a context value with a rule value; incompatible kinds give False."""
    kind = _kind(actual)
    if kind is None:
        return False
    try:
        if operator in ("in", "not_in"):
            same = [e for e in expected if _kind(e) == kind] if isinstance(expected, list) else []
            if not same:
                return False
            hit = any(e == actual for e in same)
            return hit if operator == "in" else not hit
        if _kind(expected) != kind:
            return False
        if operator == "==":
            return bool(actual == expected)
        if operator == "!=":
            return bool(actual != expected)
        return kind == "number" and bool(_ORDERING[operator](actual, expected))
    except (TypeError, ValueError, KeyError, OverflowError):
        return False


def matches(node: Condition | AllOf | AnyOf | None, context: Mapping[str, Any]) -> bool:
    """Whether a condition tree matches ``context``; no condition (None) always matches."""
    if node is None:
        return True
    if isinstance(node, Condition):
        found, value = _lookup(context, node.field)
        return found and _compare(value, node.operator, node.value)
    if isinstance(node, AllOf):
        return all(matches(member, context) for member in node.all_)
    return any(matches(member, context) for member in node.any_)


def _fmt(value: Any) -> str:
    """A rule value as text: strings quoted, booleans as JSON, lists bracketed."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return repr(value)


def render_condition(node: Condition | AllOf | AnyOf | None, top: bool = True) -> str:
    """A condition tree as readable text, e.g. ``location.region == 'eu-west-1' and round >= 3``."""
    if node is None:
        return "always"
    if isinstance(node, Condition):
        return f"{node.field} {node.operator} {_fmt(node.value)}"
    joiner, members = (" and ", node.all_) if isinstance(node, AllOf) else (" or ", node.any_)
    text = joiner.join(render_condition(m, top=False) for m in members)
    return text if top or len(members) == 1 else f"({text})"


def describe(rule: Rule) -> str:
    """One line saying why ``rule`` applied: ``rule <id> (<name>): <condition>[; <reason>]``."""
    text = f"rule {rule.id} ({rule.name}): {render_condition(rule.when)}"
    return f"{text}; {rule.reason}" if rule.reason else text


def evaluate(rules: Sequence[Rule], rule_type: str, context: Mapping[str, Any]) -> Decision:
    """Evaluate the ``rule_type`` rules on ``context`` (see the module docstring for the semantics)."""
    if rule_type not in RULE_TYPES:
        raise ValueError(f"unknown rule type {rule_type!r}; known: {', '.join(RULE_TYPES)}")
    decision = Decision()
    ordered = sorted((r for r in rules if r.type == rule_type), key=lambda r: -r.priority)  # stable on ties
    for rule in ordered:
        if not matches(rule.when, context):
            continue
        decision.applied.append(rule.id)
        decision.reasons.append(describe(rule))
        if rule.effect == "configure":
            for key, value in rule.settings.items():
                decision.configure.setdefault(key, value)
            continue
        decision.allowed = rule.effect == "allow"
        if not decision.allowed:
            decision.configure = {}
        break
    return decision
