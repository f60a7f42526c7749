"""Federated evaluation in a real ExperimentWorkflow: evaluate tasks, reports, the weighted average per round."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

from sqlmodel import select
from temporalio.testing import WorkflowEnvironment

from api.taskboard import read_task
from fedloom_core.learning.weights import save_state
from fedloom_core.learning.zoo import build_model
from fedloom_core.messages import EvaluationNotice, ExperimentInput, UpdateNotice
from fedloom_core.schemas import StartRequest
from fedloom_core.settings import Settings
from fedloom_core.storage import evaluations, uploads
from fedloom_core.storage.blobstore import LocalBlobStore
from fedloom_core.storage.db import (
    Client,
    ClientRoundScore,
    Event,
    Experiment,
    Round,
    RoundMetrics,
    create_schema,
    make_engine,
)
from fedloom_core.storage.keys import model_id_for
from fedloom_core.storage.repo import session_scope
from workers.main import build_workers
from workflows.experiment import BOUNDED_ROUND_PATCH, ExperimentWorkflow, workflow_id

HISTORIES = Path(__file__).parent / "histories"
CLIENTS = ["fe-a", "fe-b", "fe-c"]


class Run:
    """One experiment on the real workflow and activities, with clients played by the test."""

    def __init__(self, env: WorkflowEnvironment, tmp: Path, evaluation: dict, rounds: int) -> None:
        self.env, self.tmp = env, tmp
        settings = Settings(data_dir=tmp)
        self.engine = make_engine(settings.database_url)
        create_schema(self.engine)
        self.blobs = LocalBlobStore(tmp / "blobs")
        suffix = uuid.uuid4().hex[:8]
        self.exp_id, self.queue = f"fe-{suffix}", f"exp-{suffix}"
        self.workers = build_workers(env.client, settings, workflow_queue=self.queue, aggregation_queue=f"agg-{suffix}")
        req = StartRequest.model_validate(
            {
                "experiment_config": {
                    "experiment_id": self.exp_id,
                    "rounds": rounds,
                    "min_clients": len(CLIENTS),
                    "dataset": "digits",
                    "model_architecture": "MLP",
                },
                "aggregation_config": {"min_updates": 1},
                "evaluation_config": evaluation,
            }
        )
        with session_scope(self.engine) as s:
            for cid in CLIENTS:
                s.add(Client(client_id=cid, registration_id=f"reg-{cid}"))
            s.add(
                Experiment(
                    experiment_id=self.exp_id, status="running", total_rounds=rounds, config=req.model_dump(mode="json")
                )
            )
        self.input = ExperimentInput(
            experiment_id=self.exp_id,
            config=req,
            input_shape=[8, 8, 1],
            num_classes=10,
            round_timeout_s=600,
            selection_timeout_s=30,
            aggregation_queue=f"agg-{suffix}",
        )

    async def wait_round(self, rnd: int, **where: object) -> Round:
        for _ in range(600):
            with session_scope(self.engine) as s:
                row = s.exec(select(Round).where(Round.experiment_id == self.exp_id, Round.round == rnd)).first()
            if row is not None and all(getattr(row, k) == v for k, v in where.items()):
                return row
            await asyncio.sleep(0.05)
        raise AssertionError(f"round {rnd} never had {where}")

    async def train_round(self, handle, rnd: int) -> None:  # type: ignore[no-untyped-def]
        await self.wait_round(rnd, status="open")
        model = build_model("MLP", (8, 8, 1), 10, seed=1)
        for i, cid in enumerate(CLIENTS):
            path = self.tmp / f"{cid}-{rnd}.safetensors"
            save_state({k: v * (1.0 + 0.1 * i) for k, v in model.state_dict().items()}, path)
            uploads.store_update(
                self.engine, self.blobs, client_id=cid, upload_path=path, metrics={"data_samples": 100 * (i + 1)}
            )
        await handle.signal(
            ExperimentWorkflow.update_received,
            UpdateNotice(update_id="t", client_id=CLIENTS[-1], round=rnd, reported=CLIENTS),
        )

    async def report(self, handle, rnd: int, client_id: str, metrics: dict) -> None:  # type: ignore[no-untyped-def]
        """What POST /model/evaluation does: record the report, signal once the phase is complete."""
        stored = evaluations.record_report(
            self.engine, client_id=client_id, experiment_id=self.exp_id, round=rnd, metrics=metrics
        )
        if stored.completed is not None:
            await handle.signal(
                ExperimentWorkflow.evaluation_received,
                EvaluationNotice(client_id=client_id, round=rnd, reported=stored.completed),
            )

    def metrics(self) -> dict[int, RoundMetrics]:
        with session_scope(self.engine) as s:
            rows = s.exec(select(RoundMetrics).where(RoundMetrics.experiment_id == self.exp_id)).all()
        return {m.round: m for m in rows}


def reports_for(rnd: int) -> dict[str, dict]:
    return {
        "fe-a": {"data_samples": 100, "loss": 1.0 / rnd, "accuracy": 0.5, "f1": 0.4},
        "fe-b": {"data_samples": 300, "loss": 2.0 / rnd, "accuracy": 0.9},
        # Cannot evaluate: left out of the average.
        "fe-c": {"data_samples": 0},
    }


async def test_every_round_including_the_last_is_evaluated_by_its_participants(
    time_skipping_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    run = Run(time_skipping_env, tmp_path, {"federated": True, "timeout_s": 600}, rounds=2)
    with time_skipping_env.auto_time_skipping_disabled():
        async with run.workers[0], run.workers[1]:
            handle = await time_skipping_env.client.start_workflow(
                ExperimentWorkflow.run, run.input, id=workflow_id(run.exp_id), task_queue=run.queue
            )
            for rnd in (1, 2):
                await run.train_round(handle, rnd)
                phase = await run.wait_round(rnd, evaluation_status="open")
                assert phase.evaluators == CLIENTS
                task, _ = read_task(run.engine, "fe-a")
                assert task["status"] == "evaluate" and task["round"] == rnd
                assert task["model_id"] == model_id_for(run.exp_id, rnd)
                assert task["deadline"] and task["model_architecture"] == "MLP"
                for cid, metrics in reports_for(rnd).items():
                    await run.report(handle, rnd, cid, metrics)
                    if cid == "fe-a":
                        assert read_task(run.engine, "fe-a")[0]["status"] == "wait"
            result = await handle.result()
            history = await handle.fetch_history()
    assert result.status == "completed"
    metrics = run.metrics()
    assert sorted(metrics) == [1, 2]
    for rnd, m in metrics.items():
        fed = m.federated_metrics
        assert fed is not None
        assert fed["data_samples"] == 400
        assert abs(fed["accuracy"] - (0.5 * 100 + 0.9 * 300) / 400) < 1e-9
        assert abs(fed["loss"] - (100 * 1.0 / rnd + 300 * 2.0 / rnd) / 400) < 1e-9
        # A metric only one report carries is averaged over that report.
        assert abs(fed["f1"] - 0.4) < 1e-9
        assert m.global_accuracy is not None  # central evaluation stays on for the built-in dataset
    with session_scope(run.engine) as s:
        completed = s.exec(
            select(Event).where(Event.experiment_id == run.exp_id, Event.type == "round_completed")
        ).all()
        closed = s.exec(select(Round.evaluation_status).where(Round.experiment_id == run.exp_id)).all()
    assert [e.payload["federated_metrics"]["data_samples"] for e in completed] == [400, 400]
    assert closed == ["closed", "closed"]
    if os.environ.get("FEDLOOM_RECORD_HISTORIES"):
        # One file per workflow version, named after the newest patch: older files stay and keep replaying.
        (HISTORIES / f"federated-evaluation-{BOUNDED_ROUND_PATCH}.json").write_text(history.to_json())


async def test_a_fraction_evaluates_and_the_phase_ends_at_its_timeout(
    time_skipping_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    # Central evaluation off: no global accuracy, contribution from each update's part in the round's step.
    evaluation = {"federated": True, "central": False, "fraction": 0.5, "timeout_s": 1.0}
    run = Run(time_skipping_env, tmp_path, evaluation, rounds=1)
    with time_skipping_env.auto_time_skipping_disabled():
        async with run.workers[0], run.workers[1]:
            handle = await time_skipping_env.client.start_workflow(
                ExperimentWorkflow.run, run.input, id=workflow_id(run.exp_id), task_queue=run.queue
            )
            await run.train_round(handle, 1)
            phase = await run.wait_round(1, evaluation_status="open")
            # Half of three, rounded up: two evaluators, seeded and sorted; only one reports.
            assert len(phase.evaluators) == 2 and phase.evaluators == sorted(phase.evaluators)
            outsider = next(c for c in CLIENTS if c not in phase.evaluators)
            assert read_task(run.engine, outsider)[0]["status"] == "wait"
            await run.report(handle, 1, phase.evaluators[0], {"data_samples": 50, "loss": 0.3, "accuracy": 0.8})
            result = await handle.result()
    assert result.status == "completed"
    m = run.metrics()[1]
    assert m.global_accuracy is None and m.global_loss is None
    assert m.federated_metrics == {"accuracy": 0.8, "loss": 0.3, "data_samples": 50}
    with session_scope(run.engine) as s:
        scores = s.exec(select(ClientRoundScore).where(ClientRoundScore.experiment_id == run.exp_id)).all()
    contributions = {r.client_id: r.contribution for r in scores}
    assert set(contributions) == set(CLIENTS)
    assert all(c is not None and c >= 0 for c in contributions.values())
    assert abs(sum(contributions.values()) - 1.0) < 1e-9
