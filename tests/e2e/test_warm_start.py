"""Warm start and continue on a live ``fedloom serve`` with real clients, and a custom model's start guard."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.api.test_training_api import assert_error
from tests.conftest import LiveServer, small_run_body, spawn_clients, start_serve, stop_serve, wait_registered

pytestmark = pytest.mark.e2e
CLIENTS = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    live = start_serve(tmp_path_factory.mktemp("warm") / "data")
    yield live
    stop_serve(live)


def _run_to_end(server: LiveServer, http: httpx.Client, start, log_dir: Path, prefix: str) -> dict:  # type: ignore[no-untyped-def]
    """Start clients, then the experiment (``start`` posts it); wait for it to end; its last status.

    Each run gets fresh client processes under the same ids: a client process ends with its experiment."""
    log_dir.mkdir()
    procs = spawn_clients(server, CLIENTS, log_dir, prefix)
    try:
        wait_registered(http, CLIENTS, procs)
        resp = start()
        assert resp.status_code == 200, resp.text
        exp_id = resp.json()["experiment_id"]
        deadline = time.monotonic() + 180
        while (status := http.get("/training/status").json())["status"] == "running":
            assert time.monotonic() < deadline, status
            time.sleep(0.3)
        assert status["experiment_id"] == exp_id and status["status"] == "completed", status
        return resp.json()
    finally:
        for p in procs:
            p.kill()


def _rounds(http: httpx.Client, exp_id: str) -> list[dict]:
    return http.get("/metrics/training", params={"experiment_id": exp_id}).json()["rounds"]


def test_continue_carries_on_and_warm_start_begins_where_the_source_ended(server: LiveServer, tmp_path: Path) -> None:
    http = httpx.Client(base_url=server.api, headers=server.headers(), timeout=30)
    body = small_run_body("source", 2, CLIENTS, seed=3)
    _run_to_end(server, http, lambda: http.post("/training/start", json=body), tmp_path / "1", "a")
    first = _rounds(http, "source")
    assert [r["round"] for r in first] == [1, 2]

    started = _run_to_end(
        server, http, lambda: http.post("/experiments/source/continue", json={"rounds": 2}), tmp_path / "2", "a"
    )
    assert started["current_round"] == 3 and started["total_rounds"] == 4
    rounds = _rounds(http, "source")
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert rounds[:2] == first, "the first run's rounds are kept as they were"
    final = http.get("/model/global", params={"experiment_id": "source"}).json()
    assert final["model_id"] == "model_source_round_4"

    warm = small_run_body("warm", 1, CLIENTS, seed=9)
    warm["experiment_config"]["initial_model_id"] = final["model_id"]
    _run_to_end(server, http, lambda: http.post("/training/start", json=warm), tmp_path / "3", "a")
    round0 = http.get("/model/global", params={"experiment_id": "warm", "round": 0}).json()
    assert round0["sha256"] == final["sha256"], "the warm start's round-0 model is the source's final model"
    cold = rounds[0]["global_accuracy"]
    source_final = rounds[-1]["global_accuracy"]
    warm_first = _rounds(http, "warm")[0]["global_accuracy"]
    assert warm_first >= source_final - 0.05 and warm_first > cold, (cold, source_final, warm_first)

    # A running or unknown experiment cannot be continued; a finished one needs a sane round count.
    assert_error(http.post("/experiments/nope/continue", json={"rounds": 1}), 404, "NOT_FOUND")
    assert_error(http.post("/experiments/warm/continue", json={"rounds": 0}), 400, "INVALID_REQUEST")


def test_a_custom_model_cannot_start_without_weights(server: LiveServer, tmp_path: Path) -> None:
    http = httpx.Client(base_url=server.api, headers=server.headers(), timeout=30)
    for cid in ("s1", "s2"):
        http.post("/clients/register", json={"client_id": cid})
    body = {
        "name": "tabular",
        "dataset_config": {"name": "hospital-records", "clients_count": 2},
        "model_config": {"architecture": "custom"},
        "training_config": {"rounds": 1},
        "policy_config": {"min_clients": 2},
    }
    exp_id = http.post("/experiments", json=body).json()["experiment_id"]
    start = {"experiment_config": {"experiment_id": exp_id}}
    err = assert_error(http.post("/training/start", json=start), 400, "INVALID_REQUEST")
    assert "initial_model" in err["details"]
    assert http.get(f"/experiments/{exp_id}").json()["status"] == "created"
    start["experiment_config"]["initial_model_id"] = "model_nope_round_3"
    err = assert_error(http.post("/training/start", json=start), 400, "INVALID_REQUEST")
    assert "model_nope_round_3" in err["details"]
