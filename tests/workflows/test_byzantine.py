"""Attackers against the real workflow: 10 clients on digits, 3 of them uploading sign-flipped, 10x updates.

Three runs of 15 rounds each, with the same seed and data: clean FedAvg and attacked FedAvg, both without
the default policy's bounds, and attacked with the defences on (update validation + trust threshold +
FedTrimmedAvg).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import select
from temporalio.testing import WorkflowEnvironment

from fedloom_core.learning.attacks import parse_attack
from fedloom_core.policy.defaults import DEFAULT_BOUNDS_OFF
from fedloom_core.storage.db import ClientRoundScore, ExperimentClient
from fedloom_core.storage.repo import session_scope
from tests.workflows.harness import SimClient, run_experiment

ROUNDS, CLIENTS = 15, 10
ATTACKERS = {"c07", "c08", "c09"}
DEFENDED_POLICY = {"trust_threshold": 0.5, "min_cosine_similarity": 0.0, "max_norm_ratio": 3.0}


def _clients(attacked: bool) -> list[SimClient]:
    return [
        SimClient(f"c{i:02d}", i, parse_attack("sign_flip:10") if attacked and f"c{i:02d}" in ATTACKERS else None)
        for i in range(CLIENTS)
    ]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {}


async def _run(env: WorkflowEnvironment, tmp: Path, attacked: bool, defended: bool):  # type: ignore[no-untyped-def]
    return await run_experiment(
        env,
        tmp,
        _clients(attacked),
        rounds=ROUNDS,
        strategy="FedTrimmedAvg" if defended else "FedAvg",
        params={"trim_fraction": 0.3} if defended else {},
        policy=DEFENDED_POLICY if defended else DEFAULT_BOUNDS_OFF,
        min_clients=5,
        local_epochs=2,
    )


async def test_attack_breaks_fedavg_and_the_defences_hold(
    time_skipping_env: WorkflowEnvironment, tmp_path: Path, local_app
) -> None:  # type: ignore[no-untyped-def]
    clean = await _run(time_skipping_env, tmp_path / "clean", attacked=False, defended=False)
    attacked = await _run(time_skipping_env, tmp_path / "attacked", attacked=True, defended=False)
    defended = await _run(time_skipping_env, tmp_path / "defended", attacked=True, defended=True)
    print(
        f"final accuracy: clean {clean.final_accuracy:.3f}, attacked FedAvg {attacked.final_accuracy:.3f}, "
        f"defended {defended.final_accuracy:.3f}"
    )
    assert clean.status == defended.status == "completed"
    # Attacked FedAvg may diverge to NaN weights, after which no update passes validation at all.
    assert attacked.status in ("completed", "failed")
    assert clean.final_accuracy >= 0.9
    assert attacked.final_accuracy <= clean.final_accuracy - 0.30
    assert defended.final_accuracy >= clean.final_accuracy - 0.03

    # Every attacker fell below the trust threshold and was excluded from selection by round 5,
    # with the reason recorded where GET /clients/select reads it.
    round5 = next(r for r in defended.rounds if r.round == 5)
    for cid in ATTACKERS:
        assert cid not in round5.selected_clients
        assert round5.exclusions[cid].startswith("Trust score below threshold (")
    with session_scope(defended.engine) as s:
        standing = {e.client_id: e for e in s.exec(select(ExperimentClient)).all()}
        history = s.exec(select(ClientRoundScore).where(ClientRoundScore.client_id == "c07")).all()
    assert all(standing[cid].trust_score < 0.5 for cid in ATTACKERS)
    assert all(standing[f"c{i:02d}"].trust_score > 0.9 for i in range(7))
    assert history and not any(h.accepted for h in history)
    # ... and GET /clients/select shows it.
    api = local_app(data_dir=tmp_path / "defended")
    body = api.get("/clients/select", params={"experiment_id": defended.experiment_id, "round": 5}).json()
    assert body["dry_run"] is False and not ATTACKERS & set(body["selected_clients"])
    assert all(body["exclusion_reasons"][cid].startswith("Trust score below threshold (") for cid in ATTACKERS)
