"""Initial weights: a custom model's round-0 weights over REST, their guards, and a custom model's start rules.

In-process app (no Temporal): the route checks and what they store, exactly.
"""

from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import save, save_file

from fedloom_core.learning import weights
from fedloom_core.learning.zoo import build_model
from fedloom_core.storage.db import GlobalModel
from fedloom_core.storage.repo import session_scope
from tests.api.test_training_api import assert_error

CUSTOM = {
    "name": "tabular",
    "dataset_config": {"name": "hospital-records", "clients_count": 3},
    "model_config": {"architecture": "custom"},
    "training_config": {"rounds": 2},
    "policy_config": {"min_clients": 2},
}


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"body.weight": torch.randn(8, 4), "body.bias": torch.zeros(8), "head.weight": torch.randn(2, 8)}


def _create(http, body: dict) -> str:  # type: ignore[no-untyped-def]
    resp = http.post("/experiments", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()["experiment_id"]


def _put(http, exp_id: str, data: bytes):  # type: ignore[no-untyped-def]
    return http.put(
        f"/experiments/{exp_id}/initial_model", content=data, headers={"Content-Type": "application/octet-stream"}
    )


def test_a_custom_models_weights_are_stored_as_round_0(local_app) -> None:  # type: ignore[no-untyped-def]
    http = local_app()
    exp_id = _create(http, CUSTOM)
    created = http.get(f"/experiments/{exp_id}").json()
    assert created["model_config"]["architecture"] == "custom" and created["dataset"] == "hospital-records"
    state = _state()
    resp = _put(http, exp_id, save(state))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model_id"] == f"model_{exp_id}_round_0" and body["round"] == 0 and body["format"] == "safetensors"
    assert body["tensors"] == 3 and body["parameters_count"] == 8 * 4 + 8 + 2 * 8
    engine = http.app.state.engine
    with session_scope(engine) as s:
        row = s.get(GlobalModel, body["model_id"])
    assert row is not None and row.sha256 == body["sha256"]
    with http.app.state.blobs.open_local(row.blob_key) as path:
        stored = weights.load_state(path)
    assert stored.keys() == state.keys() and all(torch.equal(stored[k], state[k]) for k in state)
    # A torch.save file replaces it (it is read with weights_only=True and stored as safetensors).
    buf = io.BytesIO()
    torch.save({k: v + 1 for k, v in state.items()}, buf)
    again = _put(http, exp_id, buf.getvalue())
    assert again.status_code == 200 and again.json()["format"] == "pytorch"
    assert again.json()["sha256"] != body["sha256"]


def test_initial_model_guards(local_app, tmp_path) -> None:  # type: ignore[no-untyped-def]
    http = local_app(max_upload_mb=0.01)
    exp_id = _create(http, CUSTOM)
    bad = _state()
    bad["head.weight"][0, 0] = float("nan")
    err = assert_error(_put(http, exp_id, save(bad)), 400, "MODEL_VALIDATION_FAILED")
    assert "head.weight" in err["details"]
    err = assert_error(_put(http, exp_id, b"GIF89a not a model"), 400, "MODEL_VALIDATION_FAILED")
    assert "safetensors" in err["details"]
    big = save({"w": torch.zeros(10_000)})  # 40 kB, over the 10 kB limit
    assert_error(_put(http, exp_id, big), 413, "INVALID_REQUEST")
    assert_error(_put(http, "no-such-experiment", save(_state())), 404, "NOT_FOUND")
    assert_error(_put(http, "bad id!", save(_state())), 400, "INVALID_REQUEST")


def test_a_built_in_models_initial_weights_must_fit_it(local_app, tmp_path) -> None:  # type: ignore[no-untyped-def]
    http = local_app()
    body = {
        "name": "digits",
        "dataset_config": {"name": "digits", "clients_count": 2},
        "model_config": {"architecture": "MLP"},
    }
    exp_id = _create(http, body)
    err = assert_error(_put(http, exp_id, save(_state())), 400, "MODEL_VALIDATION_FAILED")
    assert "missing" in err["details"] or "unexpected" in err["details"]
    fitting = build_model("MLP", (8, 8, 1), 10, seed=5).state_dict()
    path = tmp_path / "mlp.safetensors"
    save_file({k: v.contiguous() for k, v in fitting.items()}, str(path))
    assert _put(http, exp_id, path.read_bytes()).status_code == 200


@pytest.mark.parametrize(
    ("section", "value", "field"),
    [
        ("dataset_config", {"name": "imagenet", "clients_count": 2}, "dataset"),
        ("model_config", {"architecture": "../etc"}, "architecture"),
    ],
)
def test_names_are_checked(local_app, section: str, value: dict, field: str) -> None:  # type: ignore[no-untyped-def]
    """A built-in model needs a built-in dataset; a custom name is an id, never a path."""
    http = local_app()
    body = {
        "name": "x",
        "dataset_config": {"name": "digits", "clients_count": 2},
        "model_config": {"architecture": "MLP"},
        section: value,
    }
    err = assert_error(http.post("/experiments", json=body), 400, "INVALID_REQUEST")
    assert field in err["details"]
