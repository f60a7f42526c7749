"""Client scores as pure functions: trust, reliability and contribution.

Nothing here touches a database, a model or a clock; activities feed in what a round measured and
store what comes out. ``docs/policies.md`` gives the same formulas with a worked example.

Trust
    Starts at ``TRUST_PRIOR`` = 1.0. After each round in which the client was selected::

        o     = 0                 if the update was rejected or not delivered in time
              = 1 - anomaly       otherwise
        trust = (1 - lambda) * trust + lambda * o          lambda = TRUST_LEARNING_RATE = 0.3

    so a client rejected from round 1 on has trust 0.7, 0.49, 0.343, ... (0.7 ** n): below a 0.5
    threshold after its second round, while an honest client (o = 1) keeps 1.0 and one with a
    single missed round recovers above 0.9 within four good rounds (0.7, 0.79, 0.853, 0.897, 0.928).
    The prior is 1.0 rather than lower because the prior is what every new client is judged by:
    with 0.8, honest newcomers would start below a 0.9 threshold, and a client's record, not its
    age, should exclude it. The database's default ``trust_score`` is also 1.0.

Anomaly (in [0, 1], from the update's measurements; a missing measurement contributes 0)::

        norm part      = clip((norm_ratio - NORM_RATIO_TOLERANCE) / (bound - NORM_RATIO_TOLERANCE), 0, 1)
        direction part = clip((COSINE_TAU - cosine_similarity) / (COSINE_TAU + 1), 0, 1)
        anomaly        = max(norm part, direction part)

    with NORM_RATIO_TOLERANCE = 1.5, bound = the policy's ``max_norm_ratio`` (5 unless the policy
    sets it), or NORM_RATIO_BOUND = 3.0 when that is null, and COSINE_TAU = 0.0: updates up to 1.5x
    the round's median norm and pointing the same way as the others (cosine >= 0) are not anomalous
    at all; ``bound`` x the median, or the opposite direction (cosine -1, a sign-flipping attacker),
    is fully anomalous. A norm ratio that is NaN or infinite is fully anomalous.

    The direction is judged against the round (``round_cosine_tau``): tau is lowered to the round's
    median cosine minus DIRECTION_MARGIN = 0.5 when that is below 0. Near convergence honest deltas
    cancel out (each points away from the sum of the others), so every client's cosine is negative;
    only a client far below its round's typical direction is anomalous then.

Reliability
    on-time deliveries / selections, or None when the client was never selected.

Contribution
    Per round, from leave-one-out loss deltas d_i = loss(without i) - loss(with all): shares
    s_i = max(d_i, 0) / sum_j max(d_j, 0) over the round's participants (all zero: equal shares
    1/n). The score is an EMA over the rounds the client took part in::

        score = (1 - CONTRIBUTION_EMA) * score + CONTRIBUTION_EMA * s_i     (first round: score = s_i)

    Without central evaluation (no test data on the server) the shares come from each accepted
    update's part in the round's progress instead: c_i = cosine(delta_i, step), where delta_i is the
    update minus the previous global model and step the new global model minus the previous one, and
    s_i = max(c_i, 0) * n_i / sum_j max(c_j, 0) * n_j (n_i: the update's samples; all zero: equal shares).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

TRUST_PRIOR = 1.0
TRUST_LEARNING_RATE = 0.3
NORM_RATIO_TOLERANCE = 1.5
NORM_RATIO_BOUND = 3.0
COSINE_TAU = 0.0
CONTRIBUTION_EMA = 0.3
DIRECTION_MARGIN = 0.5


def _clip01(x: float) -> float:
    return min(max(x, 0.0), 1.0)


def _check_rate(rate: float, what: str) -> None:
    if not (0.0 < rate <= 1.0):
        raise ValueError(f"{what} must be in (0, 1], got {rate!r}")


def norm_anomaly(
    norm_ratio: float | None, *, tolerance: float = NORM_RATIO_TOLERANCE, bound: float = NORM_RATIO_BOUND
) -> float:
    """The norm part of the anomaly: 0 up to ``tolerance`` x the median norm, 1 from ``bound`` x on."""
    if norm_ratio is None:
        return 0.0
    if math.isnan(norm_ratio) or math.isinf(norm_ratio):
        return 1.0
    if norm_ratio < 0:
        raise ValueError(f"norm_ratio cannot be negative, got {norm_ratio!r}")
    start = min(tolerance, bound)
    if norm_ratio >= bound:
        return 1.0
    if norm_ratio <= start:
        return 0.0
    return _clip01((norm_ratio - start) / (bound - start))


def direction_anomaly(cosine_similarity: float | None, *, tau: float = COSINE_TAU) -> float:
    """The direction part of the anomaly: 0 at cosine >= ``tau``, rising linearly to 1 at cosine -1."""
    if cosine_similarity is None or math.isnan(cosine_similarity):
        return 0.0
    if not (-1.0 <= tau < 1.0):
        raise ValueError(f"tau must be in [-1, 1), got {tau!r}")
    if tau == -1.0:
        return 0.0
    return _clip01((tau - cosine_similarity) / (tau + 1.0))


def round_cosine_tau(cosines: Iterable[float], *, tau: float = COSINE_TAU) -> float:
    """The direction threshold for one round: ``tau``, or the round's median cosine minus DIRECTION_MARGIN if lower."""
    finite = sorted(c for c in cosines if not math.isnan(c))
    if not finite:
        return tau
    mid = len(finite) // 2
    median = finite[mid] if len(finite) % 2 else (finite[mid - 1] + finite[mid]) / 2
    return max(-1.0, min(tau, median - DIRECTION_MARGIN))


def anomaly_score(
    norm_ratio: float | None,
    cosine_similarity: float | None,
    *,
    tolerance: float = NORM_RATIO_TOLERANCE,
    bound: float | None = None,
    tau: float = COSINE_TAU,
) -> float:
    """How unusual an update looks, in [0, 1]: the larger of its norm part and its direction part.

    ``bound`` defaults to NORM_RATIO_BOUND; pass the policy's ``max_norm_ratio`` when it sets one.
    """
    norm_part = norm_anomaly(norm_ratio, tolerance=tolerance, bound=bound or NORM_RATIO_BOUND)
    return max(norm_part, direction_anomaly(cosine_similarity, tau=tau))


def observation(delivered: bool, accepted: bool, anomaly: float = 0.0) -> float:
    """A round's evidence about a selected client, in [0, 1]: 0 if not delivered or rejected, else 1 - anomaly."""
    if not delivered or not accepted:
        return 0.0
    if math.isnan(anomaly):
        return 0.0
    return 1.0 - _clip01(anomaly)


def update_trust(trust: float | None, observation: float, rate: float = TRUST_LEARNING_RATE) -> float:
    """The new trust after one observation: ``(1 - rate) * trust + rate * observation``, kept in [0, 1].

    A ``trust`` of None (or NaN) stands for a client without history and starts from TRUST_PRIOR.
    """
    _check_rate(rate, "rate")
    previous = TRUST_PRIOR if trust is None or math.isnan(trust) else _clip01(trust)
    return _clip01((1.0 - rate) * previous + rate * _clip01(observation))


@dataclass(frozen=True)
class RoundOutcome:
    """What one round showed about a selected client."""

    round: int
    delivered: bool
    accepted: bool
    anomaly: float = 0.0


@dataclass(frozen=True)
class TrustHistoryEntry:
    """One step of a client's trust: what was observed in a round and what trust became."""

    round: int
    outcome: str  # "accepted", "rejected" or "not_delivered"
    anomaly: float
    observation: float
    trust_before: float
    trust: float

    def as_dict(self) -> dict[str, Any]:
        """The entry as a JSON-ready dict."""
        return asdict(self)


def trust_step(trust: float, outcome: RoundOutcome, rate: float = TRUST_LEARNING_RATE) -> TrustHistoryEntry:
    """Apply one round's outcome to ``trust``; the returned entry's ``trust`` is the new value."""
    o = observation(outcome.delivered, outcome.accepted, outcome.anomaly)
    label = "not_delivered" if not outcome.delivered else "accepted" if outcome.accepted else "rejected"
    return TrustHistoryEntry(
        round=outcome.round,
        outcome=label,
        anomaly=_clip01(outcome.anomaly),
        observation=o,
        trust_before=trust,
        trust=update_trust(trust, o, rate),
    )


def replay_trust(
    outcomes: Iterable[RoundOutcome], prior: float = TRUST_PRIOR, rate: float = TRUST_LEARNING_RATE
) -> tuple[float, list[TrustHistoryEntry]]:
    """Trust after a sequence of rounds (in order), starting at ``prior``, with one entry per round."""
    trust, history = prior, []
    for outcome in outcomes:
        entry = trust_step(trust, outcome, rate)
        history.append(entry)
        trust = entry.trust
    return trust, history


def reliability(on_time: int, selections: int) -> float | None:
    """On-time deliveries / selections, or None when the client was never selected."""
    if on_time < 0 or selections < 0 or on_time > selections:
        raise ValueError(f"need 0 <= on_time <= selections, got {on_time} / {selections}")
    return None if selections == 0 else on_time / selections


def contribution_shares(loss_deltas: Mapping[str, float]) -> dict[str, float]:
    """Each participant's share of the round's improvement, from leave-one-out loss deltas.

    A delta is ``loss_without_i - loss_with_all``: positive when the client's update helped.
    Negative (and non-finite) deltas count as 0; the shares sum to 1, equal when all are 0.
    """
    clipped = {
        cid: d if isinstance(d, int | float) and math.isfinite(d) and d > 0 else 0.0 for cid, d in loss_deltas.items()
    }
    total = sum(clipped.values())
    if not clipped:
        return {}
    if total <= 0.0:
        return {cid: 1.0 / len(clipped) for cid in clipped}
    return {cid: d / total for cid, d in clipped.items()}


def progress_shares(cosines: Mapping[str, float], samples: Mapping[str, int]) -> dict[str, float]:
    """Each accepted update's share of the round's progress, when no test data measures it.

    ``cosines`` holds each update's cosine with the round's step (new global model minus the previous
    one), ``samples`` its sample count (missing: 1). Shares are ``max(cos, 0) * n`` normalised to sum
    to 1; updates pointing away from the step (or non-finite) get 0, and all get equal shares when
    none points along it.
    """
    raw = {}
    for cid, cosine in cosines.items():
        n = samples.get(cid, 1)
        ok = isinstance(cosine, int | float) and math.isfinite(cosine) and cosine > 0 and n > 0
        raw[cid] = min(float(cosine), 1.0) * n if ok else 0.0
    total = sum(raw.values())
    if not raw:
        return {}
    if total <= 0.0:
        return {cid: 1.0 / len(raw) for cid in raw}
    return {cid: v / total for cid, v in raw.items()}


def update_contribution(previous: float | None, share: float, rate: float = CONTRIBUTION_EMA) -> float:
    """The contribution score after a round with ``share``: an EMA, starting at the first share."""
    _check_rate(rate, "rate")
    share = _clip01(share)
    if previous is None or math.isnan(previous):
        return share
    return (1.0 - rate) * _clip01(previous) + rate * share


@dataclass
class ClientStanding:
    """A client's record within one experiment, as stored between rounds."""

    trust_score: float = TRUST_PRIOR
    contribution_score: float = 0.0
    selections: int = 0
    deliveries: int = 0
    failures: int = 0
    last_round: int = 0
    # "inactive" once the client has failed more than the policy's max_client_failures.
    status: str = "active"


@dataclass(frozen=True)
class ClientRoundResult:
    """How one selected client's standing moved in a round, and what to record about it."""

    client_id: str
    standing: ClientStanding
    delivered: bool
    accepted: bool
    reason: str | None
    stats: Mapping[str, float]
    contribution: float | None

    @property
    def client_status(self) -> str:
        """A client that missed the deadline is inactive until it polls again; a rejected one is still connected."""
        return "active" if self.delivered else "inactive"


def score_round(
    *,
    selected: Iterable[str],
    delivered: set[str],
    accepted: set[str],
    rejected: Mapping[str, str],
    stats: Mapping[str, Mapping[str, float]],
    loo_loss_deltas: Mapping[str, float],
    standing: Mapping[str, ClientStanding],
    round: int,
    max_failures: int | None,
    progress: Mapping[str, float] | None = None,
) -> list[ClientRoundResult]:
    """Each selected client's new trust, counts and contribution after a round (inputs are not changed).

    Contribution comes from the leave-one-out deltas when the server evaluated the round, else from
    ``progress`` (shares from :func:`progress_shares`), else it is left as it was.
    """
    shares = contribution_shares(loo_loss_deltas) if loo_loss_deltas else dict(progress or {})
    results = []
    for cid in selected:
        own = ClientStanding(**asdict(standing[cid])) if cid in standing else ClientStanding()
        ok = cid in accepted
        anomaly = stats.get(cid, {}).get("anomaly", 0.0) if ok else 1.0
        own.trust_score = update_trust(own.trust_score, observation(cid in delivered, ok, anomaly))
        own.selections += 1
        own.deliveries += 1 if ok else 0
        own.failures += 0 if ok else 1
        own.last_round = round
        if cid in shares:
            own.contribution_score = update_contribution(own.contribution_score, shares[cid])
        if max_failures is not None and own.failures > max_failures:
            own.status = "inactive"
        reason = rejected.get(cid) or (None if cid in delivered else "no update before the deadline")
        results.append(
            ClientRoundResult(cid, own, cid in delivered, ok, reason, dict(stats.get(cid, {})), shares.get(cid))
        )
    return results
