"""SIGKILL the whole `fedloom serve` (Temporal dev server included) mid-round, start it again on the
same data dir: the experiment finishes with a final model identical, byte for byte, to an
uninterrupted run with the same seed."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, spawn_clients, start_serve, stop_serve, wait_registered

pytestmark = pytest.mark.e2e
CLIENTS, ROUNDS = 3, 4


def _body() -> dict:
    return {
        "experiment_config": {
            "experiment_id": "crash",
            "rounds": ROUNDS,
            "min_clients": CLIENTS,
            "seed": 7,
            "dataset": "digits",
            "model_architecture": "MLP",
            "round_timeout_s": 120,
        },
        "training_config": {"local_epochs": 1, "batch_size": 32, "learning_rate": 0.05},
        "aggregation_config": {"min_updates": CLIENTS},
    }


def _run(tmp: Path, kill_at_round: int | None) -> str:
    tmp.mkdir()
    data_dir, port, temporal_port = tmp / "data", free_port(), free_port()
    server = start_serve(data_dir, port=port, temporal_port=temporal_port)
    clients = spawn_clients(server, CLIENTS, tmp, "k")
    try:
        http = httpx.Client(base_url=server.api, headers=server.headers(), timeout=30)
        wait_registered(http, CLIENTS, clients)
        assert http.post("/training/start", json=_body()).status_code == 200
        if kill_at_round is not None:
            deadline = time.monotonic() + 120
            while http.get("/training/status").json()["current_round"] < kill_at_round:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            http.close()
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait(timeout=30)
            time.sleep(2)  # its children follow it (they die with their parent)
            server = start_serve(data_dir, port=port, temporal_port=temporal_port)
            http = httpx.Client(base_url=server.api, headers=server.headers(), timeout=30)
        deadline = time.monotonic() + 300
        while (status := http.get("/training/status").json())["status"] == "running":
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        assert status["status"] == "completed" and status["current_round"] == ROUNDS, status
        return http.get("/model/global").json()["sha256"]
    finally:
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
        stop_serve(server)


def test_sigkill_of_serve_mid_round_loses_nothing(tmp_path: Path) -> None:
    reference = _run(tmp_path / "uninterrupted", None)
    recovered = _run(tmp_path / "killed", kill_at_round=2)
    assert recovered == reference
