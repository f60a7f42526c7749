"""Metrics, experiments, client listing and selection: a live ``fedloom serve`` with a real 3-round run,
plus an in-process app for the cases a live run cannot stage (low trust scores, exact numbers).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from fedloom_core.learning.datasets import load_train
from fedloom_core.storage.db import Client, ClientMetrics, Experiment, Round, RoundMetrics, Update
from fedloom_core.storage.repo import session_scope
from tests.api.test_training_api import assert_error
from tests.conftest import LiveServer, start_serve, stop_serve

pytestmark = pytest.mark.e2e

CLIENTS = ("m1", "m2")
ROUNDS = 3
RUN_ID = "exp-run"

# The spec's example body of POST /experiments, verbatim.
SPEC_BODY = {
    "name": "CIFAR-10 CNN Experiment",
    "description": "Federated learning experiment with CNN on CIFAR-10",
    "dataset_config": {"name": "CIFAR-10", "split_strategy": "iid", "clients_count": 10},
    "model_config": {"architecture": "CNN", "input_shape": [32, 32, 3], "num_classes": 10},
    "training_config": {"rounds": 10, "local_epochs": 3, "batch_size": 32, "learning_rate": 0.01},
    "policy_config": {"min_clients": 5, "max_client_failures": 2, "trust_threshold": 0.7},
}


def digits_body(**overrides: object) -> dict:
    body = copy.deepcopy(SPEC_BODY)
    body["dataset_config"]["name"] = "digits"
    body["model_config"]["input_shape"] = [8, 8, 1]
    body.update(overrides)
    return body


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The shared fixture's server, with rate limits out of the way of polling client processes."""
    server = start_serve(
        tmp_path_factory.mktemp("serve") / "data",
        env_extra={"FEDLOOM_RATE_LIMIT_GENERAL": "1000000", "FEDLOOM_RATE_LIMIT_TRAINING_START": "1000"},
    )
    yield server
    stop_serve(server)


@pytest.fixture(scope="module")
def http(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.api, headers=live_server.headers(), timeout=60) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def client_procs(
    http: httpx.Client, live_server: LiveServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[dict[str, str], list[subprocess.Popen], Path]]:
    """Registered clients (their keys) and their client processes, started early: they take a while to load."""
    keys = {}
    for cid in CLIENTS:
        resp = http.post("/clients/register", json={"client_id": cid})
        assert resp.status_code == 200, resp.text
        keys[cid] = resp.json()["api_key"]
    logs = tmp_path_factory.mktemp("clients")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDLOOM_")}
    # Already registered, so with the admin key they carry on (CONFLICT) and poll for tasks.
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fedloom.cli", "client", "--server", live_server.url]
            + ["--api-key", live_server.admin_key, "--client-id", cid, "--partition", f"{i}/{len(CLIENTS)}"],
            env=env,
            stdout=open(logs / f"{cid}.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        for i, cid in enumerate(CLIENTS, start=1)
    ]
    yield keys, procs, logs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def run(http: httpx.Client, client_procs: tuple[dict[str, str], list[subprocess.Popen], Path]) -> dict[str, str]:
    """A created experiment, started from its stored config and run to the end by the client processes."""
    keys, procs, logs = client_procs
    body = digits_body(
        experiment_id=RUN_ID,
        name="digits MLP",
        dataset_config={"name": "digits", "split_strategy": "iid", "clients_count": len(CLIENTS)},
        model_config={"architecture": "MLP", "input_shape": [8, 8, 1], "num_classes": 10},
        training_config={"rounds": ROUNDS, "local_epochs": 1, "batch_size": 32, "learning_rate": 0.05},
        policy_config={"min_clients": len(CLIENTS), "max_client_failures": 1, "trust_threshold": 0.5},
    )
    created = http.post("/experiments", json=body)
    assert created.status_code == 200, created.text
    config = http.get(f"/experiments/{RUN_ID}").json()["config"]
    started = http.post("/training/start", json=config)
    assert started.status_code == 200, started.text
    assert started.json()["experiment_id"] == RUN_ID
    deadline = time.monotonic() + 120
    while (status := http.get("/training/status").json())["status"] == "running":
        assert time.monotonic() < deadline, f"the run did not finish: {status}; logs in {logs}"
        assert all(p.poll() is None for p in procs), f"a client died; logs in {logs}"
        time.sleep(0.3)
    assert status["status"] == "completed", status
    for proc in procs:  # they exit once they see the experiment end
        assert proc.wait(timeout=30) == 0
    return keys


# --- auth ---------------------------------------------------------------------------------------

ADMIN_ONLY = [
    ("GET", "/metrics/training", None),
    ("GET", f"/metrics/training?experiment_id={RUN_ID}", None),
    ("GET", "/experiments", None),
    ("POST", "/experiments", digits_body()),
    ("GET", f"/experiments/{RUN_ID}", None),
    ("GET", "/clients", None),
    ("GET", "/clients/select", None),
]


def test_every_new_endpoint_needs_a_valid_key(live_server: LiveServer, client_procs: object) -> None:
    for method, path, body in [*ADMIN_ONLY, ("GET", "/metrics/clients/m1", None)]:
        for headers in ({}, bearer("not-a-key"), {"Authorization": "Basic abc"}):
            resp = httpx.request(method, live_server.api + path, json=body, headers=headers)
            assert_error(resp, 401, "UNAUTHORIZED")


# --- POST /experiments --------------------------------------------------------------------------


def test_spec_example_body_names_the_known_datasets_then_digits_is_created(http: httpx.Client) -> None:
    err = assert_error(http.post("/experiments", json=SPEC_BODY), 400, "INVALID_REQUEST")
    assert "dataset_config.name" in err["details"] and "digits" in err["details"]
    assert "CIFAR-10" in err["details"]

    created = http.post("/experiments", json=digits_body())
    assert created.status_code == 200, created.text
    body = created.json()
    assert set(body) == {"experiment_id", "name", "status", "created_at", "estimated_duration", "resource_requirements"}
    exp_id = body["experiment_id"]
    assert exp_id.startswith("exp_") and len(exp_id.split("_")[1]) == 8 and len(exp_id.split("_")[2]) == 6
    assert body["name"] == "CIFAR-10 CNN Experiment" and body["status"] == "created"
    assert body["created_at"].endswith("Z")
    assert body["estimated_duration"] == "5 minutes"  # no round has run yet: 30 s per round x 10
    res = body["resource_requirements"]
    assert res["min_clients"] == 5 and isinstance(res["min_clients"], int)
    assert res["estimated_compute"] == "medium"  # 151,306 parameters x 10 rounds x 3 epochs
    assert res["network_bandwidth"] == "10Mbps"  # 0.6 MB down and up within a second
    assert res["parameters_count"] == 151_306 and res["model_size_mb"] == pytest.approx(0.605, abs=1e-3)

    detail = http.get(f"/experiments/{exp_id}").json()
    assert detail["status"] == "created" and detail["total_rounds"] == 10 and detail["progress"] == 0.0
    assert detail["dataset"] == "digits" and detail["model_architecture"] == "CNN"
    assert detail["dataset_config"] == {"name": "digits", "split_strategy": "iid", "clients_count": 10}
    assert detail["model_config"] == {"architecture": "CNN", "input_shape": [8, 8, 1], "num_classes": 10}
    assert detail["policy_config"] == {"min_clients": 5, "max_client_failures": 2, "trust_threshold": 0.7}
    assert detail["training_config"]["rounds"] == 10 and detail["training_config"]["local_epochs"] == 3
    ec = detail["config"]["experiment_config"]
    assert ec == {**ec, "experiment_id": exp_id, "rounds": 10, "min_clients": 5, "dataset": "digits"}
    assert detail["config"]["training_config"]["learning_rate"] == 0.01
    assert detail["temporal_ui_url"] is None  # no workflow until it starts
    assert detail["started_at"] is None and detail["final_model_id"] is None and detail["error"] is None

    # An id may be chosen; taking it twice is a conflict.
    assert http.post("/experiments", json=digits_body(experiment_id="chosen")).status_code == 200
    assert_error(http.post("/experiments", json=digits_body(experiment_id="chosen")), 409, "CONFLICT")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model_config": {"architecture": "../x", "input_shape": [8, 8, 1], "num_classes": 10}}, "architecture"),
        ({"model_config": {"architecture": "CNN", "input_shape": [28, 28, 1], "num_classes": 10}}, "input_shape"),
        ({"model_config": {"architecture": "CNN", "input_shape": [8, 8, 1], "num_classes": 3}}, "num_classes"),
        ({"dataset_config": {"name": "digits", "split_strategy": "dirichlet", "clients_count": 10}}, "split_strategy"),
        ({"dataset_config": {"name": "digits", "split_strategy": "iid", "clients_count": 0}}, "clients_count"),
        ({"dataset_config": {"name": "digits", "split_strategy": "iid", "clients_count": 4}}, "min_clients"),
        ({"policy_config": {"min_clients": 5, "trust_threshold": 1.5}}, "trust_threshold"),
        ({"policy_config": {"min_clients": 0}}, "min_clients"),
        ({"training_config": {"rounds": 0}}, "rounds"),
        ({"training_config": {"rounds": 2, "optimizer": "LBFGS"}}, "optimizer"),
        ({"experiment_id": "../x"}, "experiment_id"),
        ({"name": ""}, "name"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_create_rejects_bad_fields_naming_them(http: httpx.Client, change: dict, field: str) -> None:
    err = assert_error(http.post("/experiments", json=digits_body(**change)), 400, "INVALID_REQUEST")
    assert field in err["details"]


def test_create_rejects_missing_sections(http: httpx.Client) -> None:
    for section in ("name", "dataset_config", "model_config"):
        body = digits_body()
        del body[section]
        err = assert_error(http.post("/experiments", json=body), 400, "INVALID_REQUEST")
        assert section in err["details"]
    assert_error(http.post("/experiments", content=b"[1, 2]"), 400, "INVALID_REQUEST")


# --- GET /metrics/training ----------------------------------------------------------------------


def test_training_metrics_of_a_real_run(http: httpx.Client, run: dict[str, str]) -> None:
    body = http.get("/metrics/training").json()  # the latest experiment is the run
    assert body["experiment_id"] == RUN_ID and set(body) == {"experiment_id", "rounds", "summary"}
    assert body == http.get("/metrics/training", params={"experiment_id": RUN_ID}).json()
    rounds = body["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    for r in rounds:
        assert isinstance(r["global_accuracy"], float) and 0.0 <= r["global_accuracy"] <= 1.0
        assert isinstance(r["global_loss"], float) and r["global_loss"] > 0
        assert r["participating_clients"] == len(CLIENTS)
        assert isinstance(r["round_duration"], float) and r["round_duration"] > 0
        assert isinstance(r["aggregation_time"], float) and 0 <= r["aggregation_time"] <= r["round_duration"]
        assert sorted(r["client_metrics"]) == list(CLIENTS)
        for m in r["client_metrics"].values():
            assert set(m) == {"local_accuracy", "local_loss", "training_time", "data_samples"}
            assert isinstance(m["local_accuracy"], float) and 0.0 <= m["local_accuracy"] <= 1.0
            assert isinstance(m["local_loss"], float) and isinstance(m["training_time"], float)
            assert m["training_time"] > 0
            assert isinstance(m["data_samples"], int) and m["data_samples"] > 0
        # The IID shards cover the training split exactly.
        assert sum(m["data_samples"] for m in r["client_metrics"].values()) == len(load_train("digits"))
    accs = [r["global_accuracy"] for r in rounds]
    summary = body["summary"]
    assert set(summary) == {"total_rounds", "best_accuracy", "convergence_rate", "avg_round_duration"}
    assert summary["total_rounds"] == ROUNDS and summary["best_accuracy"] == max(accs)
    assert summary["convergence_rate"] == pytest.approx((accs[-1] - accs[0]) / (ROUNDS - 1))
    assert summary["avg_round_duration"] == pytest.approx(sum(r["round_duration"] for r in rounds) / ROUNDS)
    status = http.get("/training/status").json()
    assert status["round_metrics"]["accuracy"] == accs[-1] and status["progress"] == 1.0


def test_training_metrics_filters(http: httpx.Client, run: dict[str, str]) -> None:
    full = http.get("/metrics/training", params={"experiment_id": RUN_ID}).json()["rounds"]
    tail = http.get("/metrics/training", params={"experiment_id": RUN_ID, "from_round": 2}).json()
    assert [r["round"] for r in tail["rounds"]] == [2, 3] and tail["rounds"] == full[1:]
    assert tail["summary"]["convergence_rate"] == pytest.approx(full[2]["global_accuracy"] - full[1]["global_accuracy"])
    one = http.get("/metrics/training", params={"experiment_id": RUN_ID, "from_round": 2, "to_round": 2}).json()
    assert [r["round"] for r in one["rounds"]] == [2]
    assert one["summary"]["total_rounds"] == 1 and one["summary"]["convergence_rate"] == 0.0
    head = http.get("/metrics/training", params={"experiment_id": RUN_ID, "to_round": 1}).json()
    assert [r["round"] for r in head["rounds"]] == [1]

    mine = http.get("/metrics/training", params={"experiment_id": RUN_ID, "client_id": "m2"}).json()
    assert [r["round"] for r in mine["rounds"]] == [1, 2, 3]
    for mine_round, full_round in zip(mine["rounds"], full, strict=True):
        assert mine_round["client_metrics"] == {"m2": full_round["client_metrics"]["m2"]}
        assert mine_round["global_accuracy"] == full_round["global_accuracy"]

    http.post("/clients/register", json={"client_id": "bystander"})
    none = http.get("/metrics/training", params={"experiment_id": RUN_ID, "client_id": "bystander"}).json()
    assert none["rounds"] == []
    assert none["summary"] == {
        "total_rounds": 0,
        "best_accuracy": None,
        "convergence_rate": 0.0,
        "avg_round_duration": None,
    }
    params = {"experiment_id": RUN_ID, "from_round": 3, "to_round": 2}
    err = assert_error(http.get("/metrics/training", params=params), 400, "INVALID_REQUEST")
    assert "from_round" in err["details"]
    assert_error(http.get("/metrics/training", params={"from_round": 0}), 400, "INVALID_REQUEST")
    assert_error(http.get("/metrics/training", params={"to_round": "x"}), 400, "INVALID_REQUEST")
    assert_error(http.get("/metrics/training", params={"experiment_id": "nope"}), 404, "NOT_FOUND")
    assert_error(http.get("/metrics/training", params={"experiment_id": "a/b"}), 400, "INVALID_REQUEST")
    assert_error(http.get("/metrics/training", params={"client_id": "ghost"}), 404, "CLIENT_NOT_REGISTERED")
    assert_error(http.get("/metrics/training", params={"client_id": "bad id"}), 400, "INVALID_REQUEST")


# --- GET /metrics/clients/{id} ------------------------------------------------------------------


def test_client_performance_of_a_real_run(http: httpx.Client, run: dict[str, str]) -> None:
    body = http.get("/metrics/clients/m1").json()
    assert set(body) == {"client_id", "performance_history", "statistics"} and body["client_id"] == "m1"
    history = body["performance_history"]
    assert [(h["experiment_id"], h["round"]) for h in history] == [(RUN_ID, r) for r in range(1, ROUNDS + 1)]
    per_round = http.get("/metrics/training", params={"experiment_id": RUN_ID}).json()["rounds"]
    for h, r in zip(history, per_round, strict=True):
        assert set(h) == {
            "round",
            "experiment_id",
            "local_accuracy",
            "local_loss",
            "training_time",
            "communication_time",
            "data_samples",
        }
        m = r["client_metrics"]["m1"]
        assert (h["local_accuracy"], h["local_loss"], h["training_time"], h["data_samples"]) == (
            m["local_accuracy"],
            m["local_loss"],
            m["training_time"],
            m["data_samples"],
        )
        assert isinstance(h["communication_time"], float) and h["communication_time"] >= 0
    stats = body["statistics"]
    assert set(stats) == {
        "avg_accuracy",
        "avg_training_time",
        "total_rounds_participated",
        "reliability_score",
        "contribution_score",
    }
    assert stats["avg_accuracy"] == pytest.approx(sum(h["local_accuracy"] for h in history) / ROUNDS)
    assert stats["avg_training_time"] == pytest.approx(sum(h["training_time"] for h in history) / ROUNDS)
    assert stats["total_rounds_participated"] == ROUNDS and stats["reliability_score"] == 1.0
    assert isinstance(stats["contribution_score"], float)
    assert stats["contribution_score"] == http.get("/clients/m1").json()["contribution_score"]

    http.post("/clients/register", json={"client_id": "newcomer"})
    fresh = http.get("/metrics/clients/newcomer").json()
    assert fresh["performance_history"] == []
    assert fresh["statistics"] == {
        "avg_accuracy": None,
        "avg_training_time": None,
        "total_rounds_participated": 0,
        "reliability_score": None,  # never selected in a completed round
        "contribution_score": 0.0,
    }
    assert_error(http.get("/metrics/clients/ghost"), 404, "CLIENT_NOT_REGISTERED")
    assert_error(http.get("/metrics/clients/bad id!"), 400, "INVALID_REQUEST")


# --- GET /clients and /clients/select -----------------------------------------------------------


def test_list_clients_and_filters(http: httpx.Client, run: dict[str, str]) -> None:
    http.post("/clients/register", json={"client_id": "idle-one"})
    body = http.get("/clients").json()
    assert set(body) == {"clients", "total_count", "active_count", "timestamp"} and body["timestamp"].endswith("Z")
    ids = [c["client_id"] for c in body["clients"]]
    assert ids == sorted(ids) and set(CLIENTS) | {"idle-one"} <= set(ids)
    assert body["total_count"] == len(ids)
    for c in body["clients"]:
        assert set(c) == {"client_id", "status", "current_round", "trust_score"}
        assert c["status"] in ("registered", "active", "inactive") and isinstance(c["current_round"], int)
        assert isinstance(c["trust_score"], float)
    by_id = {c["client_id"]: c for c in body["clients"]}
    assert all(by_id[c]["status"] == "active" and by_id[c]["current_round"] == ROUNDS for c in CLIENTS)
    assert by_id["idle-one"] == {
        "client_id": "idle-one",
        "status": "registered",
        "current_round": 0,
        "trust_score": 1.0,
    }
    assert body["active_count"] == sum(c["status"] == "active" for c in body["clients"]) == len(CLIENTS)

    active = http.get("/clients", params={"status": "active"}).json()
    assert [c["client_id"] for c in active["clients"]] == list(CLIENTS)
    assert active["total_count"] == active["active_count"] == len(CLIENTS)
    registered = http.get("/clients", params={"status": "registered"}).json()
    assert "idle-one" in [c["client_id"] for c in registered["clients"]] and registered["active_count"] == 0
    assert http.get("/clients", params={"status": "inactive"}).json()["total_count"] == 0

    for params in ({"round": 2}, {"round": 2, "experiment_id": RUN_ID}, {"experiment_id": RUN_ID}):
        took_part = http.get("/clients", params=params).json()
        assert [c["client_id"] for c in took_part["clients"]] == list(CLIENTS), params
    assert http.get("/clients", params={"round": 2, "status": "registered"}).json()["clients"] == []
    assert http.get("/clients", params={"round": 99}).json()["total_count"] == 0
    err = assert_error(http.get("/clients", params={"status": "sleeping"}), 400, "INVALID_REQUEST")
    assert "registered" in err["details"]
    assert_error(http.get("/clients", params={"round": 0}), 400, "INVALID_REQUEST")
    assert_error(http.get("/clients", params={"round": 1, "experiment_id": "nope"}), 404, "NOT_FOUND")


def test_select_shows_the_stored_decision_of_past_rounds(http: httpx.Client, run: dict[str, str]) -> None:
    body = http.get("/clients/select", params={"round": 2, "policy_check": "true", "experiment_id": RUN_ID}).json()
    assert body["round"] == 2 and body["dry_run"] is False and body["experiment_id"] == RUN_ID
    assert body["selected_clients"] == list(CLIENTS)
    assert body["excluded_clients"] == [] and body["exclusion_reasons"] == {}
    for cid in CLIENTS:
        result = body["policy_results"][cid]
        assert result["trust_score"] == 1.0 and result["compliance"] is True
        assert "trust_threshold" in result["policies_applied"]
    bare = http.get("/clients/select", params={"round": 2, "policy_check": "false", "experiment_id": RUN_ID}).json()
    assert bare["policy_results"] == {} and bare["selected_clients"] == list(CLIENTS) and bare["dry_run"] is False
    # The run is over: by default its last round.
    last = http.get("/clients/select", params={"experiment_id": RUN_ID}).json()
    assert last["round"] == ROUNDS and last["dry_run"] is False
    err = assert_error(
        http.get("/clients/select", params={"experiment_id": RUN_ID, "round": 4}), 400, "INVALID_REQUEST"
    )
    assert "3 rounds" in err["details"]
    assert_error(http.get("/clients/select", params={"experiment_id": "nope"}), 404, "NOT_FOUND")
    assert_error(http.get("/clients/select", params={"policy_check": "maybe"}), 400, "INVALID_REQUEST")


def test_select_dry_run_of_a_created_experiment(http: httpx.Client, run: dict[str, str]) -> None:
    http.post("/experiments", json=digits_body(experiment_id="dry", policy_config={"min_clients": 2}))
    body = http.get("/clients/select", params={"experiment_id": "dry"}).json()
    assert body["round"] == 1 and body["dry_run"] is True
    eligible = [c["client_id"] for c in http.get("/clients").json()["clients"] if c["status"] != "inactive"]
    assert body["selected_clients"] == sorted(eligible) and body["eligible_count"] == len(eligible)
    assert body["excluded_clients"] == [] and set(body["policy_results"]) == set(eligible)
    # The default policy's trust threshold applies to a policy that does not set one.
    assert all(r["policies_applied"] == ["client_status", "trust_threshold"] for r in body["policy_results"].values())
    # Without experiment_id: the experiment that ran last (a merely created one does not displace it).
    assert http.get("/clients/select").json()["experiment_id"] == RUN_ID
    # Too few eligible clients for min_clients: nobody is selected.
    http.post("/experiments", json=digits_body(experiment_id="big", policy_config={"min_clients": 10}))
    big = http.get("/clients/select", params={"experiment_id": "big", "round": 4}).json()
    assert big["round"] == 4 and big["selected_clients"] == [] and big["eligible_count"] == len(eligible)


# --- GET /experiments ---------------------------------------------------------------------------


def test_list_experiments_pagination_and_filters(http: httpx.Client, run: dict[str, str]) -> None:
    for i in range(3):
        assert http.post("/experiments", json=digits_body(experiment_id=f"page-{i}")).status_code == 200
    everything = http.get("/experiments", params={"limit": 500}).json()
    assert set(everything) == {"experiments", "total_count", "has_more"}
    items = everything["experiments"]
    assert everything["total_count"] == len(items) >= 6 and everything["has_more"] is False
    assert [e["created_at"] for e in items] == sorted((e["created_at"] for e in items), reverse=True)
    assert [e["experiment_id"] for e in items[:3]] == ["page-2", "page-1", "page-0"]
    for e in items:
        assert set(e) == {"experiment_id", "name", "status", "created_at", "progress"}
        assert isinstance(e["progress"], float) and 0.0 <= e["progress"] <= 1.0
    by_id = {e["experiment_id"]: e for e in items}
    assert by_id[RUN_ID] == {**by_id[RUN_ID], "status": "completed", "progress": 1.0, "name": "digits MLP"}
    assert http.get("/experiments").json() == everything  # default limit 50

    total = everything["total_count"]
    first = http.get("/experiments", params={"limit": 2}).json()
    assert first["experiments"] == items[:2] and first["has_more"] is True and first["total_count"] == total
    middle = http.get("/experiments", params={"limit": 2, "offset": 2}).json()
    assert middle["experiments"] == items[2:4] and middle["has_more"] is (total > 4)
    end = http.get("/experiments", params={"limit": 2, "offset": total - 1}).json()
    assert end["experiments"] == items[-1:] and end["has_more"] is False
    past = http.get("/experiments", params={"offset": total + 5}).json()
    assert past == {"experiments": [], "total_count": total, "has_more": False}

    completed = http.get("/experiments", params={"status": "completed"}).json()
    assert [e["experiment_id"] for e in completed["experiments"]] == [RUN_ID] and completed["total_count"] == 1
    created = http.get("/experiments", params={"status": "created", "limit": 1}).json()
    assert created["total_count"] == total - 1 and created["has_more"] is True
    assert created["experiments"][0]["experiment_id"] == "page-2"
    for status in ("running", "failed", "stopped"):
        assert http.get("/experiments", params={"status": status}).json()["total_count"] == 0

    err = assert_error(http.get("/experiments", params={"limit": 501}), 400, "INVALID_REQUEST")
    assert "limit" in err["details"]
    assert_error(http.get("/experiments", params={"limit": 0}), 400, "INVALID_REQUEST")
    assert_error(http.get("/experiments", params={"offset": -1}), 400, "INVALID_REQUEST")
    err = assert_error(http.get("/experiments", params={"status": "paused"}), 400, "INVALID_REQUEST")
    assert "stopped" in err["details"]


def test_get_experiment_after_a_run(http: httpx.Client, live_server: LiveServer, run: dict[str, str]) -> None:
    body = http.get(f"/experiments/{RUN_ID}").json()
    assert body["status"] == "completed" and body["current_round"] == ROUNDS and body["total_rounds"] == ROUNDS
    assert body["rounds_completed"] == ROUNDS and body["progress"] == 1.0
    assert body["final_model_id"] == f"model_{RUN_ID}_round_{ROUNDS}"
    assert body["started_at"].endswith("Z") and body["finished_at"] >= body["started_at"] >= body["created_at"]
    assert body["stop_reason"] is None and body["error"] is None
    # serve points the link at its own Temporal Web UI port.
    assert re.fullmatch(
        rf"http://127\.0\.0\.1:\d+/namespaces/default/workflows/experiment-{RUN_ID}", body["temporal_ui_url"]
    )
    # The stored policy reached the workflow: its trust threshold was applied in every selection.
    assert body["policy_config"]["trust_threshold"] == 0.5
    for rnd in range(1, ROUNDS + 1):
        results = http.get("/clients/select", params={"experiment_id": RUN_ID, "round": rnd}).json()["policy_results"]
        assert all("trust_threshold" in r["policies_applied"] for r in results.values()) and results
    assert_error(http.get("/experiments/nope"), 404, "NOT_FOUND")
    assert_error(http.get("/experiments/bad id!"), 400, "INVALID_REQUEST")
    # A finished experiment cannot be started again.
    assert_error(http.post("/training/start", json=body["config"]), 409, "CONFLICT")


def test_client_keys_read_only_their_own_metrics(http: httpx.Client, run: dict[str, str]) -> None:
    own, other = bearer(run["m1"]), bearer(run["m2"])
    assert http.get("/metrics/clients/m1", headers=own).json()["client_id"] == "m1"
    assert http.get("/metrics/clients/m2", headers=other).status_code == 200
    assert_error(http.get("/metrics/clients/m2", headers=own), 403, "FORBIDDEN")
    assert_error(http.get("/metrics/clients/ghost", headers=own), 403, "FORBIDDEN")
    for method, path, body in ADMIN_ONLY:
        assert_error(http.request(method, path, json=body, headers=own), 403, "FORBIDDEN")
        assert http.request(method, path, json=body).status_code == 200, path


# --- in process: exact numbers and low trust scores ---------------------------------------------


@pytest.fixture
def local(local_app) -> TestClient:  # type: ignore[no-untyped-def]
    return local_app(temporal_ui_url="http://ui.example:8233/")


def _add(client: TestClient, *rows: object) -> None:
    with session_scope(client.app.state.engine) as s:  # type: ignore[attr-defined]
        for row in rows:
            s.add(row)
        s.flush()


def test_dry_run_excludes_low_trust_and_inactive_clients(local: TestClient) -> None:
    _add(
        local,
        Experiment(
            experiment_id="exp-trust",
            status="created",
            total_rounds=3,
            config={"experiment_config": {"min_clients": 1, "client_fraction": 1.0, "seed": 0}},
            policy_config={"min_clients": 1, "trust_threshold": 0.7},
        ),
        Client(client_id="client-001", registration_id="r1", trust_score=0.95),
        Client(client_id="client-002", registration_id="r2", trust_score=0.65),
        Client(client_id="client-003", registration_id="r3", trust_score=0.7),  # not below: strict comparison
        Client(client_id="client-004", registration_id="r4", trust_score=0.9, status="inactive"),
    )
    body = local.get("/clients/select", params={"round": 1, "policy_check": "true"}).json()
    assert body["dry_run"] is True and body["round"] == 1 and body["experiment_id"] == "exp-trust"
    assert body["selected_clients"] == ["client-001", "client-003"]
    assert body["excluded_clients"] == ["client-002", "client-004"]
    assert body["exclusion_reasons"] == {
        "client-002": "Trust score below threshold (0.65 < 0.70)",
        "client-004": "Client is inactive",
    }
    assert body["policy_results"]["client-001"] == {
        "trust_score": 0.95,
        "compliance": True,
        "policies_applied": ["client_status", "trust_threshold"],
    }
    assert body["policy_results"]["client-002"]["compliance"] is False
    bare = local.get("/clients/select", params={"round": 1, "policy_check": "false"}).json()
    assert bare["policy_results"] == {} and bare["exclusion_reasons"] == body["exclusion_reasons"]

    # Once round 1 is stored, it answers with what was decided then, not with today's clients.
    _add(
        local,
        Round(
            experiment_id="exp-trust",
            round=1,
            status="open",
            selected_clients=["client-001"],
            exclusions={"client-002": "Trust score below threshold (0.60 < 0.70)"},
            policy_results={"client-001": {"trust_score": 0.95, "compliance": True, "policies_applied": []}},
        ),
    )
    stored = local.get("/clients/select").json()  # default: the round in progress
    assert stored["round"] == 1 and stored["dry_run"] is False and stored["selected_clients"] == ["client-001"]
    assert stored["exclusion_reasons"] == {"client-002": "Trust score below threshold (0.60 < 0.70)"}
    assert local.get("/clients/select", params={"round": 2}).json()["dry_run"] is True


def test_metrics_arithmetic(local: TestClient) -> None:
    exp = "exp-math"
    _add(local, Experiment(experiment_id=exp, status="running", total_rounds=6, current_round=5))
    _add(local, Client(client_id="a", registration_id="ra", contribution_score=0.4))
    _add(local, Client(client_id="b", registration_id="rb"))
    for rnd, acc in ((1, 0.5), (2, 0.6), (3, 0.8), (4, 0.7)):
        _add(
            local,
            RoundMetrics(
                experiment_id=exp,
                round=rnd,
                global_accuracy=acc,
                global_loss=1 - acc,
                participating_clients=1,
                round_duration=10.0 * rnd,
                aggregation_time=1.0,
            ),
        )
    # a is selected in rounds 1-5; delivers accepted updates in 1, 2 and 4, a rejected one in 3, and
    # round 5 is still open (not counted). b is selected only in round 2 and delivers.
    for rnd in range(1, 6):
        chosen = ["a", "b"] if rnd == 2 else ["a"]
        _add(
            local,
            Round(experiment_id=exp, round=rnd, status="open" if rnd == 5 else "completed", selected_clients=chosen),
        )
    for rnd, cid, status in (
        (1, "a", "accepted"),
        (2, "a", "accepted"),
        (2, "b", "accepted"),
        (3, "a", "rejected"),
        (4, "a", "accepted"),
        (5, "a", "pending"),
    ):
        _add(
            local,
            Update(
                update_id=f"u{rnd}{cid}",
                experiment_id=exp,
                round=rnd,
                client_id=cid,
                blob_key="k",
                sha256="0" * 64,
                size_bytes=1,
                num_samples=10,
                validation_status=status,
            ),
        )
        if status == "accepted":
            _add(
                local,
                ClientMetrics(
                    experiment_id=exp,
                    round=rnd,
                    client_id=cid,
                    local_accuracy=0.1 * rnd,
                    training_time=float(rnd),
                    data_samples=10,
                ),
            )
    body = local.get("/metrics/training").json()
    assert [r["round"] for r in body["rounds"]] == [1, 2, 3, 4]
    assert body["summary"] == {
        "total_rounds": 4,
        "best_accuracy": 0.8,
        "convergence_rate": pytest.approx((0.7 - 0.5) / 3),
        "avg_round_duration": 25.0,
    }
    assert body["rounds"][2]["client_metrics"] == {}  # the rejected update has no metrics
    ranged = local.get("/metrics/training", params={"from_round": 2, "to_round": 3}).json()
    assert ranged["summary"]["convergence_rate"] == pytest.approx(0.2)
    only_b = local.get("/metrics/training", params={"client_id": "b"}).json()
    assert [r["round"] for r in only_b["rounds"]] == [2] and list(only_b["rounds"][0]["client_metrics"]) == ["b"]

    a = local.get("/metrics/clients/a").json()
    assert [h["round"] for h in a["performance_history"]] == [1, 2, 4]
    assert a["statistics"] == {
        "avg_accuracy": pytest.approx((0.1 + 0.2 + 0.4) / 3),
        "avg_training_time": pytest.approx(7 / 3),
        "total_rounds_participated": 3,
        "reliability_score": 0.75,
        "contribution_score": 0.4,
    }
    assert local.get("/metrics/clients/b").json()["statistics"]["reliability_score"] == 1.0
    # While round 5 is open, selection shows it by default.
    assert local.get("/clients/select").json() == {**local.get("/clients/select").json(), "round": 5, "dry_run": False}
    detail = local.get(f"/experiments/{exp}").json()
    assert detail["temporal_ui_url"] == f"http://ui.example:8233/namespaces/default/workflows/experiment-{exp}"
    assert detail["rounds_completed"] == 4 and detail["progress"] == pytest.approx(4 / 6)
    clients = local.get("/clients", params={"round": 3}).json()
    assert clients["clients"] == []  # a's only update in round 3 was rejected
    assert [c["client_id"] for c in local.get("/clients", params={"round": 2}).json()["clients"]] == ["a", "b"]
