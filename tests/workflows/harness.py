"""Run a real ExperimentWorkflow with in-process clients that really train, for scenario tests.

The workflow, its activities, the database, the blob store and the upload path are the real ones;
only HTTP and client processes are left out, so many rounds with many clients stay fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sqlmodel import select
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Interceptor

from fedloom_core.errors import ModelValidationFailed
from fedloom_core.learning.attacks import Attack, poison_data, poison_update
from fedloom_core.learning.datasets import client_partition, dataset_info
from fedloom_core.learning.training import train_local
from fedloom_core.learning.weights import load_state, save_state
from fedloom_core.learning.zoo import build_model
from fedloom_core.messages import ExperimentInput, UpdateNotice
from fedloom_core.schemas import PolicyConfig, StartRequest
from fedloom_core.settings import Settings
from fedloom_core.storage import uploads
from fedloom_core.storage.blobstore import LocalBlobStore
from fedloom_core.storage.db import Client, Experiment, Round, RoundMetrics, Update, create_schema, make_engine
from fedloom_core.storage.repo import session_scope
from workers.main import build_workers
from workflows.experiment import ExperimentWorkflow, workflow_id

# How often the in-process clients look for an open round: short, so rounds are not paced by it.
POLL_S = 0.01


@dataclass
class SimClient:
    client_id: str
    index: int
    attack: Attack | None = None
    capabilities: dict = field(default_factory=dict)
    location: dict = field(default_factory=dict)


@dataclass
class Outcome:
    status: str
    accuracies: list[float]
    engine: object
    experiment_id: str
    rounds: list[Round] = field(default_factory=list)
    # The first run's history, and whether the workflow continued as new since.
    history: object = None
    continued_as_new: bool = False

    @property
    def final_accuracy(self) -> float:
        return self.accuracies[-1]


async def run_experiment(
    env: WorkflowEnvironment,
    tmp: Path,
    clients: list[SimClient],
    *,
    rounds: int,
    strategy: str = "FedAvg",
    params: dict | None = None,
    policy: dict | None = None,
    partition: str = "iid",
    alpha: float = 0.5,
    dataset: str = "digits",
    architecture: str = "CNN",
    local_epochs: int = 1,
    learning_rate: float = 0.05,
    batch_size: int = 32,
    seed: int = 0,
    min_clients: int | None = None,
    selection_timeout_s: float = 30,
    continue_as_new_every: int | None = None,
    aggregation_queue: str | None = None,
    interceptors: Sequence[Interceptor] = (),
) -> Outcome:
    """Run one experiment to its end and return per-round accuracy and the database.

    With ``aggregation_queue``, validation, aggregation and evaluation are left to whatever workers
    poll that queue (e.g. separate worker processes); otherwise an in-process worker does them.
    ``interceptors`` go to the in-process workers (fault injection).
    """
    settings = Settings(data_dir=tmp)
    engine = make_engine(settings.database_url)
    create_schema(engine)
    blobs = LocalBlobStore(tmp / "blobs")
    suffix = uuid.uuid4().hex[:8]
    exp_id = f"sim-{suffix}"
    info = dataset_info(dataset)
    with session_scope(engine) as s:
        for c in clients:
            if s.get(Client, c.client_id) is not None:
                continue  # registered by another experiment sharing this database
            s.add(
                Client(
                    client_id=c.client_id,
                    registration_id=f"reg-{c.client_id}",
                    capabilities=c.capabilities,
                    location=c.location,
                )
            )
    req = StartRequest.model_validate(
        {
            "experiment_config": {
                "experiment_id": exp_id,
                "rounds": rounds,
                "min_clients": min_clients or len(clients),
                "dataset": dataset,
                "model_architecture": architecture,
                "seed": seed,
            },
            "training_config": {"local_epochs": local_epochs, "batch_size": batch_size, "learning_rate": learning_rate},
            "aggregation_config": {"strategy": strategy, "params": params or {}, "min_updates": 1},
        }
    )
    pol = PolicyConfig.model_validate(policy or {})
    with session_scope(engine) as s:
        s.add(
            Experiment(
                experiment_id=exp_id,
                status="running",
                total_rounds=rounds,
                config=req.model_dump(mode="json"),
                policy_config=pol.model_dump(mode="json"),
            )
        )
    inp = ExperimentInput(
        experiment_id=exp_id,
        config=req,
        input_shape=list(info.input_shape),
        num_classes=info.num_classes,
        round_timeout_s=300,
        selection_timeout_s=selection_timeout_s,
        policy=pol,
        continue_as_new_every=continue_as_new_every,
        aggregation_queue=aggregation_queue or f"agg-{suffix}",
    )
    data = {
        c.client_id: client_partition(dataset, c.index, len(clients), seed=seed, strategy=partition, alpha=alpha)
        if partition != "iid"
        else client_partition(dataset, c.index, len(clients), seed=seed)
        for c in clients
    }
    queues = ("experiments",) if aggregation_queue else ("experiments", "aggregation")
    workers = build_workers(
        env.client,
        settings,
        queues,
        workflow_queue=f"exp-{suffix}",
        aggregation_queue=f"agg-{suffix}",
        interceptors=interceptors,
    )
    # Clients answer at once: no deadline may be skipped while they train.
    with env.auto_time_skipping_disabled():
        return await _drive(env, engine, blobs, workers, inp, exp_id, suffix, clients, data, req, info, tmp, seed)


async def _drive(env, engine, blobs, workers, inp, exp_id, suffix, clients, data, req, info, tmp, seed) -> Outcome:  # type: ignore[no-untyped-def]
    by_id = {c.client_id: c for c in clients}
    async with contextlib.AsyncExitStack() as stack:
        for worker in workers:
            await stack.enter_async_context(worker)
        handle = await env.client.start_workflow(
            ExperimentWorkflow.run, inp, id=workflow_id(exp_id), task_queue=f"exp-{suffix}"
        )
        done: set[tuple[int, str]] = set()
        result_task = asyncio.ensure_future(handle.result())
        while not result_task.done():
            with session_scope(engine) as s:
                rnd = s.exec(select(Round).where(Round.experiment_id == exp_id, Round.status == "open")).first()
            if rnd is None:
                await asyncio.sleep(POLL_S)
                continue
            for cid in rnd.selected_clients:
                if (rnd.round, cid) in done:
                    continue
                done.add((rnd.round, cid))
                await asyncio.to_thread(
                    _train_and_upload, engine, blobs, rnd, by_id[cid], data[cid], req, info, tmp, seed
                )
                await handle.signal(
                    ExperimentWorkflow.update_received, UpdateNotice(update_id="sim", client_id=cid, round=rnd.round)
                )
            await asyncio.sleep(POLL_S)
        try:
            result = await result_task
            status = result.status
        except Exception:  # noqa: BLE001 - a failed experiment is an outcome too
            status = "failed"
        first_history = await env.client.get_workflow_handle(
            workflow_id(exp_id), run_id=handle.first_execution_run_id
        ).fetch_history()
        latest = env.client.get_workflow_handle(workflow_id(exp_id))
        last_run_id = (await latest.describe()).run_id
    with session_scope(engine) as s:
        metrics = s.exec(
            select(RoundMetrics).where(RoundMetrics.experiment_id == exp_id).order_by(RoundMetrics.round)
        ).all()
        round_rows = s.exec(select(Round).where(Round.experiment_id == exp_id).order_by(Round.round)).all()
    outcome = Outcome(status, [m.global_accuracy for m in metrics], engine, exp_id, list(round_rows))
    outcome.history = first_history
    outcome.continued_as_new = last_run_id != handle.first_execution_run_id
    return outcome


def _train_and_upload(engine, blobs, rnd, client: SimClient, data, req, info, tmp: Path, seed: int) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    tc = {**req.training_config.model_dump(), **rnd.client_config.get(client.client_id, {})}
    with session_scope(engine) as s:
        from fedloom_core.storage.db import GlobalModel

        key = s.get(GlobalModel, rnd.global_model_id).blob_key
    with blobs.open_local(key) as path:
        global_state = load_state(path)
    model = build_model(req.experiment_config.model_architecture, info.input_shape, info.num_classes)
    model.load_state_dict(global_state)
    attack = client.attack
    train_data = poison_data(attack, data, info.num_classes) if attack else data
    result = None
    if attack is None or attack.trains:
        result = train_local(
            model,
            train_data,
            epochs=int(tc["local_epochs"]),
            batch_size=int(tc["batch_size"]),
            learning_rate=float(tc["learning_rate"]),
            seed=seed * 7919 + rnd.round * 101 + client.index,
            proximal_mu=float(tc.get("proximal_mu", 0.0)),
        )
    state = model.state_dict()
    if attack is not None:
        state = poison_update(attack, global_state, state, seed=rnd.round * 31 + client.index)
    out = tmp / f"{rnd.experiment_id}-{client.client_id}-{rnd.round}.safetensors"
    save_state(state, out)
    metrics = {"data_samples": len(data), "local_accuracy": result.local_accuracy if result else 0.0}
    try:
        uploads.store_update(
            engine, blobs, client_id=client.client_id, upload_path=out, metrics=metrics, experiment_id=rnd.experiment_id
        )
    except ModelValidationFailed:
        pass  # e.g. NaN weights after training from a diverged model: refused, as a real client's would be
    out.unlink(missing_ok=True)  # the store may have adopted (moved) it


def updates_of(engine, experiment_id: str) -> list[Update]:  # type: ignore[no-untyped-def]
    """All update rows of an experiment."""
    with session_scope(engine) as s:
        return list(s.exec(select(Update).where(Update.experiment_id == experiment_id)).all())
