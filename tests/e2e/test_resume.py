"""Ctrl-C stops `fedloom serve` cleanly; a second `serve` on the same data dir finishes the experiment."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest
from sqlmodel import select

from fedloom_core.storage.db import Experiment, RoundMetrics, make_engine
from fedloom_core.storage.repo import session_scope
from tests.conftest import free_port, small_run_body, spawn_clients, start_serve, stop_serve, wait_registered

pytestmark = pytest.mark.e2e
CLIENTS, ROUNDS = 3, 4


def test_interrupted_serve_resumes_on_the_same_data_dir(tmp_path: Path) -> None:
    data_dir, port, temporal_port = tmp_path / "data", free_port(), free_port()
    server = start_serve(data_dir, port=port, temporal_port=temporal_port)
    clients = spawn_clients(server, CLIENTS, tmp_path, "r")
    try:
        http = httpx.Client(base_url=server.api, headers=server.headers(), timeout=30)
        wait_registered(http, CLIENTS, clients)
        deadline = time.monotonic() + 60
        assert http.post("/training/start", json=small_run_body("resume", ROUNDS, CLIENTS)).status_code == 200
        while http.get("/training/status").json()["current_round"] < 2:
            assert time.monotonic() < deadline + 120
            time.sleep(0.2)
        http.close()

        server.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert server.proc.wait(timeout=60) == 0
        time.sleep(1)

        server = start_serve(data_dir, port=port, temporal_port=temporal_port)
        http = httpx.Client(base_url=server.api, headers=server.headers(), timeout=30)
        deadline = time.monotonic() + 240
        while (status := http.get("/training/status").json())["status"] == "running":
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        assert status["status"] == "completed" and status["experiment_id"] == "resume", status
        assert status["current_round"] == ROUNDS and status["progress"] == 1.0
    finally:
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
        stop_serve(server)
    engine = make_engine(f"sqlite:///{data_dir / 'fedloom.db'}")
    with session_scope(engine) as s:
        rounds = s.exec(select(RoundMetrics).where(RoundMetrics.experiment_id == "resume")).all()
        exp = s.get(Experiment, "resume")
    assert sorted(r.round for r in rounds) == list(range(1, ROUNDS + 1))
    assert all(r.participating_clients == CLIENTS for r in rounds)
    assert exp is not None and exp.final_model_id == f"model_resume_round_{ROUNDS}"
