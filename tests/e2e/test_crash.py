"""Processes killed by SIGKILL mid-round lose nothing: each experiment finishes with a final model identical,
byte for byte, to an uninterrupted run with the same seed and data."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from temporalio.api.enums.v1 import PendingActivityState

from api.routes.training import STATUS_TTL_S
from fedloom_core.temporal import connect
from fedloom_tools import launch
from tests.conftest import (
    LiveServer,
    free_port,
    small_run_body,
    spawn_clients,
    start_serve,
    stop_serve,
    wait_registered,
)
from tests.e2e import faults
from tests.pg_cluster import PrivateCluster

# One xdist worker runs them all, so the uninterrupted reference run is computed once.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900), pytest.mark.xdist_group("crash")]
CLIENTS, ROUNDS = 3, 3
# The activity that aggregates a round (with its validation and evaluation).
HEAVY_ACTIVITY = "process_round"


def _run(
    tmp: Path,
    kill: Callable[[LiveServer, Path, int, int], LiveServer] | None,
    env: dict[str, str] | None = None,
    command: list[str] | None = None,
) -> str:
    """One experiment to the end, ``kill`` applied once round 2 is under way; its final model's sha256.

    ``command`` replaces ``fedloom serve`` (the fault module's supervisor, with its pauses)."""
    tmp.mkdir()
    data_dir, port, temporal_port = tmp / "data", free_port(), free_port()
    if command is None:
        server = start_serve(data_dir, env, port=port, temporal_port=temporal_port)
    else:
        server = launch.start_serve(data_dir, env, port=port, temporal_port=temporal_port, command=command)
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
        if kill is _kill_worker_during_aggregation:
            assert asyncio.run(_aggregation_attempts(server, 2)) >= 2, "the kill missed round 2's aggregation"
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
        os.kill(server.child_pid(role), signal.SIGKILL)  # serve restarts it
        return server

    return kill


async def _aggregating(server: LiveServer, round: int) -> bool:
    """Whether round ``round``'s process_round activity (validate, aggregate, evaluate) is running now."""
    client = await connect(server.temporal_address)
    handle = client.get_workflow_handle("experiment-crash")
    if (await handle.query("status"))["current_round"] != round:
        return False
    desc = await handle.describe()
    return any(
        p.activity_type.name == HEAVY_ACTIVITY and p.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
        for p in desc.raw_description.pending_activities
    )


async def _aggregation_attempts(server: LiveServer, round: int) -> int:
    """How many attempts round ``round``'s process_round took, read from the workflow history."""
    client = await connect(server.temporal_address)
    history = await client.get_workflow_handle("experiment-crash").fetch_history()
    scheduled = [
        e.event_id
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
        and e.activity_task_scheduled_event_attributes.activity_type.name == HEAVY_ACTIVITY
    ]
    attempts = {
        e.activity_task_started_event_attributes.scheduled_event_id: e.activity_task_started_event_attributes.attempt
        for e in history.events
        if e.HasField("activity_task_started_event_attributes")
    }
    return attempts[scheduled[round - 1]]


def _kill_worker_during_aggregation(server: LiveServer, *_: object) -> LiveServer:
    """SIGKILL the worker while round 2's process_round activity is in flight (held before it runs)."""
    deadline = time.monotonic() + 120
    while not asyncio.run(_aggregating(server, 2)):
        assert time.monotonic() < deadline, "round 2's aggregation never started"
        time.sleep(0.1)
    os.kill(server.child_pid("worker"), signal.SIGKILL)  # serve restarts it; the attempt times out and is retried
    return server


def _kill_api_mid_upload(server: LiveServer, *_: object) -> LiveServer:
    """SIGKILL the API while round 2's first upload is held after its first bytes arrived."""
    log = server.data_dir / "logs" / "api.log"
    deadline = time.monotonic() + 120
    while "fault injection: pausing an upload" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, "no upload reached the fault-injection pause"
        time.sleep(0.1)
    os.kill(server.child_pid("api"), signal.SIGKILL)  # serve restarts it; the client retries its upload
    return server


# Routes that read the database; while PostgreSQL is down each must answer 503 in the spec's format.
DATABASE_ROUTES = ["/training/status", "/clients", "/metrics/training", "/experiments", "/model/global"]


def _restart_postgres(cluster: PrivateCluster) -> Callable[[LiveServer, Path, int, int], LiveServer]:
    def restart(server: LiveServer, *_: object) -> LiveServer:
        cluster.stop()
        # /training/status may answer from a read shared for STATUS_TTL_S; let it age out first.
        time.sleep(4 * STATUS_TTL_S)
        http = httpx.Client(base_url=server.api, headers=server.headers(), timeout=30)
        for route in DATABASE_ROUTES:
            answer = http.get(route)
            assert answer.status_code == 503, (route, answer.status_code, answer.text)
            assert answer.json()["error"]["code"] == "SERVICE_UNAVAILABLE", (route, answer.text)
        health = http.get("/health")
        assert health.status_code == 503 and "database" in health.text, health.text
        time.sleep(5)  # activities and client requests fail meanwhile, and are retried
        cluster.start()
        return server

    return restart


# Session scope: the crash tests share one xdist worker, but other modules' tests may run between
# them there, which would tear a module-scoped fixture down and make it run again.
@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _run(tmp_path_factory.mktemp("uninterrupted") / "run", None)


SEPARATE_WORKER = [sys.executable, "-m", "fedloom.cli", "serve", "--separate-worker"]


@pytest.mark.parametrize(
    ("kill", "command"),
    [(_kill_serve, None), (_kill_child("worker"), SEPARATE_WORKER)],
    ids=["whole-serve", "worker-while-waiting-for-uploads"],
)
def test_sigkill_mid_round_loses_nothing(reference: str, tmp_path: Path, kill, command) -> None:  # type: ignore[no-untyped-def]
    assert _run(tmp_path / "killed", kill, command=command) == reference


def _kill_one_process(server: LiveServer, *_: object) -> LiveServer:
    """SIGKILL the default ``fedloom serve``'s single Python child, the API with the workers inside."""
    assert set(server.children()) == {"api", "temporal"}, server.children()
    # fedloom serve has become the stdlib-only supervisor, which restarts the child.
    assert "supervisor.py" in Path(f"/proc/{server.proc.pid}/cmdline").read_text()
    os.kill(server.child_pid("api"), signal.SIGKILL)
    return server


def test_one_process_serve_killed_mid_round_loses_nothing(reference: str, tmp_path: Path) -> None:
    """The default ``fedloom serve`` (one Python process) runs the same experiment to the same bytes,
    through a SIGKILL of that process."""
    assert _run(tmp_path / "killed", _kill_one_process) == reference


@pytest.mark.postgres
def test_postgres_restarted_mid_round_loses_nothing(reference: str, tmp_path: Path) -> None:
    """In the PostgreSQL configuration the database goes away mid-round: requests get 503
    SERVICE_UNAVAILABLE, then the run carries on and ends with the same final model."""
    cluster = PrivateCluster(free_port())
    try:
        cluster.start()
        env = {"FEDLOOM_DATABASE_URL": cluster.url}
        assert _run(tmp_path / "pg", _restart_postgres(cluster), env) == reference
    finally:
        cluster.destroy()


def test_api_sigkilled_mid_upload_loses_nothing(reference: str, tmp_path: Path) -> None:
    """The half-received upload is not counted; the client's retry is, once: same final model."""
    command = faults.serve_command(pause_upload=(2, 30))
    assert _run(tmp_path / "killed", _kill_api_mid_upload, command=command) == reference


def test_worker_sigkilled_during_aggregation_loses_nothing(reference: str, tmp_path: Path) -> None:
    """The kill lands while round 2's process_round activity is in flight: the retry starts over and
    writes the same bytes (the history shows a second attempt of that activity)."""
    command = faults.serve_command(pause_process_round=(2, 10))
    assert _run(tmp_path / "killed", _kill_worker_during_aggregation, command=command) == reference


# The tightest retention: only the latest model (with the initial one), no updates, orphans collected at once.
AGGRESSIVE_RETENTION = {
    "FEDLOOM_KEEP_LAST_MODELS": "1",
    "FEDLOOM_KEEP_MODEL_EVERY": "0",
    "FEDLOOM_KEEP_UPDATES": "false",
    "FEDLOOM_ORPHAN_GRACE_S": "0",
    "FEDLOOM_RETENTION_SWEEP_S": "0.2",
}


def test_worker_sigkilled_during_aggregation_with_retention_loses_nothing(reference: str, tmp_path: Path) -> None:
    """With the sweeper deleting all it may, several times a second, the kill during round 2's
    process_round still ends on the uninterrupted run's bytes: the retry reads round 2's updates and round
    1's model, which stay until round 2 is committed. Meanwhile the committed rounds' blobs did go."""
    command = faults.serve_command(pause_process_round=(2, 10))
    run = tmp_path / "retention"
    assert _run(run, _kill_worker_during_aggregation, env=AGGRESSIVE_RETENTION, command=command) == reference
    blobs = run / "data" / "blobs"
    models = {p.name for p in (blobs / "models" / "crash").glob("round-*.safetensors")}
    assert {"round-0.safetensors", f"round-{ROUNDS}.safetensors"} <= models, models
    assert "round-1.safetensors" not in models, models  # deleted once round 2's model was committed
    for rnd in (1, 2):
        assert list((blobs / "updates" / "crash" / str(rnd)).glob("*.safetensors")) == [], rnd
