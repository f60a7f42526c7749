"""Model formats (ONNX, PyTorch), the validation dry run, and update status, against a live server."""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedloom_core.learning.datasets import load_test
from fedloom_core.learning.zoo import build_model
from tests.api.test_training_api import assert_error, register, start_body, upload, wait_task
from tests.conftest import LiveServer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def http(live_server: LiveServer):  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=live_server.api, headers=live_server.headers(), timeout=60) as client:
        yield client


def test_validate_dry_run_update_status_and_onnx_export(http: httpx.Client) -> None:
    keys = {cid: register(http, cid) for cid in ("m1", "m2")}
    started = http.post("/training/start", json=start_body("exp-models", rounds=1, min_clients=2))
    assert started.status_code == 200, started.text
    task = wait_task(http, "m1")
    state = st_load(http.get(f"/model/download/{task['model_id']}").content)
    as_key = {"Authorization": f"Bearer {keys['m1']}"}

    good = st_save({k: v + 0.01 for k, v in state.items()})
    resp = http.post(
        "/model/validate/m1",
        headers=as_key,
        files={"model_file": ("m", good)},
        data={"metrics": '{"data_samples": 10}'},
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["valid"] is True
    names = {c["name"] for c in body["checks"]}
    assert names == {"round_active", "metrics", "format", "structure", "finite_values", "policy"}
    assert all(c["passed"] and isinstance(c["details"], str) for c in body["checks"])
    # A dry run stores nothing: the client still has to train.
    assert wait_task(http, "m1")["status"] == "train"

    name = sorted(state)[0]
    broken = dict(state)
    broken[name] = torch.full_like(state[name], float("nan"))
    body = http.post("/model/validate/m1", files={"model_file": ("m", st_save(broken))}).json()
    failed = {c["name"]: c["details"] for c in body["checks"] if not c["passed"]}
    assert body["valid"] is False and set(failed) == {"finite_values"} and name in failed["finite_values"]
    body = http.post("/model/validate/m1", files={"model_file": ("m", b"garbage!")}).json()
    assert body["valid"] is False and [c["name"] for c in body["checks"] if not c["passed"]] == ["format"]
    assert_error(http.post("/model/validate/nobody", files={"model_file": ("m", good)}), 404, "CLIENT_NOT_REGISTERED")
    assert_error(http.post("/model/validate/m2", headers=as_key, files={"model_file": ("m", good)}), 403, "FORBIDDEN")

    ids = {}
    for i, cid in enumerate(("m1", "m2")):
        resp = upload(http, cid, st_save({k: v + 0.01 * (i + 1) for k, v in state.items()}), key=keys[cid])
        assert resp.status_code == 200, resp.text
        ids[cid] = resp.json()["update_id"]
    deadline = time.monotonic() + 60
    while http.get("/training/status").json()["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    upd = http.get(f"/model/update/{ids['m1']}", headers=as_key)
    assert upd.status_code == 200
    assert upd.json()["validation_status"] == "accepted" and upd.json()["round"] == 1
    assert_error(http.get(f"/model/update/{ids['m2']}", headers=as_key), 403, "FORBIDDEN")
    assert_error(http.get("/model/update/update_0000"), 404, "NOT_FOUND")
    assert_error(http.get("/model/update/bad..id!"), 400, "INVALID_REQUEST")

    meta = http.get("/model/global", params={"format": "onnx"}).json()
    assert meta["round"] == 1 and meta["download_url"].endswith("format=onnx")
    onnx_bytes = http.get(meta["download_url"]).content
    final = http.get(f"/model/download/{meta['model_id']}", params={"format": "pytorch"}).content
    model = build_model("MLP", (8, 8, 1), 10)
    model.load_state_dict(torch.load(io.BytesIO(final), weights_only=True))
    model.eval()

    import onnxruntime

    batch = load_test("digits").x[:64]
    session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input": batch.numpy()})[0]
    with torch.no_grad():
        want = model(batch).numpy()
    assert got.shape == (64, 10)
    assert float(np.abs(got - want).max()) < 1e-4
