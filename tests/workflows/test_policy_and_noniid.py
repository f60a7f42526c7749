"""Policy rules acting in a real run, and strategies on non-IID data."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from tests.workflows.harness import SimClient, run_experiment

RULES = [
    {
        "id": "deny-eu",
        "name": "No clients from eu-west-1",
        "type": "client_selection",
        "priority": 100,
        "effect": "deny",
        "when": {"field": "location.region", "operator": "==", "value": "eu-west-1"},
    },
    {
        "id": "small-batches",
        "name": "Smaller batches for low-power clients",
        "type": "client_selection",
        "priority": 200,
        "effect": "configure",
        "when": {"field": "capabilities.compute_power", "operator": "==", "value": "low"},
        "set": {"batch_size": 8},
    },
]


async def test_deny_and_configure_rules_act_in_a_run(
    time_skipping_env: WorkflowEnvironment, tmp_path: Path, local_app
) -> None:  # type: ignore[no-untyped-def]
    clients = [
        SimClient("east-1", 0, location={"region": "us-east-1"}, capabilities={"compute_power": "high"}),
        SimClient("east-2", 1, location={"region": "us-east-1"}, capabilities={"compute_power": "low"}),
        SimClient("west-1", 2, location={"region": "eu-west-1"}, capabilities={"compute_power": "high"}),
    ]
    out = await run_experiment(
        time_skipping_env, tmp_path, clients, rounds=2, architecture="MLP", policy={"rules": RULES}, min_clients=2
    )
    assert out.status == "completed"
    for rnd in out.rounds:
        assert rnd.selected_clients == ["east-1", "east-2"]
        assert rnd.exclusions["west-1"].startswith("Denied by rule deny-eu")
        assert rnd.client_config == {"east-2": {"batch_size": 8}}
    # The same decisions, as the API shows them.
    api = local_app()
    body = api.get("/clients/select", params={"experiment_id": out.experiment_id, "round": 1}).json()
    assert body["dry_run"] is False and body["selected_clients"] == ["east-1", "east-2"]
    assert body["excluded_clients"] == ["west-1"] and "deny-eu" in body["exclusion_reasons"]["west-1"]
    assert "small-batches" in body["policy_results"]["east-2"]["policies_applied"]
    assert body["policy_results"]["east-2"]["configure"] == {"batch_size": 8}


@pytest.mark.parametrize("strategy", ["FedProx"])
async def test_non_iid_dirichlet(time_skipping_env: WorkflowEnvironment, tmp_path: Path, strategy: str) -> None:
    """Dirichlet(0.3) over 10 clients: the alternative reaches FedAvg's accuracy, both within 10 points of IID."""
    clients = [SimClient(f"n{i}", i) for i in range(10)]
    common = {"rounds": 10, "min_clients": 10, "local_epochs": 2}
    iid = await run_experiment(time_skipping_env, tmp_path / "iid", clients, **common)
    fedavg = await run_experiment(
        time_skipping_env, tmp_path / "avg", clients, partition="dirichlet", alpha=0.3, **common
    )
    other = await run_experiment(
        time_skipping_env,
        tmp_path / "other",
        clients,
        partition="dirichlet",
        alpha=0.3,
        strategy=strategy,
        params={"mu": 0.01},
        **common,
    )
    print(
        f"IID FedAvg {iid.final_accuracy:.3f}, Dirichlet(0.3) FedAvg {fedavg.final_accuracy:.3f}, "
        f"{strategy} {other.final_accuracy:.3f}"
    )
    assert iid.status == fedavg.status == other.status == "completed"
    assert other.final_accuracy >= fedavg.final_accuracy - 0.005
    assert fedavg.final_accuracy >= iid.final_accuracy - 0.10
    assert other.final_accuracy >= iid.final_accuracy - 0.10


async def test_client_past_max_client_failures_is_inactive_for_the_experiment(
    time_skipping_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    from sqlmodel import select

    from fedloom_core.learning.attacks import parse_attack
    from fedloom_core.storage.db import ExperimentClient
    from fedloom_core.storage.repo import session_scope

    clients = [SimClient(f"h{i}", i) for i in range(3)] + [SimClient("bad", 3, parse_attack("sign_flip:5"))]
    policy = {"max_client_failures": 1, "max_norm_ratio": 2.0}
    out = await run_experiment(
        time_skipping_env, tmp_path, clients, rounds=4, architecture="MLP", policy=policy, min_clients=3
    )
    assert out.status == "completed"
    selected = {r.round: r.selected_clients for r in out.rounds}
    assert "bad" in selected[1] and "bad" in selected[2]  # rejected twice: 2 failures > 1
    assert "bad" not in selected[3] and "bad" not in selected[4]
    assert out.rounds[2].exclusions["bad"] == "Client is inactive"
    with session_scope(out.engine) as s:
        bad = s.get(ExperimentClient, (out.experiment_id, "bad"))
        honest = s.exec(select(ExperimentClient).where(ExperimentClient.client_id != "bad")).all()
    assert bad.status == "inactive" and bad.failures == 2
    assert all(h.status == "active" and h.failures == 0 for h in honest)


async def test_round_control_rules_configure_and_hold_rounds(
    time_skipping_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    from fedloom_core.storage.db import Experiment
    from fedloom_core.storage.repo import session_scope

    longer = {
        "id": "longer-later",
        "name": "Two local epochs from round 2",
        "type": "round_control",
        "priority": 10,
        "effect": "configure",
        "when": {"field": "round", "operator": ">=", "value": 2},
        "set": {"local_epochs": 2},
    }
    clients = [SimClient(f"k{i}", i) for i in range(2)]
    out = await run_experiment(
        time_skipping_env, tmp_path / "a", clients, rounds=2, architecture="MLP", policy={"rules": [longer]}
    )
    assert out.status == "completed"
    assert out.rounds[0].client_config == {}
    assert out.rounds[1].client_config == {"k0": {"local_epochs": 2}, "k1": {"local_epochs": 2}}

    hold = {
        "id": "need-five",
        "name": "Wait for five registered clients",
        "type": "round_control",
        "effect": "deny",
        "when": {"field": "registered_clients", "operator": "<", "value": 5},
    }
    held = await run_experiment(
        time_skipping_env,
        tmp_path / "b",
        clients,
        rounds=1,
        architecture="MLP",
        policy={"rules": [hold]},
        selection_timeout_s=1.5,
    )
    assert held.status == "failed" and held.rounds == []
    with session_scope(held.engine) as s:
        exp = s.get(Experiment, held.experiment_id)
    assert exp.error_code == "ROUND_DENIED" and "need-five" in exp.error
