"""The tracking exporter against a real MLflow file store and real TensorBoard event files, read back.

No server: the rounds are written to a SQLite database the way complete_round records them, and the
exporter is driven pass by pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedloom_core.storage.blobstore import open_blob_store
from fedloom_core.storage.db import (
    ClientMetrics,
    ClientRoundScore,
    Experiment,
    GlobalModel,
    RoundMetrics,
    create_schema,
    make_engine,
    utcnow,
)
from fedloom_core.storage.repo import session_scope
from fedloom_core.tracking.exporter import Exporter
from fedloom_core.tracking.sinks import MlflowSink, TensorBoardSink, flatten
from fedloom_tools.launch import free_port

pytestmark = pytest.mark.unit
EXP = "exp_track"
ACCURACY = {1: 0.41, 2: 0.67, 3: 0.83}


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    create_schema(engine)
    blobs = open_blob_store(f"file://{tmp_path / 'blobs'}")
    with session_scope(engine) as s:
        s.add(
            Experiment(
                experiment_id=EXP,
                name="tracked run",
                status="running",
                started_at=utcnow(),
                total_rounds=3,
                config={"experiment_config": {"rounds": 3, "dataset": "digits"}, "training_config": {"lr": 0.05}},
            )
        )
    return engine, blobs, tmp_path


def record_round(engine, blobs, tmp_path: Path, rnd: int, final: bool = False) -> None:  # type: ignore[no-untyped-def]
    """What complete_round leaves behind: the round's metrics, two clients' metrics and scores, the model."""
    model = tmp_path / f"m{rnd}.bin"
    model.write_bytes(bytes([rnd]) * 64)
    key = f"models/{EXP}/round-{rnd}.safetensors"
    info = blobs.put_file(key, model)
    with session_scope(engine) as s:
        s.add(
            RoundMetrics(
                experiment_id=EXP,
                round=rnd,
                global_accuracy=ACCURACY[rnd],
                global_loss=1.0 - ACCURACY[rnd],
                federated_metrics={"accuracy": ACCURACY[rnd] - 0.01, "loss": 0.5, "data_samples": 400},
                participating_clients=2,
                round_duration=1.5 * rnd,
                aggregation_time=0.1,
            )
        )
        for i, cid in enumerate(("c1", "c2")):
            s.add(
                ClientMetrics(
                    experiment_id=EXP, round=rnd, client_id=cid, local_accuracy=0.5 + i / 10, data_samples=200
                )
            )
            s.add(ClientRoundScore(experiment_id=EXP, round=rnd, client_id=cid, trust_score=1.0 - rnd / 10))
        model_id = f"model_{EXP}_round_{rnd}"
        s.add(
            GlobalModel(
                model_id=model_id, experiment_id=EXP, round=rnd, blob_key=key, sha256=info.sha256, size_bytes=64
            )
        )
        exp = s.get(Experiment, EXP)
        exp.current_round = rnd
        if final:
            exp.status, exp.final_model_id, exp.finished_at = "completed", model_id, utcnow()
        s.add(exp)


def _mlflow_run(uri: str):  # type: ignore[no-untyped-def]
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("fedloom")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`fedloom.experiment_id` = '{EXP}'")
    assert len(runs) == 1
    return client, runs[0]


def test_rounds_reach_mlflow_and_tensorboard_once_each(world) -> None:  # type: ignore[no-untyped-def]
    engine, blobs, tmp = world
    uri = f"file://{tmp / 'mlruns'}"
    mlflow = Exporter(engine, blobs, MlflowSink(uri), tmp / "state")
    board = Exporter(engine, blobs, TensorBoardSink(tmp / "tb"), tmp / "state")
    assert mlflow.export_once() and board.export_once()  # nothing recorded yet: no run is made
    assert MlflowClient(tracking_uri=uri).get_experiment_by_name("fedloom") is None

    record_round(engine, blobs, tmp, 1)
    assert mlflow.export_once() and board.export_once()
    client, run = _mlflow_run(uri)
    assert run.info.run_name == "tracked run" and run.info.status == "RUNNING"
    assert run.data.params["experiment_config.rounds"] == "3" and run.data.params["training_config.lr"] == "0.05"

    # A restarted exporter (new objects, same state dir) goes on from round 2 and finishes the run.
    record_round(engine, blobs, tmp, 2)
    record_round(engine, blobs, tmp, 3, final=True)
    mlflow = Exporter(engine, blobs, MlflowSink(uri), tmp / "state")
    board = Exporter(engine, blobs, TensorBoardSink(tmp / "tb"), tmp / "state")
    for _ in range(2):  # a second pass adds nothing
        assert mlflow.export_once() and board.export_once()

    client, run = _mlflow_run(uri)
    assert run.info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "accuracy"))
    assert history == sorted(ACCURACY.items())
    fed = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "federated_accuracy"))
    assert fed == [(r, pytest.approx(a - 0.01)) for r, a in sorted(ACCURACY.items())]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "round_duration")] == [1.5, 3.0, 4.5]
    assert len(client.get_metric_history(run.info.run_id, "client/c2/accuracy")) == 3
    assert len(client.get_metric_history(run.info.run_id, "client/c1/trust_score")) == 3
    (artifact,) = client.list_artifacts(run.info.run_id, "model")
    assert artifact.path == f"model/model_{EXP}_round_3.safetensors" and artifact.file_size == 64

    acc = EventAccumulator(str(tmp / "tb" / EXP))
    acc.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("accuracy")] == sorted(ACCURACY.items())
    assert [e.step for e in acc.Scalars("client/c1/accuracy")] == [1, 2, 3]
    assert [e.step for e in acc.Scalars("federated_loss")] == [1, 2, 3]


def test_a_continued_experiment_goes_on_in_the_same_run(world) -> None:  # type: ignore[no-untyped-def]
    engine, blobs, tmp = world
    uri = f"file://{tmp / 'mlruns'}"
    mlflow = Exporter(engine, blobs, MlflowSink(uri), tmp / "state")
    board = Exporter(engine, blobs, TensorBoardSink(tmp / "tb"), tmp / "state")
    for rnd in (1, 2):
        record_round(engine, blobs, tmp, rnd, final=rnd == 2)
    assert mlflow.export_once() and board.export_once()
    assert _mlflow_run(uri)[1].info.status == "FINISHED"
    with session_scope(engine) as s:  # POST /experiments/{id}/continue sets it running again
        exp = s.get(Experiment, EXP)
        exp.status = "running"
        s.add(exp)
    record_round(engine, blobs, tmp, 3)
    assert mlflow.export_once() and board.export_once()
    client, run = _mlflow_run(uri)
    assert run.info.status == "RUNNING"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "accuracy")) == [1, 2, 3]
    with session_scope(engine) as s:
        exp = s.get(Experiment, EXP)
        exp.status, exp.final_model_id = "completed", f"model_{EXP}_round_3"
        s.add(exp)
    assert mlflow.export_once() and board.export_once()
    client, run = _mlflow_run(uri)
    assert run.info.status == "FINISHED"
    paths = sorted(a.path for a in client.list_artifacts(run.info.run_id, "model"))
    assert paths == [f"model/model_{EXP}_round_2.safetensors", f"model/model_{EXP}_round_3.safetensors"]
    acc = EventAccumulator(str(tmp / "tb" / EXP))
    acc.Reload()
    assert [e.step for e in acc.Scalars("accuracy")] == [1, 2, 3]


def test_an_unreachable_tracker_fails_the_pass_only_and_is_caught_up_later(world, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    engine, blobs, tmp = world
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    record_round(engine, blobs, tmp, 1)
    down = Exporter(engine, blobs, MlflowSink(f"http://127.0.0.1:{free_port()}"), tmp / "state")
    assert down.export_once() is False
    assert down.state.get(EXP) == {"round": 0, "done": False, "run_id": None}
    record_round(engine, blobs, tmp, 2)
    # The tracker is back (here: a reachable store under the same state): every round arrives, once.
    uri = f"file://{tmp / 'mlruns'}"
    up = Exporter(engine, blobs, MlflowSink(uri), tmp / "state")
    assert up.export_once() and up.export_once()
    client, run = _mlflow_run(uri)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "accuracy")) == [1, 2]


def test_params_are_flattened_and_cut() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": "x" * 900}}, "e": None}) == {"a.b": "1", "a.c.d": "x" * 500, "e": "None"}
