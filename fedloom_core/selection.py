"""Client selection: who may take part in a round, and who is sampled.

A pure function over client records, used by the ``select_clients`` activity and by the API's
dry run (``GET /clients/select``), so both always agree.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    client_id: str
    status: str
    trust_score: float


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
) -> SelectionOutcome:
    """Exclude ineligible clients, then sample ``client_fraction`` of the rest (at least ``min_clients``).

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
        outcome.policy_results[c.client_id] = _result(c, True, applied)
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


def _result(c: Candidate, compliant: bool, applied: list[str]) -> dict:
    return {"trust_score": c.trust_score, "compliance": compliant, "policies_applied": list(applied)}
