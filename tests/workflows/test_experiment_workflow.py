"""ExperimentWorkflow on Temporal's time-skipping server, with the real activities on SQLite."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import torch
from sqlmodel import select
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from fedloom_core.learning.weights import save_state
from fedloom_core.learning.zoo import build_model
from fedloom_core.messages import ExperimentInput, UpdateNotice
from fedloom_core.schemas import StartRequest
from fedloom_core.settings import Settings
from fedloom_core.storage import uploads
from fedloom_core.storage.blobstore import LocalBlobStore
from fedloom_core.storage.db import Client, Experiment, Round, RoundMetrics, Update, create_schema, make_engine
from fedloom_core.storage.repo import session_scope
from workers.main import build_workers
from workflows.experiment import ExperimentWorkflow, workflow_id

ROUND_TIMEOUT_S = 600.0  # skipped, not waited for


class Harness:
    def __init__(self, env: WorkflowEnvironment, tmp: Path) -> None:
        self.env = env
        self.settings = Settings(data_dir=tmp)
        self.engine = make_engine(self.settings.database_url)
        create_schema(self.engine)
        self.blobs = LocalBlobStore(tmp / "blobs")
        suffix = uuid.uuid4().hex[:8]
        self.queue, self.agg_queue = f"exp-{suffix}", f"agg-{suffix}"
        self.exp_id = f"exp-{suffix}"

    def register(self, *client_ids: str) -> None:
        with session_scope(self.engine) as s:
            for cid in client_ids:
                s.add(Client(client_id=cid, registration_id=f"reg-{cid}"))

    def input(
        self, *, min_clients: int, min_updates: int, rounds: int = 1, selection_timeout_s: float = 30
    ) -> ExperimentInput:
        req = StartRequest.model_validate(
            {
                "experiment_config": {
                    "experiment_id": self.exp_id,
                    "rounds": rounds,
                    "min_clients": min_clients,
                    "dataset": "digits",
                    "model_architecture": "MLP",
                },
                "aggregation_config": {"min_updates": min_updates},
            }
        )
        with session_scope(self.engine) as s:
            s.add(
                Experiment(
                    experiment_id=self.exp_id, status="running", total_rounds=rounds, config=req.model_dump(mode="json")
                )
            )
        return ExperimentInput(
            experiment_id=self.exp_id,
            config=req,
            input_shape=[8, 8, 1],
            num_classes=10,
            round_timeout_s=ROUND_TIMEOUT_S,
            selection_timeout_s=selection_timeout_s,
            aggregation_queue=self.agg_queue,
        )

    def workers(self):  # type: ignore[no-untyped-def]
        return build_workers(
            self.env.client, self.settings, workflow_queue=self.queue, aggregation_queue=self.agg_queue
        )

    async def wait_open_round(self, rnd: int = 1, timeout: float = 30) -> Round:
        for _ in range(int(timeout / 0.1)):
            with session_scope(self.engine) as s:
                row = s.exec(
                    select(Round).where(Round.experiment_id == self.exp_id, Round.round == rnd, Round.status == "open")
                ).first()
            if row is not None:
                return row
            await asyncio.sleep(0.1)
        raise AssertionError(f"round {rnd} did not open")

    async def upload(self, handle, client_id: str, tmp: Path, scale: float) -> None:  # type: ignore[no-untyped-def]
        model = build_model("MLP", (8, 8, 1), 10, seed=1)
        state = {k: v * scale for k, v in model.state_dict().items()}
        path = tmp / f"{client_id}.safetensors"
        save_state(state, path)
        stored = uploads.store_update(
            self.engine,
            self.blobs,
            client_id=client_id,
            upload_path=path,
            metrics={"data_samples": 100, "local_accuracy": 0.5},
        )
        await handle.signal(
            ExperimentWorkflow.update_received,
            UpdateNotice(update_id=stored.update.update_id, client_id=client_id, round=stored.update.round),
        )


async def _run(h: Harness, inp: ExperimentInput):  # type: ignore[no-untyped-def]
    return await h.env.client.start_workflow(ExperimentWorkflow.run, inp, id=workflow_id(h.exp_id), task_queue=h.queue)


async def test_round_deadline_closes_with_enough_updates(
    time_skipping_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    h = Harness(time_skipping_env, tmp_path)
    h.register("a", "b", "c")
    inp = h.input(min_clients=3, min_updates=2)
    workers = h.workers()
    async with workers[0], workers[1]:
        handle = await _run(h, inp)
        rnd = await h.wait_open_round()
        assert sorted(rnd.selected_clients) == ["a", "b", "c"]
        await h.upload(handle, "a", tmp_path, 1.0)
        await h.upload(handle, "b", tmp_path, 3.0)
        # "c" never answers: awaiting the result lets the server skip to the round deadline.
        result = await handle.result()
    assert result.status == "completed" and result.rounds_completed == 1
    with session_scope(h.engine) as s:
        metrics = s.exec(select(RoundMetrics).where(RoundMetrics.experiment_id == h.exp_id)).one()
        statuses = {u.client_id: u.validation_status for u in s.exec(select(Update)).all()}
        exp = s.get(Experiment, h.exp_id)
        clients = {c.client_id: c.status for c in s.exec(select(Client)).all()}
    assert metrics.participating_clients == 2
    assert statuses == {"a": "accepted", "b": "accepted"}
    assert exp is not None and exp.status == "completed" and exp.final_model_id == result.final_model_id
    assert clients == {"a": "active", "b": "active", "c": "inactive"}
    # The aggregate is the average of the two uploads (equal sample counts): 2x the base model.
    base = build_model("MLP", (8, 8, 1), 10, seed=1).state_dict()
    with h.blobs.open_local(f"models/{h.exp_id}/round-1.safetensors") as path:
        from fedloom_core.learning.weights import load_state

        agg = load_state(path)
    for name, tensor in base.items():
        torch.testing.assert_close(agg[name], tensor * 2.0)


async def test_round_with_too_few_updates_fails_insufficient_clients(
    time_skipping_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    h = Harness(time_skipping_env, tmp_path)
    h.register("a", "b")
    inp = h.input(min_clients=2, min_updates=2)
    workers = h.workers()
    async with workers[0], workers[1]:
        handle = await _run(h, inp)
        await h.wait_open_round()
        await h.upload(handle, "a", tmp_path, 1.0)
        with pytest.raises(WorkflowFailureError) as info:
            await handle.result()
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "INSUFFICIENT_CLIENTS"
    with session_scope(h.engine) as s:
        exp = s.get(Experiment, h.exp_id)
    assert exp is not None and exp.status == "failed" and exp.error_code == "INSUFFICIENT_CLIENTS"


async def test_selection_deadline_without_enough_clients_fails(
    time_skipping_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    h = Harness(time_skipping_env, tmp_path)
    h.register("only-one")
    inp = h.input(min_clients=2, min_updates=2, selection_timeout_s=1.5)
    workers = h.workers()
    async with workers[0], workers[1]:
        handle = await _run(h, inp)
        with pytest.raises(WorkflowFailureError) as info:
            await handle.result()
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "INSUFFICIENT_CLIENTS"
    # The waiting selection gave up at its deadline (not the instant first try, which does not wait).
    assert "after 1.5s" in str(cause) and "min_clients is 2" in str(cause)


async def test_selection_waits_for_a_client_that_registers_late(
    time_skipping_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    h = Harness(time_skipping_env, tmp_path)
    h.register("early")
    inp = h.input(min_clients=2, min_updates=2, selection_timeout_s=60)
    workers = h.workers()
    async with workers[0], workers[1]:
        handle = await _run(h, inp)
        await asyncio.sleep(1.0)
        h.register("late")
        opened = await h.wait_open_round()
        assert sorted(opened.selected_clients) == ["early", "late"]
        await handle.cancel()


async def test_stop_cancels_cleanly_and_keeps_last_model(
    time_skipping_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    h = Harness(time_skipping_env, tmp_path)
    h.register("a", "b")
    inp = h.input(min_clients=2, min_updates=2, rounds=3)
    workers = h.workers()
    async with workers[0], workers[1]:
        handle = await _run(h, inp)
        await h.wait_open_round()
        status = await handle.query(ExperimentWorkflow.status)
        assert status["status"] == "waiting_for_updates" and status["current_round"] == 1
        await handle.signal(ExperimentWorkflow.request_stop, "manual_stop")
        await handle.cancel()
        result = await handle.result()
    assert result.status == "stopped" and result.reason == "manual_stop"
    assert result.final_model_id == f"model_{h.exp_id}_round_0"
    with session_scope(h.engine) as s:
        exp = s.get(Experiment, h.exp_id)
        rnd = s.exec(select(Round).where(Round.experiment_id == h.exp_id)).one()
    assert exp is not None and exp.status == "stopped" and exp.stop_reason == "manual_stop"
    assert exp.final_model_id == result.final_model_id
    assert rnd.status == "stopped"
    assert h.blobs.exists(f"models/{h.exp_id}/round-0.safetensors")
