"""Processes killed by SIGKILL mid-round lose nothing: each experiment finishes with a final model identical,
byte for byte, to an uninterrupted run with the same seed and data."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    LiveServer,
    free_port,
    small_run_body,
    spawn_clients,
    start_serve,
    stop_serve,
    wait_registered,
)

pytestmark = pytest.mark.e2e
CLIENTS, ROUNDS = 3, 4


def _child(server: LiveServer, role: str) -> int:
    """PID of serve's `fedloom.cli <role>` child."""
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(server.proc.pid)], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        pid, _, args = line.strip().partition(" ")
        if f"fedloom.cli {role}" in args:
            return int(pid)
    raise AssertionError(f"no {role} child of serve: {out.stdout}")


def _run(tmp: Path, kill: Callable[[LiveServer, Path, int, int], LiveServer] | None) -> str:
    tmp.mkdir()
    data_dir, port, temporal_port = tmp / "data", free_port(), free_port()
    server = start_serve(data_dir, port=port, temporal_port=temporal_port)
    clients = spawn_clients(server, CLIENTS, tmp, "k")
    try:
        http = httpx.Client(base_url=server.api, headers=server.headers(), timeout=30)
        wait_registered(http, CLIENTS, clients)
        assert http.post("/training/start", json=small_run_body("crash", ROUNDS, CLIENTS, seed=7)).status_code == 200
        if kill is not None:
            deadline = time.monotonic() + 120
            while http.get("/training/status").json()["current_round"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            server = kill(server, data_dir, port, temporal_port)
        deadline = time.monotonic() + 300
        while True:
            try:
                status = http.get("/training/status").json()
            except httpx.HTTPError:  # the API is restarting
                time.sleep(0.5)
                continue
            if status["status"] != "running":
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        assert status["status"] == "completed" and status["current_round"] == ROUNDS, status
        return http.get("/model/global").json()["sha256"]
    finally:
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
        stop_serve(server)


def _kill_serve(server: LiveServer, data_dir: Path, port: int, temporal_port: int) -> LiveServer:
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=30)
    time.sleep(2)  # its children follow it (they die with their parent)
    return start_serve(data_dir, port=port, temporal_port=temporal_port)


def _kill_child(role: str) -> Callable[[LiveServer, Path, int, int], LiveServer]:
    def kill(server: LiveServer, *_: object) -> LiveServer:
        os.kill(_child(server, role), signal.SIGKILL)  # serve restarts it
        return server

    return kill


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _run(tmp_path_factory.mktemp("uninterrupted") / "run", None)


@pytest.mark.parametrize(
    "kill",
    [_kill_serve, _kill_child("worker"), _kill_child("api")],
    ids=["whole-serve", "worker-while-waiting-for-uploads", "api"],
)
def test_sigkill_mid_round_loses_nothing(reference: str, tmp_path: Path, kill) -> None:  # type: ignore[no-untyped-def]
    assert _run(tmp_path / "killed", kill) == reference
