"""Update validation in one place: the checks of an uploaded file, and a round's measurements and verdict.

Measurement is one streaming pass over the coordinates of every update at once, a slice at a time, so
memory stays at K slices whatever the model's size: each slice adds to the deltas' (update - global)
squared norms, their sum S and each delta's dot product with S, from which the similarity to the mean
of the *other* deltas follows without materialising it.

"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedloom_core.learning.kernels import Opener, UpdateFile, open_path
from fedloom_core.learning.weights import (
    WeightsFormatError,
    compare_structure,
    mapped_tensors,
    nonfinite_tensors,
    normalize_upload,
    structure,
)
from fedloom_core.policy.rules import evaluate, validate_rules
from fedloom_core.policy.selection import Candidate
from fedloom_core.policy.trust import TRUST_PRIOR, anomaly_score, round_cosine_tau
from fedloom_core.schemas import PolicyConfig

# torch is imported where tensors are made (measure_updates): the API imports this module without it.


@dataclass(frozen=True)
class UpdateStats:
    client_id: str
    # L2 norm of the update's delta from the global model (all float tensors together).
    norm: float
    # norm / median norm of the round's updates.
    norm_ratio: float
    # Cosine similarity of the delta to the mean delta of the other updates (1.0 when alone).
    cosine_similarity: float


def measure_updates(global_path, updates: Sequence[UpdateFile], opener: Opener = open_path) -> dict[str, UpdateStats]:  # type: ignore[no-untyped-def]
    """Norm, norm ratio and cosine similarity of each update's delta (canonical client-id order).

    One pass over the coordinates with every update mapped at once (``delta_slices``): each slice gives
    the deltas' squared norms, their sum S and each delta's dot product with S, so memory stays at K
    slices whatever the model's size. An opener that copies updates (S3) holds K local files meanwhile.
    """
    import torch

    from fedloom_core.learning.delta_slices import delta_slices

    ordered = sorted(updates, key=lambda u: u.client_id)
    if not ordered:
        return {}
    with ExitStack() as stack:
        global_tensors = stack.enter_context(mapped_tensors(global_path))
        mapped = [stack.enter_context(mapped_tensors(stack.enter_context(opener(u)))) for u in ordered]
        sq = torch.zeros(len(ordered), dtype=torch.float64)
        dot = torch.zeros(len(ordered), dtype=torch.float64)
        total_sq = 0.0
        for _name, deltas in delta_slices(global_tensors, mapped):
            total = deltas.sum(dim=0)
            sq += deltas.pow(2).sum(dim=1)
            dot += deltas @ total
            total_sq += float(total.dot(total))
    sq_norms = {u.client_id: float(sq[i]) for i, u in enumerate(ordered)}
    dots = {u.client_id: float(dot[i]) for i, u in enumerate(ordered)}
    norms = {cid: math.sqrt(sq) for cid, sq in sq_norms.items()}
    median = _median(list(norms.values()))
    stats = {}
    for cid, norm in norms.items():
        # The other deltas sum to S - d: |S - d|^2 = |S|^2 - 2 d.S + |d|^2, and d.(S - d) = d.S - |d|^2.
        others_sq = max(total_sq - 2 * dots[cid] + sq_norms[cid], 0.0)
        if len(ordered) == 1 or norm == 0.0 or others_sq == 0.0:
            cosine = 1.0
        else:
            cosine = (dots[cid] - sq_norms[cid]) / (norm * math.sqrt(others_sq))
        ratio = norm / median if median > 0 else (1.0 if norm == 0 else math.inf)
        stats[cid] = UpdateStats(cid, norm, ratio, max(-1.0, min(1.0, cosine)))
    return stats


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def measure_round(
    global_path: Path, updates: Sequence[UpdateFile], opener: Opener, policy: PolicyConfig
) -> dict[str, UpdateStats]:
    """The round's stats, with similarity judged among the updates inside the norm bounds.

    A few huge updates would otherwise drag the mean of the others their way and make honest ones
    look opposite, so when some fail the norm bounds the similarity is measured again without them.
    """
    stats = measure_updates(global_path, updates, opener)
    sane = [u for u in updates if norm_problem(stats[u.client_id], policy) is None]
    if 1 < len(sane) < len(updates):
        for cid, st in measure_updates(global_path, sane, opener).items():
            stats[cid] = replace(stats[cid], cosine_similarity=st.cosine_similarity)
    return stats


def norm_problem(st: UpdateStats, policy: PolicyConfig) -> str | None:
    """Why an update's size is out of the policy's bounds, or None."""
    if policy.max_update_norm is not None and st.norm > policy.max_update_norm:
        return f"update norm {st.norm:.4g} exceeds max_update_norm {policy.max_update_norm:g}"
    if policy.max_norm_ratio is not None and st.norm_ratio > policy.max_norm_ratio:
        return f"update norm is {st.norm_ratio:.2f}x the round median, above max_norm_ratio {policy.max_norm_ratio:g}"
    return None


def similarity_problem(st: UpdateStats, policy: PolicyConfig) -> str | None:
    """Why an update points away from the others too far, or None."""
    if policy.min_cosine_similarity is not None and st.cosine_similarity < policy.min_cosine_similarity:
        return (
            f"cosine similarity {st.cosine_similarity:.3f} to the other updates is below "
            f"min_cosine_similarity {policy.min_cosine_similarity:g}"
        )
    return None


def validation_context(
    standing: Candidate | None,
    st: UpdateStats,
    *,
    client_id: str,
    num_samples: int,
    round: int,
    hour_utc: int,
    weekday: int,
) -> dict[str, Any]:
    """What update_validation rules see about one update and the client that sent it."""
    return {
        "client_id": client_id,
        "status": standing.status if standing else "registered",
        "trust_score": standing.trust_score if standing else TRUST_PRIOR,
        "reliability": standing.reliability if standing else None,
        "recent_failures": standing.recent_failures if standing else 0,
        "round": round,
        "hour_utc": hour_utc,
        "weekday": weekday,
        "update_norm": st.norm,
        "update_norm_ratio": st.norm_ratio,
        "cosine_similarity": st.cosine_similarity,
        "num_samples": num_samples,
        **{f"capabilities.{k}": v for k, v in (standing.capabilities if standing else {}).items()},
        **{f"location.{k}": v for k, v in (standing.location if standing else {}).items()},
    }


@dataclass
class Verdict:
    """Which of a round's updates go into aggregation, why the others do not, and what was measured."""

    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    # Accepted client id -> the data_samples its update is aggregated with (capped by max_weight_ratio).
    weights: dict[str, int] = field(default_factory=dict)


def capped_weights(num_samples: Mapping[str, int], max_ratio: float | None) -> dict[str, int]:
    """Each update's aggregation weight: its data_samples, at most ``max_ratio`` x their median (None: no cap).

    The median is a robust reference: a client that claims a huge count cannot raise it unless it holds
    half the updates. A capped weight is rounded down, and never below 1.
    """
    if max_ratio is None or not num_samples:
        return dict(num_samples)
    cap = max(1, math.floor(max_ratio * _median([float(n) for n in num_samples.values()])))
    return {cid: min(n, cap) for cid, n in num_samples.items()}


def judge_updates(
    stats: Mapping[str, UpdateStats],
    num_samples: Mapping[str, int],
    policy: PolicyConfig,
    standing: Mapping[str, Candidate],
    *,
    round: int,
    hour_utc: int,
    weekday: int,
) -> Verdict:
    """Accept or reject each measured update: norm bounds, then similarity, then update_validation rules.

    The accepted updates' aggregation weights are their data_samples capped by ``max_weight_ratio``.
    """
    rules = validate_rules(policy.rules) if policy.rules else []
    verdict = Verdict()
    tau = round_cosine_tau(st.cosine_similarity for st in stats.values())
    for cid in sorted(stats):
        st = stats[cid]
        verdict.stats[cid] = {
            "update_norm": st.norm,
            "norm_ratio": st.norm_ratio,
            "cosine_similarity": st.cosine_similarity,
            "anomaly": anomaly_score(st.norm_ratio, st.cosine_similarity, bound=policy.max_norm_ratio, tau=tau),
        }
        reason = norm_problem(st, policy) or similarity_problem(st, policy)
        if reason is None and rules:
            context = validation_context(
                standing.get(cid),
                st,
                client_id=cid,
                num_samples=num_samples[cid],
                round=round,
                hour_utc=hour_utc,
                weekday=weekday,
            )
            decision = evaluate(rules, "update_validation", context)
            if not decision.allowed:
                reason = "; ".join(decision.reasons) or "denied by an update_validation rule"
        if reason is None:
            verdict.accepted.append(cid)
        else:
            verdict.rejected[cid] = reason
    verdict.weights = capped_weights({cid: num_samples[cid] for cid in verdict.accepted}, policy.max_weight_ratio)
    return verdict


@dataclass(frozen=True)
class FileCheck:
    """One check of an uploaded weights file, as the validate dry run reports it."""

    name: str
    passed: bool
    details: str


@dataclass(frozen=True)
class FileReport:
    """The checks an uploaded weights file went through, and its format when it could be read."""

    format: str | None
    checks: list[FileCheck]

    @property
    def problem(self) -> str | None:
        """The first failed check's details, or None when every check passed."""
        return next((c.details for c in self.checks if not c.passed), None)


def check_update_file(
    path: Path,
    out: Path,
    expected: Mapping[str, tuple[str, tuple[int, ...]]] | None,
    *,
    stop_at_failure: bool = False,
    structure_required: bool = True,
) -> FileReport:
    """Normalise an uploaded file to safetensors at ``out``; check its format, structure and values.

    ``expected`` is the global model's structure; None fails the structure check (no open round), or
    skips it when ``structure_required`` is false (an initial model of a custom architecture).
    Nothing else is checked after a failed format check, or after any failure with ``stop_at_failure``.
    """
    try:
        fmt = normalize_upload(path, out)
    except WeightsFormatError as exc:
        return FileReport(None, [FileCheck("format", False, str(exc))])
    report = FileReport(fmt, [FileCheck("format", True, f"readable {fmt} weights")])
    if expected is None and structure_required:
        report.checks.append(FileCheck("structure", False, "no open round: there is no global model to compare with"))
    elif expected is not None:
        problems = compare_structure(structure(out), dict(expected))
        details = "; ".join(problems[:20]) or "names, shapes and dtypes match"
        report.checks.append(FileCheck("structure", not problems, details))
    if stop_at_failure and report.problem:
        return report
    bad = nonfinite_tensors(out)
    details = f"NaN or infinite values in: {', '.join(bad[:10])}" if bad else "all finite"
    report.checks.append(FileCheck("finite_values", not bad, details))
    return report
