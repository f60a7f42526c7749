"""Two experiments at once on one server (FEDLOOM_MAX_RUNNING_EXPERIMENTS=2), each with its own sites kept
apart by a ``client_selection`` rule: both complete, and each final model is byte-identical to the same
experiment (same seed, same sites) run alone afterwards.

The sites are the SDK's built-in client (``fedloom.runtime.run_client``) in threads of this process,
which spares a torch start-up per site and phase.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect as connect_ws

from fedloom import runtime
from tests.conftest import LiveServer, small_run_body, start_serve, stop_serve, wait_registered

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
ROUNDS, SITES, SEED = 3, 2, 11
MODEL = {"architecture": "MLP", "input_shape": [8, 8, 1], "num_classes": 10}


def _only(sites: list[str]) -> dict:
    """A policy under which only ``sites`` are eligible for selection."""
    rule = {
        "id": "own-sites",
        "name": "this experiment's sites",
        "type": "client_selection",
        "effect": "deny",
        "when": {"field": "client_id", "operator": "not_in", "value": sites},
    }
    return {"rules": [rule]}


def _create_and_start(http: httpx.Client, exp_id: str, prefix: str) -> httpx.Response:
    sites = [f"{prefix}{i}" for i in range(1, SITES + 1)]
    created = http.post(
        "/experiments",
        json={
            "name": exp_id,
            "experiment_id": exp_id,
            "dataset_config": {"name": "digits"},
            "model_config": MODEL,
            "policy_config": _only(sites),
        },
    )
    assert created.status_code == 200, created.text
    return http.post("/training/start", json=small_run_body(exp_id, ROUNDS, SITES, seed=SEED))


class Site(threading.Thread):
    """One site running ``run_client`` until it returns; what it returned or raised is kept."""

    def __init__(self, server: LiveServer, client_id: str, partition: str) -> None:
        super().__init__(daemon=True, name=client_id)
        self.server, self.client_id, self.partition = server, client_id, partition
        self.trained: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.trained = runtime.run_client(
                server=self.server.url,
                api_key=self.server.admin_key,
                client_id=self.client_id,
                partition=self.partition,
                seed=SEED,
            )
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def _sites(server: LiveServer, prefix: str) -> list[Site]:
    sites = [Site(server, f"{prefix}{i}", f"{i}/{SITES}") for i in range(1, SITES + 1)]
    for site in sites:
        site.start()
    return sites


def _wait_done(http: httpx.Client, exp_ids: list[str], sites: list[Site]) -> None:
    deadline = time.monotonic() + 240
    for exp_id in exp_ids:
        while (status := http.get("/training/status", params={"experiment_id": exp_id}).json())["status"] == "running":
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        assert status["status"] == "completed" and status["current_round"] == ROUNDS, status
        assert status["round_metrics"]["participating_clients"] == SITES, status
    for site in sites:  # with no experiment running any more, every site returns on its own
        site.join(timeout=60)
        assert not site.is_alive() and site.error is None, (site.client_id, site.error)
        assert site.trained == ROUNDS, (site.client_id, site.trained)


def _final_sha(http: httpx.Client, exp_id: str) -> str:
    meta = http.get("/model/global", params={"experiment_id": exp_id}).json()
    assert meta["experiment_id"] == exp_id and meta["round"] == ROUNDS, meta
    return meta["sha256"]


def _events_of(server: LiveServer, exp_id: str) -> list[dict]:
    url = server.url.replace("http", "ws") + f"/ws/events?api_key={server.admin_key}&since=0&experiment_id={exp_id}"
    seen = []
    with connect_ws(url) as ws:
        try:
            while True:
                seen.append(json.loads(ws.recv(timeout=1.5)))
        except TimeoutError:
            pass
    return seen


def test_two_experiments_at_once_match_their_solo_runs(tmp_path: Path) -> None:
    server = start_serve(tmp_path / "data", {"FEDLOOM_MAX_RUNNING_EXPERIMENTS": "2"})
    try:
        http = httpx.Client(base_url=server.api, headers=server.headers(), timeout=60)
        sites = _sites(server, "a") + _sites(server, "b")
        wait_registered(http, 2 * SITES, [])

        for exp_id, prefix in (("both-a", "a"), ("both-b", "b")):
            started = _create_and_start(http, exp_id, prefix)
            assert started.status_code == 200, started.text
            assert set(started.json()["selected_clients"]) <= {f"{prefix}{i}" for i in range(1, SITES + 1)}
        # Past the limit, 409; naming no experiment while two run is ambiguous: 400 listing both.
        third = _create_and_start(http, "both-c", "a")
        assert third.status_code == 409 and third.json()["error"]["code"] == "TRAINING_ALREADY_RUNNING"
        assert "both-a" in third.json()["error"]["details"] and "both-b" in third.json()["error"]["details"]
        for ambiguous in (
            http.get("/training/status"),
            http.get("/model/global"),
            http.post("/training/stop", json={"reason": "which one?"}),
        ):
            assert ambiguous.status_code == 400, ambiguous.text
            assert "both-a" in ambiguous.json()["error"]["details"], ambiguous.text
        _wait_done(http, ["both-a", "both-b"], sites)
        together = {exp_id: _final_sha(http, exp_id) for exp_id in ("both-a", "both-b")}
        assert together["both-a"] != together["both-b"]
        # Each experiment's event stream holds its own events only.
        events = _events_of(server, "both-a")
        assert any(e["type"] == "training_started" for e in events)
        assert events and all(e.get("experiment_id") == "both-a" for e in events), events[:3]

        # Each again, alone, with the same seed and sites.
        for exp_id, prefix in (("solo-a", "a"), ("solo-b", "b")):
            sites = _sites(server, prefix)
            assert _create_and_start(http, exp_id, prefix).status_code == 200
            assert http.get("/training/status").json()["experiment_id"] == exp_id  # one runs: no id needed
            _wait_done(http, [exp_id], sites)
        assert _final_sha(http, "solo-a") == together["both-a"]
        assert _final_sha(http, "solo-b") == together["both-b"]
    finally:
        stop_serve(server)
