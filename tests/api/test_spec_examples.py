"""The spec's example bodies, verbatim, against a live server: every documented field, with its type."""

from __future__ import annotations

import copy
import json

import httpx
import pytest
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from api import openapi
from tests.api.test_training_api import assert_error, wait_task
from tests.conftest import LiveServer

pytestmark = pytest.mark.e2e

ISO = str
NUM = (int, float)


def check_types(body: dict, spec: dict, path: str = "") -> None:
    """Every field of the spec's example is present with a value of the example's type (null allowed only
    where noted by the caller)."""
    for key, example in spec.items():
        assert key in body, f"{path}{key} missing"
        value = body[key]
        if isinstance(example, dict) and example:
            assert isinstance(value, dict), f"{path}{key}"
            check_types(value, example, f"{path}{key}.")
        elif isinstance(example, bool):
            assert isinstance(value, bool), f"{path}{key}"
        elif isinstance(example, (int, float)):
            assert isinstance(value, NUM) and not isinstance(value, bool), f"{path}{key}={value!r}"
        elif isinstance(example, str):
            assert isinstance(value, str), f"{path}{key}={value!r}"
            if key.endswith(("timestamp", "_at", "start_time", "estimated_completion", "last_update")):
                assert value.endswith("Z") and "T" in value, f"{path}{key}={value!r}"
        elif isinstance(example, list):
            assert isinstance(value, list), f"{path}{key}"


@pytest.fixture(scope="module")
def http(live_server: LiveServer):  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=live_server.api, headers=live_server.headers(), timeout=60) as client:
        yield client


def test_spec_examples_end_to_end(http: httpx.Client) -> None:
    reg = http.post("/clients/register", json=openapi.REGISTER_REQUEST)
    assert reg.status_code == 200, reg.text
    check_types(reg.json(), {k: v for k, v in openapi.REGISTER_RESPONSE.items()})
    assert reg.json()["client_config"] == openapi.REGISTER_REQUEST["client_config"]
    key = reg.json()["api_key"]
    for i in range(2, 6):
        body = copy.deepcopy(openapi.REGISTER_REQUEST)
        body["client_id"] = f"client-00{i}"
        assert http.post("/clients/register", json=body).status_code == 200

    client = http.get("/clients/client-001").json()
    # Never trained yet: no last update, and its performance metrics are null (data_size 0).
    assert client["last_update"] is None
    assert client["performance_metrics"] == {
        "local_accuracy": None,
        "training_time": None,
        "communication_time": None,
        "data_size": 0,
    }
    check_types(
        client, {k: v for k, v in openapi.CLIENT_STATUS.items() if k not in ("last_update", "performance_metrics")}
    )

    health = http.get("/health").json()
    check_types(health, openapi.HEALTH)

    # CIFAR-10 files are not on this machine: the spec's body names a dataset we cannot load yet.
    err = assert_error(http.post("/training/start", json=openapi.START_REQUEST), 400, "INVALID_REQUEST")
    assert "digits" in err["details"]
    start = copy.deepcopy(openapi.START_REQUEST)
    start["experiment_config"]["dataset"] = "digits"
    started = http.post("/training/start", json=start)
    assert started.status_code == 200, started.text
    check_types(started.json(), openapi.START_RESPONSE)
    assert started.json()["experiment_id"] == "exp_2025_001"

    status = http.get("/status").json()
    check_types(status, {**openapi.STATUS, "model_config": {**openapi.STATUS["model_config"], "dataset": "digits"}})
    assert status["model_config"] == {"architecture": "CNN", "dataset": "digits", "batch_size": 32}
    assert status["training_config"] == {"rounds": 10, "min_clients": 5, "client_fraction": 0.8, "local_epochs": 3}

    task = wait_task(http, "client-001")
    training = http.get("/training/status").json()
    check_types(training, {k: v for k, v in openapi.TRAINING_STATUS.items() if k != "round_metrics"})
    assert training["round_metrics"] is None  # no round has completed yet

    model = http.get("/model/global").json()
    check_types(model, {k: v for k, v in openapi.GLOBAL_MODEL.items() if k not in ("accuracy", "loss")})

    state = st_load(http.get(f"/model/download/{task['model_id']}").content)
    upload = http.post(
        "/model/update/client-001",
        headers={"Authorization": f"Bearer {key}"},
        files={"model_file": ("model.safetensors", st_save(state))},
        data={"metrics": json.dumps(openapi.UPLOAD_METRICS)},
    )
    assert upload.status_code == 200, upload.text
    check_types(upload.json(), openapi.UPLOAD_RESPONSE)
    assert upload.json()["validation_status"] == "pending"

    stopped = http.post("/training/stop", json=openapi.STOP_REQUEST)
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["experiment_id"] == "exp_2025_001" and stopped.json()["reason"] == "manual_stop"
