"""The demo's flow end to end: fedloom serve, 5 client processes, 10 rounds of FedAvg on digits."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch
from websockets.sync.client import connect as connect_ws

from fedloom_core.learning.datasets import load_test
from fedloom_core.learning.training import evaluate
from fedloom_core.learning.weights import load_state
from fedloom_core.learning.zoo import build_model
from fedloom_core.temporal import connect
from fedloom_tools.demo import start_body
from tests.conftest import spawn_clients, start_serve, stop_serve, wait_registered

pytestmark = pytest.mark.e2e
CLIENTS, ROUNDS = 5, 10


def test_five_clients_reach_90_percent_and_the_downloaded_model_agrees(tmp_path: Path) -> None:
    server = start_serve(tmp_path / "data")
    procs: list[subprocess.Popen] = []
    try:
        procs = spawn_clients(server, CLIENTS, tmp_path)
        http = httpx.Client(base_url=server.api, headers=server.headers(), timeout=60)
        wait_registered(http, CLIENTS, procs)
        started = http.post("/training/start", json=start_body(ROUNDS, CLIENTS, experiment_id="e2e"))
        assert started.status_code == 200, started.text
        deadline = time.monotonic() + 400
        while (status := http.get("/training/status").json())["status"] == "running":
            assert time.monotonic() < deadline, f"experiment did not finish: {status}"
            time.sleep(1)
        assert status["status"] == "completed", status
        assert status["current_round"] == ROUNDS and status["progress"] == 1.0
        accuracy = status["round_metrics"]["accuracy"]
        assert accuracy >= 0.90, status
        assert status["round_metrics"]["participating_clients"] == CLIENTS

        # Clients exit on their own when the experiment ends.
        for proc in procs:
            assert proc.wait(timeout=60) == 0

        meta = http.get("/model/global").json()
        assert meta["round"] == ROUNDS and meta["model_id"] == status["final_model_id"]
        assert meta["accuracy"] == pytest.approx(accuracy)
        blob = http.get(f"/model/download/{meta['model_id']}", params={"format": "safetensors"})
        assert blob.status_code == 200
        assert blob.headers["x-model-sha256"] == hashlib.sha256(blob.content).hexdigest() == meta["sha256"]
        path = tmp_path / "final.safetensors"
        path.write_bytes(blob.content)
        model = build_model("CNN", (8, 8, 1), 10)
        model.load_state_dict(load_state(path))
        independent_acc, _ = evaluate(model, load_test("digits"))
        assert independent_acc == pytest.approx(accuracy, abs=1e-9)

        pt = http.get(f"/model/download/{meta['model_id']}", params={"format": "pytorch"})
        model.load_state_dict(torch.load(io.BytesIO(pt.content), weights_only=True))
        assert evaluate(model, load_test("digits"))[0] == pytest.approx(accuracy, abs=1e-9)

        asyncio.run(_check_web_ui_view(server))
        # Keys travel in headers and, for browsers, in the WebSocket URL; a wrong key is refused.
        ws_url = server.url.replace("http", "ws") + f"/ws/events?api_key={server.admin_key}&since=0"
        with connect_ws(ws_url) as ws:
            assert json.loads(ws.recv(timeout=10))["type"]
        bogus = "fladmin_" + "x" * 43
        assert http.get("/clients", headers={"Authorization": f"Bearer {bogus}"}).status_code == 401
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        stop_serve(server)
    _assert_no_key_logged(tmp_path, [server.admin_key, bogus])


def _assert_no_key_logged(tmp_path: Path, keys: list[str]) -> None:
    """No log, console output or database file holds a key: they are masked in logs, hashed at rest."""
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in {".log", ".db", ".db-wal", ""}]
    assert any(p.name == "api.log" for p in files) and any(p.name == "serve-data.log" for p in files)
    for path in files:
        if path.name == "admin_api_key":
            continue  # the key's own 0600 file
        data = path.read_bytes()
        for key in keys:
            assert key.encode() not in data, f"a key appears in {path}"


async def _check_web_ui_view(server) -> None:  # type: ignore[no-untyped-def]
    """What an operator sees in the Temporal Web UI: the README's queries find the experiment."""
    client = await connect(server.temporal_address)
    for query in (
        'ExperimentId = "e2e"',
        'ExperimentStatus = "completed" AND Strategy = "FedAvg"',
        f"CurrentRound >= {ROUNDS}",
    ):
        for _ in range(50):  # visibility is updated asynchronously, within moments
            found = [wf.id async for wf in client.list_workflows(query)]
            if found:
                break
            await asyncio.sleep(0.2)
        assert found == ["experiment-e2e"], query
    # The API wakes the workflow only with an upload that completes a round, naming every client. (Two
    # last uploads that commit together may both see the round complete and both signal: harmless.)
    history = await client.get_workflow_handle("experiment-e2e").fetch_history()
    wakes = [
        json.loads(ev.workflow_execution_signaled_event_attributes.input.payloads[0].data)
        for ev in history.events
        if ev.HasField("workflow_execution_signaled_event_attributes")
        and ev.workflow_execution_signaled_event_attributes.signal_name == "update_received"
    ]
    assert sorted({w["round"] for w in wakes}) == list(range(1, ROUNDS + 1))
    assert all(len(w["reported"]) == CLIENTS for w in wakes)
    desc = await client.get_workflow_handle("experiment-e2e").describe()
    memo = await desc.memo()
    assert memo["name"] == "e2e" and "FedAvg" in memo["summary"] and f"{ROUNDS} rounds" in memo["summary"]
    assert not [wf async for wf in client.list_workflows('ExperimentStatus = "running"')]
