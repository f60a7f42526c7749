"""The default policy in the real workflow: harmless to a clean run, and enough against a noise attack.

Ten clients train an MLP on digits with fixed seeds. Three runs: clean with the default policy, clean with
its bounds turned off (null), and 3 of the 10 clients uploading global + N(0, 10) noise under the defaults.
"""

from __future__ import annotations

from pathlib import Path

from sqlmodel import select
from temporalio.testing import WorkflowEnvironment

from fedloom_core.learning.attacks import parse_attack
from fedloom_core.policy.defaults import DEFAULT_BOUNDS_OFF
from fedloom_core.storage.db import ExperimentClient, Update
from fedloom_core.storage.repo import session_scope
from tests.workflows.harness import SimClient, run_experiment

ROUNDS, CLIENTS = 8, 10
ATTACKERS = {"c07", "c08", "c09"}
SETTINGS = {"rounds": ROUNDS, "architecture": "MLP", "min_clients": 5, "local_epochs": 2, "learning_rate": 0.1}


def _clients(attacked: bool) -> list[SimClient]:
    noise = parse_attack("gaussian:10")
    return [SimClient(f"c{i:02d}", i, noise if attacked and f"c{i:02d}" in ATTACKERS else None) for i in range(CLIENTS)]


async def test_default_policy_keeps_a_clean_run_and_stops_the_noise_attack(
    time_skipping_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    clean = await run_experiment(time_skipping_env, tmp_path / "clean", _clients(False), policy={}, **SETTINGS)
    off = await run_experiment(
        time_skipping_env, tmp_path / "off", _clients(False), policy=DEFAULT_BOUNDS_OFF, **SETTINGS
    )
    attacked = await run_experiment(time_skipping_env, tmp_path / "attacked", _clients(True), policy={}, **SETTINGS)
    print(
        f"final accuracy: clean {clean.final_accuracy:.4f}, clean without the defaults {off.final_accuracy:.4f}, "
        f"noise attack with the defaults {attacked.final_accuracy:.4f}"
    )
    assert clean.status == off.status == attacked.status == "completed"
    assert clean.final_accuracy >= 0.9
    assert abs(clean.final_accuracy - off.final_accuracy) <= 0.005
    assert attacked.final_accuracy >= clean.final_accuracy - 0.03

    # Every noisy update was rejected by the norm bound, every honest one accepted.
    with session_scope(attacked.engine) as s:
        rows = s.exec(select(Update).where(Update.experiment_id == attacked.experiment_id)).all()
        standing = {
            e.client_id: e.trust_score
            for e in s.exec(select(ExperimentClient).where(ExperimentClient.experiment_id == attacked.experiment_id))
        }
    noisy = [u for u in rows if u.client_id in ATTACKERS]
    assert noisy and all(u.validation_status == "rejected" and "max_norm_ratio 5" in u.reason for u in noisy)
    assert all(u.validation_status == "accepted" for u in rows if u.client_id not in ATTACKERS)
    # Rejected three rounds running, the attackers fell below the trust threshold and were left out.
    for rnd in attacked.rounds:
        if rnd.round <= 3:
            assert ATTACKERS <= set(rnd.selected_clients)
        else:
            assert not ATTACKERS & set(rnd.selected_clients)
            assert all(rnd.exclusions[cid].startswith("Trust score below threshold (0.34 < 0.40)") for cid in ATTACKERS)
    assert all(standing[cid] < 0.4 for cid in ATTACKERS)
    assert all(standing[f"c{i:02d}"] > 0.9 for i in range(7))
