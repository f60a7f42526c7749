"""The loop's endpoints against a live ``fedloom serve``: auth, start/stop, uploads and their bad inputs."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from sqlmodel import select

from fedloom_core.storage.db import Event, make_engine
from fedloom_core.storage.repo import session_scope
from tests.conftest import LiveServer

pytestmark = pytest.mark.e2e


def assert_error(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    err = body["error"]
    assert err["code"] == code
    assert isinstance(err["message"], str) and isinstance(err["details"], str) and err["details"]
    assert err["timestamp"].endswith("Z")
    return err


@pytest.fixture(scope="module")
def http(live_server: LiveServer):  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=live_server.api, headers=live_server.headers(), timeout=60) as client:
        yield client


def register(http: httpx.Client, client_id: str) -> str:
    resp = http.post(
        "/clients/register",
        json={
            "client_id": client_id,
            "client_config": {"batch_size": 16},
            "capabilities": {"memory": "8GB"},
            "location": {"region": "eu"},
        },
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["client_id"] == client_id and body["status"] == "registered"
    assert body["registration_id"].startswith("reg_") and body["api_key"]
    assert isinstance(body["assigned_round"], int) and body["assigned_round"] >= 1
    return body["api_key"]


def start_body(exp_id: str, **ec: object) -> dict:
    return {
        "experiment_config": {
            "experiment_id": exp_id,
            "rounds": 2,
            "min_clients": 2,
            "client_fraction": 1.0,
            "dataset": "digits",
            "model_architecture": "MLP",
            "round_timeout_s": 120,
            **ec,
        },
        "training_config": {"local_epochs": 1, "batch_size": 32, "learning_rate": 0.05, "optimizer": "SGD"},
        "aggregation_config": {"strategy": "FedAvg", "weighted": True, "min_updates": 2},
    }


def wait_task(http: httpx.Client, client_id: str, status: str = "train", timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = http.get(f"/clients/{client_id}/task").json()
        if task.get("status") == status:
            return task
        time.sleep(0.2)
    raise AssertionError(f"{client_id} never got a {status!r} task")


def upload(
    http: httpx.Client, client_id: str, data: bytes, key: str | None = None, samples: int = 50
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return http.post(
        f"/model/update/{client_id}",
        headers=headers,
        files={"model_file": ("m.safetensors", data)},
        data={"metrics": f'{{"data_samples": {samples}, "local_accuracy": 0.5}}'},
    )


class Boom:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_auth_is_required_except_for_health(live_server: LiveServer) -> None:
    assert httpx.get(f"{live_server.api}/health").status_code == 200
    assert_error(httpx.get(f"{live_server.api}/status"), 401, "UNAUTHORIZED")
    assert_error(httpx.get(f"{live_server.api}/status", headers={"Authorization": "Bearer nope"}), 401, "UNAUTHORIZED")
    assert_error(httpx.get(f"{live_server.api}/status", headers={"Authorization": "Basic abc"}), 401, "UNAUTHORIZED")
    status = httpx.get(f"{live_server.api}/status", headers=live_server.headers()).json()
    assert status["status"] == "idle" and status["registered_clients"] == 0


def test_health_reports_real_process_numbers(live_server: LiveServer) -> None:
    body = httpx.get(f"{live_server.api}/health").json()
    assert body["status"] == "healthy" and body["components"] == {
        "database": "up",
        "blob_store": "up",
        "temporal": "up",
    }
    assert body["memory_usage"].endswith("MB") and int(body["memory_usage"][:-2]) > 10
    assert body["cpu_usage"].endswith("%") and isinstance(body["uptime"], int)


def test_register_conflict_and_bad_ids(http: httpx.Client) -> None:
    key = register(http, "lonely")
    assert_error(http.post("/clients/register", json={"client_id": "lonely"}), 409, "CONFLICT")
    assert_error(http.post("/clients/register", json={"client_id": "../etc"}), 400, "INVALID_REQUEST")
    assert_error(http.post("/clients/register", json={"client_id": "x", "bogus": 1}), 400, "INVALID_REQUEST")
    # A client key may not register others, nor read another client's record.
    assert_error(
        http.post("/clients/register", json={"client_id": "y"}, headers={"Authorization": f"Bearer {key}"}),
        403,
        "FORBIDDEN",
    )
    assert http.get("/clients/lonely", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert_error(http.get("/clients/bad id!"), 400, "INVALID_REQUEST")
    assert_error(http.get("/clients/ghost"), 404, "CLIENT_NOT_REGISTERED")


def test_upload_with_no_experiment_is_not_active(http: httpx.Client) -> None:
    assert_error(upload(http, "lonely", b"whatever"), 409, "EXPERIMENT_NOT_ACTIVE")


def test_start_rejects_unknown_names_and_too_few_clients(http: httpx.Client) -> None:
    err = assert_error(http.post("/training/start", json=start_body("e1", dataset="imagenet")), 400, "INVALID_REQUEST")
    assert "digits" in err["details"]
    err = assert_error(
        http.post("/training/start", json=start_body("e1", model_architecture="ResNet")), 400, "INVALID_REQUEST"
    )
    assert "CNN" in err["details"] and "MLP" in err["details"]
    assert_error(http.post("/training/start", json=start_body("e1", min_clients=50)), 400, "INSUFFICIENT_CLIENTS")
    assert_error(http.post("/training/start", json=start_body("bad/id")), 400, "INVALID_REQUEST")


def test_start_refuses_bad_strategy_settings(http: httpx.Client) -> None:
    body = start_body("e-strategy", min_clients=1)
    body["aggregation_config"] = {"strategy": "FedTrimmedAvg", "params": {"trim_fraction": 0.9}}
    err = assert_error(http.post("/training/start", json=body), 400, "INVALID_REQUEST")
    assert "trim_fraction" in err["details"]
    body["aggregation_config"] = {"strategy": "FedMagic"}
    err = assert_error(http.post("/training/start", json=body), 400, "INVALID_REQUEST")
    assert "FedAvg" in err["details"] and "Krum" in err["details"]
    body["aggregation_config"] = {"strategy": "Krum", "params": {"num_byzantine": 2}, "min_updates": 3}
    err = assert_error(http.post("/training/start", json=body), 400, "INVALID_REQUEST")
    assert "at least 7 updates" in err["details"]
    assert http.get("/training/status").json()["status"] != "running"


def test_uploads_during_a_round(http: httpx.Client, live_server: LiveServer, tmp_path: Path) -> None:
    key_a, key_b = register(http, "alpha"), register(http, "beta")
    started = http.post("/training/start", json=start_body("exp-api", min_clients=3))
    assert started.status_code == 200, started.text
    body = started.json()
    assert body["experiment_id"] == "exp-api" and body["status"] == "started" and body["total_rounds"] == 2
    assert_error(http.post("/training/start", json=start_body("exp-other")), 409, "TRAINING_ALREADY_RUNNING")

    task = wait_task(http, "alpha")
    assert task["round"] == 1 and task["training_config"]["batch_size"] == 32
    model = http.get(f"/model/download/{task['model_id']}")
    assert model.status_code == 200
    assert model.headers["x-model-sha256"] == hashlib.sha256(model.content).hexdigest()
    assert int(model.headers["content-length"]) == len(model.content)
    state = st_load(model.content)

    assert_error(upload(http, "ghost", st_save(state)), 404, "CLIENT_NOT_REGISTERED")
    assert_error(upload(http, "alpha", st_save(state), key=key_b), 403, "FORBIDDEN")
    assert_error(upload(http, "alpha", b"\x00not a model at all"), 400, "MODEL_VALIDATION_FAILED")

    marker = tmp_path / "pwned"
    assert_error(upload(http, "alpha", pickle.dumps(Boom(str(marker)))), 400, "MODEL_VALIDATION_FAILED")
    buf = io.BytesIO()
    torch.save({"w": Boom(str(marker))}, buf)
    assert_error(upload(http, "alpha", buf.getvalue()), 400, "MODEL_VALIDATION_FAILED")
    assert not marker.exists()

    name = sorted(state)[0]
    wrong = dict(state)
    wrong[name] = torch.zeros(3, 3)
    err = assert_error(upload(http, "alpha", st_save(wrong)), 400, "MODEL_VALIDATION_FAILED")
    assert name in err["details"] and "shape" in err["details"]
    wrong = dict(state)
    wrong[name] = state[name].double()
    err = assert_error(upload(http, "alpha", st_save(wrong)), 400, "MODEL_VALIDATION_FAILED")
    assert name in err["details"] and "dtype" in err["details"]
    missing = {k: v for k, v in state.items() if k != name}
    err = assert_error(upload(http, "alpha", st_save(missing)), 400, "MODEL_VALIDATION_FAILED")
    assert name in err["details"] and "missing" in err["details"]
    err = assert_error(upload(http, "alpha", st_save(state)[:-10]), 400, "MODEL_VALIDATION_FAILED")
    resp = http.post("/model/update/alpha", files={"model_file": ("m", st_save(state))}, data={"metrics": "{oops"})
    assert_error(resp, 400, "INVALID_REQUEST")

    # Each refusal is announced as an update_rejected event, with the reason.
    with session_scope(make_engine(f"sqlite:///{live_server.data_dir / 'fedloom.db'}")) as s:
        rejected = s.exec(select(Event).where(Event.type == "update_rejected")).all()
    assert len(rejected) >= 6 and all(e.client_id == "alpha" and e.payload["reason"] for e in rejected)
    assert any(name in e.payload["reason"] for e in rejected)

    # A client registered after selection is not part of this round.
    register(http, "gamma")
    assert_error(upload(http, "gamma", st_save(state)), 409, "ROUND_NOT_ACTIVE")

    # A torch.save state_dict is accepted too; the same file again is the same update, counted once.
    buf = io.BytesIO()
    torch.save({k: v + 0.01 for k, v in state.items()}, buf)
    first = upload(http, "alpha", buf.getvalue(), key=key_a)
    assert first.status_code == 200, first.text
    first_body = first.json()
    assert first_body["validation_status"] == "pending" and first_body["round"] == 1
    assert first_body["status"] == "received" and first_body["model_size_mb"] > 0
    again = upload(http, "alpha", buf.getvalue(), key=key_a)
    assert again.status_code == 200 and again.json()["update_id"] == first_body["update_id"]
    assert_error(upload(http, "alpha", st_save(state), key=key_a), 409, "CONFLICT")

    assert_error(http.get("/model/global", params={"format": "tensorflow"}), 400, "INVALID_REQUEST")
    status = http.get("/training/status").json()
    assert status["status"] == "running" and status["current_round"] == 1 and status["progress"] == 0.0
    assert sorted(status["selected_clients"]) == ["alpha", "beta", "lonely"]

    stopped = http.post("/training/stop", json={"experiment_id": "exp-api", "reason": "manual_stop"})
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["status"] == "stopped"
    assert_error(upload(http, "beta", st_save(state), key=key_b), 409, "EXPERIMENT_NOT_ACTIVE")
    assert_error(http.post("/training/stop", json={"reason": "again"}), 409, "EXPERIMENT_NOT_ACTIVE")
    status = http.get("/training/status").json()
    assert status["status"] == "stopped" and status["stop_reason"] == "manual_stop"
    # The last global model (the initial one, as no round completed) is kept and downloadable.
    glob = http.get("/model/global", params={"experiment_id": "exp-api"}).json()
    assert glob["round"] == 0 and glob["model_id"] == status["final_model_id"]
    pt = http.get(glob["download_url"].split("?")[0], params={"format": "pytorch"})
    assert pt.status_code == 200
    loaded = torch.load(io.BytesIO(pt.content), weights_only=True)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
