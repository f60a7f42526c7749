"""POST /model/evaluation/{client_id} and evaluate tasks against a live server: auth, errors, the metrics."""

from __future__ import annotations

import time

import httpx
import pytest
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tests.api.test_training_api import assert_error, register, start_body, upload, wait_task
from tests.conftest import LiveServer

pytestmark = pytest.mark.e2e
EXP = "exp-fed-eval"
CLIENTS = ("ev1", "ev2", "ev3")


@pytest.fixture(scope="module")
def http(live_server: LiveServer):  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=live_server.api, headers=live_server.headers(), timeout=60) as client:
        yield client


def _report(rnd: int, **metrics: object) -> dict:
    return {"experiment_id": EXP, "round": rnd, "metrics": metrics}


def _post(http: httpx.Client, client_id: str, body: object, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return http.post(f"/model/evaluation/{client_id}", json=body, headers=headers)


def _train_round(http: httpx.Client, keys: dict[str, str]) -> int:
    rnd = 0
    for cid in CLIENTS:
        task = wait_task(http, cid)
        rnd = task["round"]
        state = st_load(http.get(task["download_url"]).content)
        resp = upload(http, cid, st_save({k: v + 0.01 for k, v in state.items()}), key=keys[cid], samples=50)
        assert resp.status_code == 200, resp.text
    return rnd


def test_clients_evaluate_each_round_and_metrics_average_their_reports(http: httpx.Client) -> None:
    keys = {cid: register(http, cid) for cid in CLIENTS}
    body = start_body(EXP, rounds=2, min_clients=3)
    body["aggregation_config"]["min_updates"] = 3
    body["evaluation_config"] = {"federated": True, "timeout_s": 120}
    assert http.post("/training/start", json=body).status_code == 200
    reports = {"ev1": (100, 0.5, 1.0), "ev2": (300, 0.9, 2.0)}

    # Before the phase opens nothing is taken.
    assert_error(_post(http, "ev1", _report(1, data_samples=1, loss=1.0), keys["ev1"]), 409, "ROUND_NOT_ACTIVE")
    for expected_round in (1, 2):
        rnd = _train_round(http, keys)
        assert rnd == expected_round
        tasks = {cid: wait_task(http, cid, "evaluate") for cid in CLIENTS}
        task = tasks["ev1"]
        assert task["round"] == rnd and task["model_id"] == f"model_{EXP}_round_{rnd}"
        assert task["experiment_status"] == "running" and task["deadline"].endswith("Z")
        assert set(st_load(http.get(task["download_url"]).content)), "the model to evaluate downloads"
        if rnd == 2:
            # A client that was not asked (registered after the round began) is refused.
            late = register(http, "ev-late")
            assert_error(_post(http, "ev-late", _report(2, data_samples=5, loss=1.0), late), 409, "CONFLICT")
        for cid, (n, acc, loss) in reports.items():
            resp = _post(http, cid, _report(rnd, data_samples=n, accuracy=acc, loss=loss / rnd), keys[cid])
            assert resp.status_code == 200, resp.text
            assert resp.json()["status"] == "received" and resp.json()["data_samples"] == n
            # A repeat is answered the same way and stores nothing new.
            again = _post(http, cid, _report(rnd, data_samples=n, accuracy=acc, loss=loss / rnd), keys[cid])
            assert again.status_code == 200 and again.json()["received_at"] == resp.json()["received_at"]
            assert wait_task(http, cid, "wait")["status"] == "wait"
        # The admin key may report for a client; 0 samples: "cannot evaluate", left out of the average.
        assert _post(http, "ev3", _report(rnd, data_samples=0)).status_code == 200

    deadline = time.monotonic() + 60
    while http.get("/training/status").json()["status"] == "running":
        assert time.monotonic() < deadline, "the experiment did not finish"
        time.sleep(0.2)
    metrics = http.get("/metrics/training", params={"experiment_id": EXP}).json()
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for r in metrics["rounds"]:
        fed = r["federated_metrics"]
        assert fed["data_samples"] == 400
        assert fed["accuracy"] == pytest.approx((0.5 * 100 + 0.9 * 300) / 400)
        assert fed["loss"] == pytest.approx((1.0 * 100 + 2.0 * 300) / 400 / r["round"])
        assert isinstance(r["global_accuracy"], float)
    # The phase is closed: a new report is refused, a repeat still answered.
    assert_error(_post(http, "ev-late", _report(2, data_samples=5, loss=1.0)), 409, "ROUND_NOT_ACTIVE")
    assert _post(http, "ev1", _report(2, data_samples=100, accuracy=0.5, loss=0.5), keys["ev1"]).status_code == 200


def test_evaluation_reports_are_authenticated_bounded_and_validated(http: httpx.Client) -> None:
    key = register(http, "ev-auth")
    other = register(http, "ev-other")
    good = _report(1, data_samples=1, loss=1.0)
    anonymous = httpx.post(f"{str(http.base_url).rstrip('/')}/model/evaluation/ev-auth", json=good)
    assert_error(anonymous, 401, "UNAUTHORIZED")
    assert_error(_post(http, "ev-auth", good, other), 403, "FORBIDDEN")
    assert_error(_post(http, "bad id!", good), 400, "INVALID_REQUEST")
    assert_error(_post(http, "ev-auth", {**good, "experiment_id": "../x"}, key), 400, "INVALID_REQUEST")
    for bad in (
        _report(1, loss=1.0),  # no data_samples
        _report(1, data_samples=-1, loss=1.0),
        _report(1, data_samples=10),  # samples without a loss
        _report(1, data_samples=1, loss=1.0, flag=True),
        _report(1, data_samples=1, loss="low"),
        {**good, "extra": 1},
        {**good, "round": 0},
        _report(1, data_samples=1, loss=1.0, **{f"m{i}": 0.0 for i in range(80)}),
        [1, 2],
    ):
        assert_error(_post(http, "ev-auth", bad, key), 400, "INVALID_REQUEST")
    raw = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    nan = b'{"experiment_id": "x", "round": 1, "metrics": {"data_samples": 1, "loss": NaN}}'
    assert_error(http.post("/model/evaluation/ev-auth", content=nan, headers=raw), 400, "INVALID_REQUEST")
    assert_error(http.post("/model/evaluation/ev-auth", content=b"{not json", headers=raw), 400, "INVALID_REQUEST")
    huge = b'{"pad": "' + b"x" * 70_000 + b'"}'
    resp = http.post("/model/evaluation/ev-auth", content=huge, headers=raw)
    assert resp.status_code == 413, resp.text
