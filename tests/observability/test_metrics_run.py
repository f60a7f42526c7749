"""After a real three-round run under ``fedloom serve``: ``/metrics``, MLflow, TensorBoard and the Web UI agree with it.

One run serves every check: Prometheus' own parser reads ``/metrics`` and its values are compared
with the run's records; MLflow (a file store) holds one run with the rounds' accuracy history and
the final model; TensorBoard's reader finds the same points; the workflow's memo carries the
experiment's given name and ``BestAccuracy`` its best accuracy.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect as connect_ws

from fedloom_core.temporal import BEST_ACCURACY, connect
from tests.conftest import small_run_body, spawn_clients, start_serve, stop_serve, wait_registered

pytestmark = pytest.mark.e2e
CLIENTS, ROUNDS = 2, 3
NAME = "Digits MLP, metrics check"


def parse(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """Family name -> its samples (name, labels, value), read by prometheus-client's parser."""
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)}


def value(families: dict, sample: str, **labels: str) -> float:
    """The sum of the samples named ``sample`` whose labels include ``labels``."""
    family = next(name for name in families if sample.startswith(name))
    hits = [v for n, lab, v in families[family] if n == sample and labels.items() <= lab.items()]
    assert hits, (sample, labels, families[family][:5])
    return sum(hits)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A finished three-round run with both trackers set, and the /metrics text taken during it."""
    root = tmp_path_factory.mktemp("observability")
    tracking = {
        "FEDLOOM_MLFLOW_TRACKING_URI": f"file://{root / 'mlruns'}",
        # MLflow 3 keeps its file store only on request; it is the tracker the test can read back offline.
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "FEDLOOM_TENSORBOARD_DIR": str(root / "tb"),
        "FEDLOOM_TRACKING_POLL_S": "0.5",
    }
    server = start_serve(root / "data", tracking)
    procs: list[subprocess.Popen] = []
    try:
        procs = spawn_clients(server, CLIENTS, root)
        http = httpx.Client(base_url=server.api, headers=server.headers(), timeout=60)
        wait_registered(http, CLIENTS, procs)
        created = http.post(
            "/experiments",
            json={
                "name": NAME,
                "dataset_config": {"name": "digits", "clients_count": CLIENTS},
                "model_config": {"architecture": "MLP"},
                "training_config": {"rounds": ROUNDS},
                "policy_config": {"min_clients": CLIENTS},
            },
        )
        assert created.status_code == 200, created.text
        exp_id = created.json()["experiment_id"]
        started = http.post("/training/start", json=small_run_body(exp_id, ROUNDS, CLIENTS))
        assert started.status_code == 200, started.text
        ws_url = server.url.replace("http", "ws") + f"/ws/events?api_key={server.admin_key}"
        metrics = httpx.Client(base_url=server.url, headers=server.headers(), timeout=30)
        with connect_ws(ws_url):
            during = parse(metrics.get("/metrics").text)
        deadline = time.monotonic() + 300
        while (status := http.get("/training/status").json())["status"] == "running":
            assert time.monotonic() < deadline, f"experiment did not finish: {status}"
            time.sleep(0.5)
        assert status["status"] == "completed", status
        after = parse(metrics.get("/metrics").text)
        rounds = http.get("/metrics/training", params={"experiment_id": exp_id}).json()["rounds"]
        yield {
            "server": server,
            "exp_id": exp_id,
            "during": during,
            "after": after,
            "rounds": rounds,
            "root": root,
            "http": http,
            "metrics": metrics,
        }
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        stop_serve(server)


def test_metrics_needs_the_admin_key(run) -> None:  # type: ignore[no-untyped-def]
    anonymous = httpx.get(f"{run['server'].url}/metrics", timeout=30)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"]


def test_metrics_hold_the_runs_values(run) -> None:  # type: ignore[no-untyped-def]
    after, exp_id, rounds = run["after"], run["exp_id"], run["rounds"]
    assert len(rounds) == ROUNDS
    assert value(after, "fedloom_rounds_completed_total", experiment_id=exp_id) == ROUNDS
    assert value(after, "fedloom_current_round", experiment_id=exp_id, status="completed") == ROUNDS
    assert value(after, "fedloom_round_duration_seconds_count") == ROUNDS
    assert value(after, "fedloom_round_duration_seconds_sum") == pytest.approx(sum(r["round_duration"] for r in rounds))
    uploads = sum(r["participating_clients"] for r in rounds)
    assert value(after, "fedloom_updates_received_total", result="accepted") == uploads == ROUNDS * CLIENTS
    assert value(after, "fedloom_updates_received_total", result="rejected") == 0
    assert value(after, "fedloom_update_rejections_total") == 0
    assert value(after, "fedloom_upload_bytes_total") > 0
    # Every upload went through one route template, whatever client id its URL held.
    upload_route = "/api/v1/model/update/{client_id}"
    assert value(after, "fedloom_http_request_duration_seconds_count", route=upload_route, status="200") == uploads
    assert not [lab for _n, lab, _v in after["fedloom_http_request_duration_seconds"] if "c1" in lab["route"]]
    # The workers' timings, through the shared multiprocess directory.
    assert value(after, "fedloom_aggregation_seconds_count") == ROUNDS
    assert value(after, "fedloom_evaluation_seconds_count") == ROUNDS
    process_round = {"activity": "process_round", "outcome": "completed"}
    assert value(after, "fedloom_activity_duration_seconds_count", **process_round) == ROUNDS
    # The Temporal SDK's own worker metrics.
    sdk = [name for name in after if name.startswith("temporal_")]
    assert "temporal_activity_execution_latency" in sdk or "temporal_workflow_completed" in sdk, sdk


def test_the_dashboards_queries_name_exported_series(run) -> None:  # type: ignore[no-untyped-def]
    from tests.observability.test_observability_deploy import dashboard_metrics

    samples = {name for family in run["after"].values() for name, _labels, _v in family}
    missing = dashboard_metrics() - samples
    assert not missing, missing


def test_websocket_listeners_are_counted(run) -> None:  # type: ignore[no-untyped-def]
    during, after = run["during"], run["after"]
    assert value(during, "fedloom_websocket_listeners") - value(after, "fedloom_websocket_listeners") == 1


def _wait_exported(tracking: Path, exp_id: str) -> None:
    """Wait until both sinks' exporters have finished the experiment (its state files say so)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            states = [json.loads((tracking / f"{sink}.json").read_text()) for sink in ("mlflow", "tensorboard")]
            if all(state.get(exp_id, {}).get("done") for state in states):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    pytest.fail(f"the exporters did not finish {exp_id}: {sorted(p.name for p in tracking.iterdir())}")


def test_mlflow_holds_one_run_with_the_rounds(run, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    exp_id = run["exp_id"]
    _wait_exported(run["server"].data_dir / "tracking", exp_id)
    client = MlflowClient(tracking_uri=f"file://{run['root'] / 'mlruns'}")
    fedloom = client.get_experiment_by_name("fedloom").experiment_id
    found = client.search_runs([fedloom], filter_string=f"tags.`fedloom.experiment_id` = '{exp_id}'")
    assert len(found) == 1
    mlrun = found[0]
    assert mlrun.info.run_name == NAME and mlrun.info.status == "FINISHED"
    assert mlrun.data.params["experiment_config.rounds"] == str(ROUNDS)
    history = sorted(client.get_metric_history(mlrun.info.run_id, "accuracy"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(r["round"], r["global_accuracy"]) for r in run["rounds"]]
    durations = client.get_metric_history(mlrun.info.run_id, "round_duration")
    assert sorted(m.value for m in durations) == sorted(r["round_duration"] for r in run["rounds"])
    assert len(client.get_metric_history(mlrun.info.run_id, "client/c1/accuracy")) == ROUNDS
    assert [a.path for a in client.list_artifacts(mlrun.info.run_id, "model")] == [
        f"model/model_{exp_id}_round_{ROUNDS}.safetensors"
    ]


def test_tensorboard_has_the_same_points(run) -> None:  # type: ignore[no-untyped-def]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp_id = run["exp_id"]
    _wait_exported(run["server"].data_dir / "tracking", exp_id)
    acc = EventAccumulator(str(run["root"] / "tb" / exp_id))
    acc.Reload()
    points = [(e.step, e.value) for e in acc.Scalars("accuracy")]
    expected = [(r["round"], r["global_accuracy"]) for r in run["rounds"]]
    assert [s for s, _ in points] == [s for s, _ in expected]
    assert [v for _, v in points] == pytest.approx([v for _, v in expected], rel=1e-6)  # stored as float32
    assert len(acc.Scalars("client/c2/trust_score")) == ROUNDS


def test_web_ui_memo_and_best_accuracy(run) -> None:  # type: ignore[no-untyped-def]
    best = max(r["global_accuracy"] for r in run["rounds"])

    async def check() -> None:
        client = await connect(run["server"].temporal_address)
        desc = await client.get_workflow_handle(f"experiment-{run['exp_id']}").describe()
        assert (await desc.memo())["name"] == NAME
        assert desc.typed_search_attributes.get(BEST_ACCURACY) == pytest.approx(best)
        for _ in range(50):  # visibility is updated asynchronously
            found = [wf.id async for wf in client.list_workflows(f"BestAccuracy >= {best - 1e-9}")]
            if found:
                break
            await asyncio.sleep(0.2)
        assert found == [f"experiment-{run['exp_id']}"]

    asyncio.run(check())
