"""The default policy through the API: bad bounds are refused in the error format, and the defaults act.

Poisoned updates themselves are answered in the workflow (tests/workflows/test_default_policy.py); here
the in-process app checks what an operator and the selection dry run see.
"""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from fedloom_core.storage.db import Client, Experiment
from fedloom_core.storage.repo import session_scope
from tests.api.test_training_api import assert_error

BODY = {
    "name": "policy bounds",
    "dataset_config": {"name": "digits", "split_strategy": "iid", "clients_count": 3},
    "model_config": {"architecture": "MLP", "input_shape": [8, 8, 1], "num_classes": 10},
    "training_config": {"rounds": 2},
}


@pytest.fixture
def local(local_app) -> TestClient:  # type: ignore[no-untyped-def]
    return local_app()


BAD_BOUNDS = [
    {"max_norm_ratio": 1.0},
    {"max_norm_ratio": "NaN"},
    {"max_weight_ratio": 0.5},
    {"max_weight_ratio": -1},
    {"trust_threshold": 1.5},
    {"trust_threshold": "low"},
]


def test_a_bound_out_of_range_is_400_naming_it(local: TestClient) -> None:
    for policy in BAD_BOUNDS:
        started = time.perf_counter()
        answer = local.post("/experiments", json={**BODY, "policy_config": policy})
        err = assert_error(answer, 400, "INVALID_REQUEST")
        assert time.perf_counter() - started < 1.0
        assert next(iter(policy)) in err["details"], policy
    assert local.get("/experiments").json()["experiments"] == []


def test_null_turns_a_bound_off_and_is_kept(local: TestClient) -> None:
    off = {"max_norm_ratio": None, "trust_threshold": None, "max_weight_ratio": None}
    created = local.post("/experiments", json={**BODY, "policy_config": {"min_clients": 2, **off}})
    assert created.status_code == 200, created.text
    detail = local.get(f"/experiments/{created.json()['experiment_id']}").json()
    assert detail["policy_config"] == {"min_clients": 2, **off}


def _seed(client: TestClient, experiment_id: str, policy: dict) -> None:
    with session_scope(client.app.state.engine) as s:  # type: ignore[attr-defined]
        s.add(
            Experiment(
                experiment_id=experiment_id,
                status="created",
                total_rounds=3,
                config={"experiment_config": {"min_clients": 1, "client_fraction": 1.0, "seed": 0}},
                policy_config=policy,
            )
        )
        for cid, trust in (("honest", 1.0), ("shaky", 0.45), ("attacker", 0.343)):
            if s.get(Client, cid) is None:
                s.add(Client(client_id=cid, registration_id=f"r-{cid}", trust_score=trust))


def test_the_selection_dry_run_applies_the_default_trust_threshold(local: TestClient) -> None:
    _seed(local, "exp-defaults", {"min_clients": 1})
    body = local.get("/clients/select", params={"experiment_id": "exp-defaults", "round": 1}).json()
    assert body["selected_clients"] == ["honest", "shaky"]
    assert body["exclusion_reasons"] == {"attacker": "Trust score below threshold (0.34 < 0.40)"}
    _seed(local, "exp-off", {"min_clients": 1, "trust_threshold": None})
    body = local.get("/clients/select", params={"experiment_id": "exp-off", "round": 1}).json()
    assert body["selected_clients"] == ["attacker", "honest", "shaky"] and body["excluded_clients"] == []
