"""Resumable uploads of an experiment's initial model: a connection dropped at ~90% resumes, and the
experiment starts from the file; the guards (admin only, ids, sizes, validation, a started experiment).

The drop is a live ``fedloom serve`` (a raw socket closed mid-chunk); the guards use the in-process app.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedloom_core.errors import NotFound
from fedloom_core.storage import upload_sessions as sessions
from tests.api.test_initial_models import CUSTOM, _create
from tests.api.test_training_api import assert_error, register, wait_task
from tests.api.test_upload_sessions import _drop_mid_chunk, _put
from tests.conftest import LiveServer, start_serve, stop_serve

CHUNK = 4096


def custom_weights(seed: int = 0) -> bytes:
    """A custom model's weights, some 32 kB: eight 4 kB chunks."""
    torch.manual_seed(seed)
    return st_save(
        {"body.weight": torch.randn(80, 96), "body.bias": torch.zeros(80), "head.weight": torch.randn(2, 80)}
    )


def custom_experiment(http: httpx.Client, name: str) -> str:
    """A custom-model experiment, not started (two clients, one round)."""
    body = {**CUSTOM, "name": name, "training_config": {"rounds": 1}}
    return _create(http, body)


def starts_from(http: httpx.Client, exp_id: str, model_id: str, data: bytes, prefix: str) -> bytes:
    """Start ``exp_id`` with two new clients; the round-1 task hands out ``model_id``, whose bytes are ``data``."""
    for cid in (f"{prefix}1", f"{prefix}2"):
        register(http, cid)
    started = http.post("/training/start", json={"experiment_config": {"experiment_id": exp_id}})
    assert started.status_code == 200, started.text
    task = wait_task(http, f"{prefix}1")
    assert task["model_id"] == model_id
    download = http.get(f"/model/download/{task['model_id']}").content
    assert download == data
    return download


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_serve(
        tmp_path_factory.mktemp("initial-sessions") / "data",
        {"FEDLOOM_UPLOAD_CHUNK_MB": str(CHUNK / 1e6), "FEDLOOM_MAX_UPLOAD_MB": "1"},
    )
    yield live
    stop_serve(live)


@pytest.mark.e2e
def test_an_initial_model_dropped_at_90_percent_resumes_and_the_experiment_starts_from_it(server: LiveServer) -> None:
    data = custom_weights()
    size = len(data)
    assert size > 7 * CHUNK
    with httpx.Client(base_url=server.api, headers=server.headers(), timeout=60) as http:
        exp_id = custom_experiment(http, "resumed-initial")
        opened = http.post(f"/experiments/{exp_id}/initial_model/sessions", json={"size": size})
        assert opened.status_code == 201, opened.text
        session = opened.json()
        assert session["offset"] == 0 and session["chunk_max_bytes"] == CHUNK and session["model_id"] is None
        url = f"/experiments/{exp_id}/initial_model/sessions/{session['upload_id']}"
        assert session["upload_url"] == f"/api/v1{url}" and opened.headers["Location"] == session["upload_url"]
        offset, drop_at = 0, int(size * 0.9)
        while offset + CHUNK <= drop_at:
            resp = _put(http, url, data[offset : offset + CHUNK], offset, size)
            assert resp.status_code == 200, resp.text
            offset = resp.json()["offset"]
        # The connection drops inside the chunk that crosses 90%; what arrived is kept.
        _drop_mid_chunk(server, server.admin_key, url, data[offset : offset + CHUNK], offset, size, drop_at - offset)
        deadline = time.monotonic() + 10
        while (state := http.get(url).json())["offset"] != drop_at:
            assert time.monotonic() < deadline, state
            time.sleep(0.1)
        head = http.head(url)
        assert head.headers["Upload-Offset"] == str(drop_at) and head.headers["Upload-Length"] == str(size)
        assert_error(http.post(f"{url}/complete"), 409, "CONFLICT")
        # Resume from the committed offset: only the last ~10% goes again.
        offset = drop_at
        while offset < size:
            resp = _put(http, url, data[offset : offset + CHUNK], offset, size)
            assert resp.status_code == 200, resp.text
            offset = resp.json()["offset"]
        assert resp.json()["complete"] is True
        digest = hashlib.sha256(data).hexdigest()
        done = http.post(f"{url}/complete", json={"sha256": digest})
        assert done.status_code == 200, done.text
        stored = done.json()
        assert stored["model_id"] == f"model_{exp_id}_round_0" and stored["round"] == 0
        assert stored["format"] == "safetensors" and stored["tensors"] == 3 and stored["sha256"] == digest
        assert stored["size_bytes"] == size and stored["parameters_count"] == 80 * 96 + 80 + 2 * 80
        assert http.post(f"{url}/complete").json() == stored  # a repeat answers the same
        assert http.get(url).json()["model_id"] == stored["model_id"]
        assert_error(_put(http, url, data[:CHUNK], 0, size), 409, "CONFLICT")
        # The experiment starts from these weights: its clients' round-1 task hands them out, byte for byte.
        download = starts_from(http, exp_id, stored["model_id"], data, "ims")
        assert st_load(download).keys() == st_load(data).keys()
        # Started: the weights are fixed, for a session as for the single request.
        assert_error(http.post(f"/experiments/{exp_id}/initial_model/sessions", json={"size": size}), 409, "CONFLICT")
        http.post("/training/stop", json={"experiment_id": exp_id, "reason": "test over"})
    assert not (server.data_dir / "tmp" / "sessions" / session["upload_id"] / "data").exists()


def _send_all(http, url: str, data: bytes, chunk: int = CHUNK):  # type: ignore[no-untyped-def]
    offset = 0
    while offset < len(data):
        resp = _put(http, url, data[offset : offset + chunk], offset, len(data))
        assert resp.status_code == 200, resp.text
        offset = resp.json()["offset"]
    return http.post(f"{url}/complete")


@pytest.mark.unit
def test_initial_model_sessions_guard_like_the_single_request(local_app) -> None:  # type: ignore[no-untyped-def]
    # Chunks are larger than a JSON body may be: they are counted as uploads.
    http = local_app(max_upload_mb=0.05, upload_chunk_mb=CHUNK / 1e6, max_json_kb=2)
    exp_id = custom_experiment(http, "guards")
    base = f"/experiments/{exp_id}/initial_model/sessions"
    # Before anything is accepted: the experiment, the ids, the size, the body.
    assert_error(http.post(base, json={"size": 60_001}), 413, "INVALID_REQUEST")
    assert_error(http.post("/experiments/nope/initial_model/sessions", json={"size": 10}), 404, "NOT_FOUND")
    assert_error(http.post("/experiments/bad id!/initial_model/sessions", json={"size": 10}), 400, "INVALID_REQUEST")
    assert_error(http.post(base, json={"size": 10, "metrics": {}}), 400, "INVALID_REQUEST")
    assert_error(http.get(f"{base}/upl_{'0' * 32}"), 404, "NOT_FOUND")
    assert_error(http.get(f"{base}/bad id!"), 400, "INVALID_REQUEST")
    # Admin only: a client key is refused.
    client_key = http.post("/clients/register", json={"client_id": "g1"}).json()["api_key"]
    as_client = {"Authorization": f"Bearer {client_key}"}
    assert_error(http.post(base, json={"size": 10}, headers=as_client), 403, "FORBIDDEN")
    # A file the single request would refuse is refused with the same error, and ends the session.
    bad = {k: v.clone() for k, v in st_load(custom_weights()).items()}
    bad["head.weight"][0, 0] = float("nan")
    bad_bytes = st_save(bad)
    url = f"{base}/{http.post(base, json={'size': len(bad_bytes)}).json()['upload_id']}"
    assert_error(http.get(url, headers=as_client), 403, "FORBIDDEN")
    single = assert_error(
        http.put(f"/experiments/{exp_id}/initial_model", content=bad_bytes), 400, "MODEL_VALIDATION_FAILED"
    )
    err = assert_error(_send_all(http, url, bad_bytes), 400, "MODEL_VALIDATION_FAILED")
    assert err["details"] == single["details"] and "head.weight" in err["details"]
    assert_error(http.get(url), 404, "NOT_FOUND")
    # A good file answers exactly as the single request does.
    data = custom_weights(1)
    opened = http.post(base, json={"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}).json()
    # An initial-model session is not an update session (and the other way round).
    assert_error(http.get(f"/model/update/g1/sessions/{opened['upload_id']}"), 404, "NOT_FOUND")
    assert_error(http.get(f"/experiments/other/initial_model/sessions/{opened['upload_id']}"), 404, "NOT_FOUND")
    resp = _send_all(http, f"{base}/{opened['upload_id']}", data)
    assert resp.status_code == 200, resp.text
    again = http.put(f"/experiments/{exp_id}/initial_model", content=data)
    assert again.status_code == 200 and again.json() == resp.json()
    # A digest that does not match ends the session.
    url = f"{base}/{http.post(base, json={'size': len(data)}).json()['upload_id']}"
    for offset in range(0, len(data), CHUNK):
        _put(http, url, data[offset : offset + CHUNK], offset, len(data))
    assert_error(http.post(f"{url}/complete", json={"sha256": "0" * 64}), 400, "INVALID_REQUEST")
    assert_error(http.get(url), 404, "NOT_FOUND")
    # DELETE drops a session.
    url = f"{base}/{http.post(base, json={'size': len(data)}).json()['upload_id']}"
    assert http.delete(url).status_code == 204
    assert_error(http.get(url), 404, "NOT_FOUND")


@pytest.mark.unit
def test_the_store_keeps_kinds_apart_and_reads_sessions_written_before_kinds(tmp_path: Path) -> None:
    initial = sessions.create(
        tmp_path, client_id="", experiment_id="e1", round=0, size=4, metrics={}, sha256=None, kind="initial_model"
    )
    assert sessions.load(tmp_path, initial.upload_id, "e1", 60, kind="initial_model").owner == "e1"
    for owner, kind in (("e1", "update"), ("", "update"), ("e2", "initial_model")):
        with pytest.raises(NotFound):
            sessions.load(tmp_path, initial.upload_id, owner, 60, kind=kind)
    sessions.mark_finished(initial, None, {"model_id": "model_e1_round_0"})
    again = sessions.load(tmp_path, initial.upload_id, "e1", 60, kind="initial_model")
    assert again.finished and again.offset() == 4 and again.result == {"model_id": "model_e1_round_0"}
    # A session opened before sessions had a kind (an API upgraded while it was open) is an update's.
    update = sessions.create(tmp_path, client_id="c1", experiment_id="e1", round=1, size=4, metrics={}, sha256=None)
    meta = update.directory / "meta.json"
    record = json.loads(meta.read_text())
    meta.write_text(json.dumps({k: v for k, v in record.items() if k not in ("kind", "result")}))
    old = sessions.load(tmp_path, update.upload_id, "c1", 60)
    assert old.kind == "update" and not old.finished and old.offset() == 0
    with pytest.raises(NotFound):
        sessions.load(tmp_path, update.upload_id, "e1", 60, kind="initial_model")
