"""Client selection: who may take part in a round, and who is sampled.

A pure function over client records, used by the ``select_clients`` activity and by the API's
dry run (``GET /clients/select``), so both always agree.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedloom_core.policy.rules import Decision, Rule, evaluate


@dataclass(frozen=True)
class Candidate:
    """A client as selection sees it: status and trust, plus what client_selection rules may test."""

    client_id: str
    status: str
    trust_score: float
    capabilities: Mapping[str, Any] = field(default_factory=dict, hash=False)
    location: Mapping[str, Any] = field(default_factory=dict, hash=False)
    reliability: float | None = None
    recent_failures: int = 0


@dataclass
class SelectionOutcome:
    selected: list[str]
    excluded: dict[str, str] = field(default_factory=dict)
    policy_results: dict[str, dict] = field(default_factory=dict)
    eligible: int = 0


def select_clients(
    candidates: list[Candidate],
    *,
    round: int,
    min_clients: int,
    client_fraction: float,
    seed: int,
    trust_threshold: float | None = None,
    rules: Sequence[Rule] | None = None,
    now_hour_utc: int | None = None,
    weekday: int | None = None,
) -> SelectionOutcome:
    """Exclude ineligible clients, then sample ``client_fraction`` of the rest (at least ``min_clients``).

    A client is ineligible when inactive, when its trust is strictly below ``trust_threshold``, or
    when the ``client_selection`` rules among ``rules`` deny it (evaluated on
    ``selection_context``, with ``now_hour_utc`` and ``weekday`` taken from the caller's, i.e. the
    workflow's, clock). The ids of the rules that applied join ``policies_applied`` and a non-empty
    configuration from configure rules is kept under ``policy_results[client]["configure"]``.

    The sample is seeded by experiment seed and round, so a rerun with the same seed selects the
    same clients. Fewer eligible clients than ``min_clients`` selects nobody.
    """
    outcome = SelectionOutcome(selected=[])
    eligible: list[str] = []
    for c in sorted(candidates, key=lambda c: c.client_id):
        applied = ["client_status"]
        if c.status == "inactive":
            outcome.excluded[c.client_id] = "Client is inactive"
            outcome.policy_results[c.client_id] = _result(c, False, applied)
            continue
        if trust_threshold is not None:
            applied.append("trust_threshold")
            if c.trust_score < trust_threshold:
                outcome.excluded[c.client_id] = (
                    f"Trust score below threshold ({c.trust_score:.2f} < {trust_threshold:.2f})"
                )
                outcome.policy_results[c.client_id] = _result(c, False, applied)
                continue
        configure: dict[str, Any] = {}
        if rules:
            context = selection_context(c, round=round, hour_utc=now_hour_utc, weekday=weekday)
            decision = evaluate(rules, "client_selection", context)
            applied.extend(decision.applied)
            configure = decision.configure
            if not decision.allowed:
                outcome.excluded[c.client_id] = f"Denied by {decision.reasons[-1]}"
                outcome.policy_results[c.client_id] = _result(c, False, applied, configure)
                continue
        outcome.policy_results[c.client_id] = _result(c, True, applied, configure)
        eligible.append(c.client_id)
    outcome.eligible = len(eligible)
    if len(eligible) < min_clients:
        return outcome
    count = min(len(eligible), max(min_clients, math.ceil(client_fraction * len(eligible))))
    rng = random.Random(seed * 1_000_003 + round)
    outcome.selected = sorted(rng.sample(eligible, count))
    for cid in eligible:
        if cid not in outcome.selected:
            outcome.excluded[cid] = f"Not sampled this round (client_fraction {client_fraction:g})"
    return outcome


def selection_context(
    c: Candidate, *, round: int, hour_utc: int | None = None, weekday: int | None = None
) -> dict[str, Any]:
    """The context client_selection rules see for ``c``; unknown values (None) are left out."""
    context: dict[str, Any] = {
        "client_id": c.client_id,
        "status": c.status,
        "trust_score": c.trust_score,
        "reliability": c.reliability,
        "recent_failures": c.recent_failures,
        "round": round,
        "hour_utc": hour_utc,
        "weekday": weekday,
        "capabilities": dict(c.capabilities or {}),
        "location": dict(c.location or {}),
    }
    return {k: v for k, v in context.items() if v is not None}


def _result(c: Candidate, compliant: bool, applied: list[str], configure: dict[str, Any] | None = None) -> dict:
    result: dict[str, Any] = {
        "trust_score": c.trust_score,
        "compliance": compliant,
        "policies_applied": list(applied),
    }
    if configure:
        result["configure"] = dict(configure)
    return result


def round_control(
    rules: Sequence[Rule] | None, *, round: int, hour_utc: int, weekday: int, registered: int, eligible: int
) -> Decision:
    """Whether round_control rules let the round start now, and what they configure for all its clients."""
    if not rules:
        return Decision(allowed=True)
    context = {
        "round": round,
        "hour_utc": hour_utc,
        "weekday": weekday,
        "registered_clients": registered,
        "eligible_clients": eligible,
    }
    return evaluate(rules, "round_control", context)


def client_configs(
    selected: Sequence[str],
    round_config: Mapping[str, Any],
    strategy_config: Mapping[str, Mapping[str, Any]],
    policy_results: Mapping[str, Mapping[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Each selected client's training settings: round_control's, the strategy's on top, then configure rules'."""
    config: dict[str, dict[str, Any]] = {cid: dict(round_config) for cid in selected}
    for cid, settings in strategy_config.items():
        config.setdefault(cid, {}).update(settings)
    for cid in selected:
        configured = policy_results.get(cid, {}).get("configure") or {}
        if configured:
            config.setdefault(cid, {}).update(configured)
    return {cid: v for cid, v in config.items() if v}
