"""An experiment recorded as running whose workflow never started (the API died between the two steps)
does not block the server: the next start or stop fails it with the reason and goes on."""

from __future__ import annotations

import httpx
import pytest
from sqlmodel import select

from fedloom_core.storage.db import Experiment, make_engine, utcnow
from fedloom_core.storage.repo import session_scope
from tests.conftest import LiveServer, start_serve, stop_serve

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    live = start_serve(tmp_path_factory.mktemp("repair") / "data")
    yield live
    stop_serve(live)


def _orphan(server: LiveServer, exp_id: str) -> None:
    """The state a crash between the experiment row and the workflow start leaves behind."""
    engine = make_engine(f"sqlite:///{server.data_dir / 'fedloom.db'}")
    with session_scope(engine) as s:
        s.add(Experiment(experiment_id=exp_id, name=exp_id, status="running", started_at=utcnow(), total_rounds=3))
    engine.dispose()


def test_start_and_stop_work_after_a_start_that_died_halfway(server: LiveServer) -> None:
    http = httpx.Client(base_url=server.api, headers=server.headers(), timeout=30)
    assert http.post("/clients/register", json={"client_id": "r1"}).status_code == 200
    _orphan(server, "orphan-1")
    body = {"experiment_config": {"experiment_id": "fresh", "rounds": 1, "min_clients": 1, "model_architecture": "MLP"}}
    resp = http.post("/training/start", json=body)
    assert resp.status_code == 200, resp.text
    orphan = http.get("/experiments/orphan-1").json()
    assert orphan["status"] == "failed", orphan
    stop = http.post("/training/stop", json={"experiment_id": "fresh", "reason": "test"})
    assert stop.status_code == 200, stop.text

    _orphan(server, "orphan-2")
    stop = http.post("/training/stop", json={"experiment_id": "orphan-2", "reason": "test"})
    assert stop.status_code == 409 and stop.json()["error"]["code"] == "EXPERIMENT_NOT_ACTIVE", stop.text
    engine = make_engine(f"sqlite:///{server.data_dir / 'fedloom.db'}")
    with session_scope(engine) as s:
        row = s.exec(select(Experiment).where(Experiment.experiment_id == "orphan-2")).one()
        assert (row.status, row.error_code) == ("failed", "WORKFLOW_NOT_STARTED")
    engine.dispose()
