"""The default policy's three bounds: the norm ratio, the trust threshold and the weight cap, each on unless null."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pydantic_core import to_json

from fedloom_core.learning.aggregation import aggregate_files
from fedloom_core.learning.kernels import UpdateFile, open_path
from fedloom_core.learning.weights import load_state, save_state
from fedloom_core.policy.defaults import (
    DEFAULT_BOUNDS_OFF,
    DEFAULT_MAX_NORM_RATIO,
    DEFAULT_MAX_WEIGHT_RATIO,
    DEFAULT_TRUST_THRESHOLD,
)
from fedloom_core.policy.selection import Candidate, select_clients
from fedloom_core.policy.trust import RoundOutcome, replay_trust
from fedloom_core.policy.validation import UpdateStats, capped_weights, judge_updates, measure_round
from fedloom_core.schemas import PolicyConfig

DEFAULTS = {
    "max_norm_ratio": DEFAULT_MAX_NORM_RATIO,
    "trust_threshold": DEFAULT_TRUST_THRESHOLD,
    "max_weight_ratio": DEFAULT_MAX_WEIGHT_RATIO,
}


def _bounds(policy: PolicyConfig) -> dict[str, float | None]:
    return {name: getattr(policy, name) for name in DEFAULTS}


def _judge(stats: dict[str, UpdateStats], samples: dict[str, int], policy: PolicyConfig):  # type: ignore[no-untyped-def]
    return judge_updates(stats, samples, policy, {}, round=1, hour_utc=0, weekday=0)


def test_a_policy_that_does_not_mention_the_bounds_gets_the_defaults() -> None:
    assert DEFAULTS == {"max_norm_ratio": 5.0, "trust_threshold": 0.4, "max_weight_ratio": 3.0}
    assert _bounds(PolicyConfig()) == DEFAULTS
    assert _bounds(PolicyConfig.model_validate({"min_clients": 3, "max_client_failures": 2})) == DEFAULTS
    # Setting one keeps the others' defaults.
    merged = PolicyConfig.model_validate({"trust_threshold": 0.7, "min_cosine_similarity": 0.0})
    assert _bounds(merged) == {**DEFAULTS, "trust_threshold": 0.7}
    assert merged.min_cosine_similarity == 0.0 and merged.max_update_norm is None


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_null_turns_one_bound_off_through_storage_and_temporal(name: str) -> None:
    policy = PolicyConfig.model_validate({name: None})
    assert _bounds(policy) == {**DEFAULTS, name: None}
    # The API stores only what the body set: the null stays, the defaults are left to the start.
    stored = policy.model_dump(mode="json", exclude_unset=True)
    assert stored == {name: None}
    assert _bounds(PolicyConfig.model_validate(stored)) == {**DEFAULTS, name: None}
    # Temporal's pydantic converter writes every field; the bounds come back as they were.
    assert _bounds(PolicyConfig.model_validate_json(to_json(policy))) == {**DEFAULTS, name: None}
    assert _bounds(PolicyConfig.model_validate(DEFAULT_BOUNDS_OFF)) == dict.fromkeys(DEFAULTS)


@pytest.mark.parametrize(
    ("field", "value"), [("max_norm_ratio", 1.0), ("max_weight_ratio", 0.5), ("trust_threshold", 2)]
)
def test_out_of_range_bounds_are_refused(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        PolicyConfig.model_validate({field: value})


def test_the_norm_bound_rejects_above_five_times_the_median() -> None:
    stats = {
        "a": UpdateStats("a", 1.0, 1.0, 0.9),
        "b": UpdateStats("b", 4.9, 4.9, 0.9),
        "c": UpdateStats("c", 5.2, 5.2, 0.9),
    }
    verdict = _judge(stats, {"a": 10, "b": 10, "c": 10}, PolicyConfig())
    assert verdict.accepted == ["a", "b"]
    assert verdict.rejected == {"c": "update norm is 5.20x the round median, above max_norm_ratio 5"}
    # The trust anomaly's norm part runs from 1.5x to the bound, so 3.25x is half anomalous.
    assert _judge({"d": UpdateStats("d", 3.25, 3.25, 1.0)}, {"d": 1}, PolicyConfig()).stats["d"]["anomaly"] == 0.5
    off = _judge(stats, {"a": 10, "b": 10, "c": 10}, PolicyConfig(max_norm_ratio=None))
    assert off.accepted == ["a", "b", "c"] and not off.rejected


def test_the_trust_threshold_excludes_a_client_rejected_three_rounds_running() -> None:
    rejected = [RoundOutcome(r, delivered=True, accepted=False) for r in (1, 2, 3)]
    after_two, _ = replay_trust(rejected[:2])
    after_three, _ = replay_trust(rejected)
    assert after_two == pytest.approx(0.49) and after_three == pytest.approx(0.343)
    candidates = [
        Candidate("honest", "active", 1.0),
        Candidate("twice", "active", after_two),
        Candidate("thrice", "active", after_three),
    ]
    args = {"round": 4, "min_clients": 1, "client_fraction": 1.0, "seed": 0}
    out = select_clients(candidates, trust_threshold=PolicyConfig().trust_threshold, **args)
    assert out.selected == ["honest", "twice"]
    assert out.excluded == {"thrice": "Trust score below threshold (0.34 < 0.40)"}
    off = select_clients(candidates, trust_threshold=PolicyConfig(trust_threshold=None).trust_threshold, **args)
    assert off.selected == ["honest", "thrice", "twice"]


def test_capped_weights() -> None:
    # Median of 100, 120, 80 and a huge claim: (100 + 120) / 2 = 110, so the cap is 330.
    claims = {"a": 100, "b": 120, "c": 80, "liar": 10**12}
    assert capped_weights(claims, 3.0) == {"a": 100, "b": 120, "c": 80, "liar": 330}
    assert capped_weights(claims, None) == claims
    assert capped_weights({"alone": 10**9}, 3.0) == {"alone": 10**9}
    assert capped_weights({"a": 1, "b": 1, "c": 7}, 1.5) == {"a": 1, "b": 1, "c": 1}
    assert capped_weights({}, 3.0) == {}
    # Honest spreads within 3x the median are untouched.
    honest = {"a": 284, "b": 256, "c": 72, "d": 181, "e": 89, "f": 94, "g": 44, "h": 172, "i": 154, "j": 92}
    assert capped_weights(honest, DEFAULT_MAX_WEIGHT_RATIO) == honest


def test_weights_are_capped_among_the_accepted_updates_only() -> None:
    stats = {cid: UpdateStats(cid, 1.0, 1.0, 1.0) for cid in ("a", "b", "c")}
    stats["noisy"] = UpdateStats("noisy", 900.0, 900.0, 0.0)
    claims = {"a": 10, "b": 20, "c": 30, "noisy": 10**9}
    verdict = _judge(stats, claims, PolicyConfig())
    assert verdict.weights == {"a": 10, "b": 20, "c": 30}
    stats["noisy"] = UpdateStats("noisy", 1.0, 1.0, 1.0)
    verdict = _judge(stats, claims, PolicyConfig())
    # Median of 10, 20, 30, 10^9 is 25: the claim counts as 75, 0.56 of the total instead of ~1.
    assert verdict.weights == {"a": 10, "b": 20, "c": 30, "noisy": 75}
    assert _judge(stats, claims, PolicyConfig(max_weight_ratio=None)).weights == claims


def _model(path: Path, values: torch.Tensor) -> Path:
    save_state({"w": values, "steps": torch.tensor([3])}, path)
    return path


def test_noise_is_rejected_and_a_big_claim_bounded_on_real_files(tmp_path: Path) -> None:
    """Seven honest updates, two of global + N(0, 10) noise and one honest update claiming 10^9 samples."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2000, generator=gen)
    glob = _model(tmp_path / "global.safetensors", base)
    direction = torch.randn(2000, generator=gen) * 0.01
    files = []
    for i in range(8):
        step = direction * (1 + 0.3 * math.sin(i)) + torch.randn(2000, generator=gen) * 0.003
        files.append(UpdateFile(f"h{i}", _model(tmp_path / f"h{i}.safetensors", base + step), 100 + 10 * i))
    for i in range(2):
        noise = base + 10 * torch.randn(2000, generator=gen)
        files.append(UpdateFile(f"n{i}", _model(tmp_path / f"n{i}.safetensors", noise), 100))
    files[-3] = UpdateFile("h7", files[-3].path, 10**9)
    policy = PolicyConfig()
    stats = measure_round(glob, files, open_path, policy)
    verdict = judge_updates(
        stats, {f.client_id: f.num_samples for f in files}, policy, {}, round=1, hour_utc=0, weekday=0
    )
    assert sorted(verdict.rejected) == ["n0", "n1"] and all(stats[c].norm_ratio > 500 for c in ("n0", "n1"))
    assert max(stats[f"h{i}"].norm_ratio for i in range(8)) < 2
    # The median claim of the accepted is 135, so h7 weighs 405 of 1,315: under a third.
    assert verdict.weights["h7"] == 405 and sum(verdict.weights.values()) == 1315
    accepted = [
        UpdateFile(f.client_id, f.path, verdict.weights[f.client_id]) for f in files if f.client_id in verdict.weights
    ]
    out = tmp_path / "new.safetensors"
    aggregate_files(
        strategy="FedAvg",
        params={},
        weighted=True,
        round=1,
        seed=0,
        global_path=glob,
        updates=accepted,
        out=out,
        state_path=None,
        state_out=tmp_path / "state.safetensors",
    )
    expected = sum(load_state(f.path)["w"].double() * f.num_samples for f in accepted) / 1315
    assert torch.allclose(load_state(out)["w"].double(), expected, atol=1e-5)
