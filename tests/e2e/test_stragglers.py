"""Stragglers on a live server: a client frozen mid-experiment (SIGSTOP) does not hold a round past
its deadline, and once it runs again (SIGCONT) it rejoins a later round."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import small_run_body, spawn_clients, start_serve, stop_serve, wait_registered

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
ROUNDS, DEADLINE_S = 5, 8


def test_frozen_client_misses_a_deadline_then_rejoins(tmp_path: Path) -> None:
    server = start_serve(tmp_path / "data")
    procs = spawn_clients(server, 3, tmp_path, "s")
    frozen = procs[2]  # client s3
    try:
        http = httpx.Client(base_url=server.api, headers=server.headers(), timeout=60)
        wait_registered(http, 3, procs)
        os.kill(frozen.pid, signal.SIGSTOP)
        body = small_run_body("straggle", ROUNDS, 2)
        body["experiment_config"]["round_timeout_s"] = DEADLINE_S
        # Each round selects all three. A client that missed a deadline is inactive until it polls
        # again, so round 2's selection waits for s3 to come back instead of racing it with quick rounds
        # of two; a round still closes with the two updates it got (min_updates 2).
        body["experiment_config"]["min_clients"] = 3
        started = http.post("/training/start", json=body)
        assert started.status_code == 200, started.text
        assert sorted(started.json()["selected_clients"]) == ["s1", "s2", "s3"]

        deadline = time.monotonic() + 120
        while http.get("/training/status").json()["progress"] == 0:  # round 1 completed without s3
            assert time.monotonic() < deadline, "round 1 never closed: the frozen client blocked it"
            time.sleep(0.2)
        os.kill(frozen.pid, signal.SIGCONT)

        deadline = time.monotonic() + 240
        while (status := http.get("/training/status").json())["status"] == "running":
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        assert status["status"] == "completed", status
        rounds = http.get("/metrics/training").json()["rounds"]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
        stop_serve(server)

    participants = {r["round"]: sorted(r["client_metrics"]) for r in rounds}
    assert participants[1] == ["s1", "s2"], participants
    # Round 1 ended at its deadline, not later: the deadline plus the round's own work.
    assert DEADLINE_S <= rounds[0]["round_duration"] < DEADLINE_S + 20, rounds[0]
    rejoined = [r for r in range(2, ROUNDS + 1) if "s3" in participants[r]]
    assert rejoined, f"s3 never rejoined: {participants}"
    assert all("s3" in participants[r] for r in range(rejoined[0], ROUNDS + 1)), participants
