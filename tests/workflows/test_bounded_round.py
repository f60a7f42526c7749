"""1,000 selected clients: a round's history stays bounded ("bounded-round-v1").

A real Temporal dev server runs the real workflow and activities on SQLite. 1,000 clients upload
small MLP updates through the storage layer (``uploads.store_update``, as the API does), a few of
them far too large so validation rejects them. The round's whole history must stay under 100 KB
with no event over 256 KB, while the round's verdicts, scores and strategy info are recorded as
before. Before the workflow goes on, the test runs ``process_round`` itself on the same updates
with the old (unbounded) and the new (bounded) messages: the per-client outcome in the blob must be
exactly what the old result carried, and a retry must name the same blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from sqlalchemy import insert
from sqlmodel import select
from temporalio.api.enums.v1 import EventType
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from activities.aggregation import AggregationActivities
from fedloom_core.learning.weights import load_state, save_state
from fedloom_core.messages import (
    INSUFFICIENT_CLIENTS,
    CompleteRoundInput,
    Evaluation,
    ExperimentInput,
    ExperimentState,
    ModelRef,
    ProcessRoundInput,
    ProcessRoundOutput,
    RoundClosed,
    UpdateNotice,
    UpdateRef,
    ValidateInput,
    ValidationOutcome,
)
from fedloom_core.schemas import PolicyConfig, StartRequest
from fedloom_core.settings import Settings
from fedloom_core.storage import uploads
from fedloom_core.storage.blobstore import LocalBlobStore, open_blob_store
from fedloom_core.storage.db import (
    Client,
    ClientRoundScore,
    Experiment,
    GlobalModel,
    Round,
    RoundMetrics,
    Update,
    create_schema,
    make_engine,
    utcnow,
)
from fedloom_core.storage.model_rows import model_ref
from fedloom_core.storage.repo import session_scope
from fedloom_core.storage.round_outcomes import (
    RoundOutcome,
    complete_input,
    load_outcome,
    received_updates,
    store_outcome,
)
from tests.conftest import start_dev_server
from workers.main import build_workers
from workflows import inputs
from workflows.experiment import ExperimentWorkflow, workflow_id

CLIENTS = 1_000
ROUND_LIMIT = 100 * 1024
EVENT_LIMIT = 256 * 1024
MAX_NORM = 20.0


def _poisoned(i: int) -> bool:
    return i % 97 == 5


@pytest.fixture(scope="module")
async def dev_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await start_dev_server("--headless")
    yield env
    await env.shutdown()


def _register_bulk(engine, count: int) -> list[str]:  # type: ignore[no-untyped-def]
    ids = [f"site-{i:04d}" for i in range(count)]
    now = utcnow()
    rows = [
        {
            "client_id": cid,
            "registration_id": f"reg-{cid}",
            "status": "registered",
            "client_config": {},
            "capabilities": {},
            "location": {},
            "registered_at": now,
            "current_round": 0,
            "trust_score": 1.0,
            "contribution_score": 0.0,
        }
        for cid in ids
    ]
    with engine.begin() as conn:
        conn.execute(insert(Client.__table__), rows)  # type: ignore[attr-defined]
    return ids


def _upload_all(engine, blobs, rnd: Round, tmp: Path) -> None:  # type: ignore[no-untyped-def]
    """Each client's update: the global model plus seeded noise (far more for the poisoned ones)."""
    with session_scope(engine) as s:
        key = s.get(GlobalModel, rnd.global_model_id).blob_key
    with blobs.open_local(key) as path:
        base = load_state(path)
    for cid in rnd.selected_clients:
        i = int(cid.split("-")[1])
        gen = torch.Generator().manual_seed(i)
        scale = 5.0 if _poisoned(i) else 0.002
        state = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        out = tmp / f"{cid}.safetensors"
        save_state(state, out)
        uploads.store_update(
            engine,
            blobs,
            client_id=cid,
            upload_path=out,
            metrics={"data_samples": 20 + i % 40, "local_accuracy": 0.5},
            experiment_id=rnd.experiment_id,
        )
        out.unlink(missing_ok=True)


def _size(message: object) -> int:
    """Bytes of a message as the project's data converter encodes it for Temporal."""
    return sum(p.ByteSize() for p in pydantic_data_converter.payload_converter.to_payloads([message]))


async def test_round_history_stays_bounded_with_1000_selected(dev_env: WorkflowEnvironment, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    engine = make_engine(settings.database_url)
    create_schema(engine)
    blobs = open_blob_store(settings.blob_url, settings.s3_endpoint_url)
    ids = _register_bulk(engine, CLIENTS)
    suffix = uuid.uuid4().hex[:8]
    exp_id = f"bounded-{suffix}"
    req = StartRequest.model_validate(
        {
            "experiment_config": {
                "experiment_id": exp_id,
                "rounds": 1,
                "min_clients": CLIENTS,
                "client_fraction": 1.0,
                "dataset": "digits",
                "model_architecture": "MLP",
            },
            "aggregation_config": {"strategy": "MultiKrum", "params": {"num_byzantine": 10}, "min_updates": 1},
        }
    )
    policy = PolicyConfig.model_validate({"max_update_norm": MAX_NORM})
    with session_scope(engine) as s:
        s.add(
            Experiment(
                experiment_id=exp_id,
                status="running",
                total_rounds=1,
                config=req.model_dump(mode="json"),
                policy_config=policy.model_dump(mode="json"),
            )
        )
    inp = ExperimentInput(
        experiment_id=exp_id,
        config=req,
        input_shape=[8, 8, 1],
        num_classes=10,
        round_timeout_s=600,
        selection_timeout_s=30,
        policy=policy,
        aggregation_queue=f"agg-{suffix}",
    )
    workers = build_workers(dev_env.client, settings, workflow_queue=f"exp-{suffix}", aggregation_queue=f"agg-{suffix}")
    async with contextlib.AsyncExitStack() as stack:
        for worker in workers:
            await stack.enter_async_context(worker)
        handle = await dev_env.client.start_workflow(
            ExperimentWorkflow.run, inp, id=workflow_id(exp_id), task_queue=f"exp-{suffix}"
        )
        rnd = await _wait_open_round(engine, exp_id, timeout=60)
        assert sorted(rnd.selected_clients) == ids
        await asyncio.to_thread(_upload_all, engine, blobs, rnd, tmp_path)
        old, new = await asyncio.to_thread(_process_both_ways, engine, blobs, inp, rnd)
        await handle.signal(
            ExperimentWorkflow.update_received,
            UpdateNotice(update_id="all", client_id=ids[-1], round=1, reported=rnd.selected_clients),
        )
        result = await asyncio.wait_for(handle.result(), timeout=600)
        history = await handle.fetch_history()
    assert result.status == "completed", result.reason

    failures = [e for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED]
    assert not failures, failures[0].workflow_task_failed_event_attributes.failure.message
    sizes = [e.ByteSize() for e in history.events]
    print(f"\nhistory of one round at {CLIENTS} selected: {sum(sizes)} bytes, largest event {max(sizes)} bytes")
    for event in sorted(history.events, key=lambda e: -e.ByteSize())[:6]:
        print(f"  {EventType.Name(event.event_type)}: {event.ByteSize()} bytes")
    assert max(sizes) < EVENT_LIMIT, f"largest history event is {max(sizes)} bytes"
    # The whole run (start, initial model, one round, end) is under the per-round budget.
    assert sum(sizes) < ROUND_LIMIT, f"history of one round is {sum(sizes)} bytes"

    # The database holds what the old path recorded: verdicts, metrics, scores and the strategy's info.
    rejected = {cid for cid in ids if _poisoned(int(cid.split("-")[1]))}
    assert set(old.validation.rejected) == rejected
    with session_scope(engine) as s:
        rows = {u.client_id: u for u in s.exec(select(Update).where(Update.experiment_id == exp_id))}
        metrics = s.exec(select(RoundMetrics).where(RoundMetrics.experiment_id == exp_id)).one()
        scores = {
            r.client_id: r for r in s.exec(select(ClientRoundScore).where(ClientRoundScore.experiment_id == exp_id))
        }
        done_round = s.exec(select(Round).where(Round.experiment_id == exp_id)).one()
    assert {cid for cid, u in rows.items() if u.validation_status == "rejected"} == rejected
    assert {cid for cid, u in rows.items() if u.validation_status == "accepted"} == {
        u.client_id for u in old.validation.accepted
    }
    assert all(rows[cid].reason == reason for cid, reason in old.validation.rejected.items())
    assert metrics.participating_clients == len(old.validation.accepted) == CLIENTS - len(rejected)
    assert metrics.global_accuracy == old.evaluation.accuracy and metrics.global_loss == old.evaluation.loss
    assert done_round.strategy_info == old.aggregated.info and done_round.strategy_info["selected"]
    assert len(scores) == CLIENTS
    assert all(scores[cid].update_norm == pytest.approx(old.validation.stats[cid]["update_norm"]) for cid in ids)
    assert all(not scores[cid].accepted and scores[cid].reason for cid in rejected)
    assert new.accepted_count == metrics.participating_clients


def _process_both_ways(
    engine, blobs, inp: ExperimentInput, rnd: Round
) -> tuple[ProcessRoundOutput, ProcessRoundOutput]:  # type: ignore[no-untyped-def]
    """process_round on the open round's updates with the old and the bounded messages; prints their sizes."""
    acts = AggregationActivities(engine, blobs)
    with session_scope(engine) as s:
        model = model_ref(s.get(GlobalModel, rnd.global_model_id))
    received = received_updates(engine, inp.experiment_id, rnd.round)
    validation = ValidateInput(
        experiment_id=inp.experiment_id, round=rnd.round, global_model=model, updates=received, policy=inp.policy
    )
    request = ProcessRoundInput(
        validation=validation,
        aggregation=inputs.aggregation_spec(inp, ExperimentState(), rnd.round),
        evaluation=inputs.evaluation_spec(inp),
        min_updates=inputs.min_updates(inp),
    )
    bounded_request = request.model_copy(
        update={"validation": validation.model_copy(update={"updates": []}), "bounded": True}
    )
    old = acts.process_round(request)
    new = acts.process_round(bounded_request)
    retried = acts.process_round(bounded_request)

    # A retry names the same blob; the blob holds exactly the per-client parts the old result carried.
    assert new.outcome_key is not None and retried.outcome_key == new.outcome_key
    assert new.received == len(received) and new.accepted_count == len(old.validation.accepted)
    assert sum(new.rejection_counts.values()) == len(old.validation.rejected)
    assert new.aggregated.model == old.aggregated.model
    assert (new.evaluation.accuracy, new.evaluation.loss) == (old.evaluation.accuracy, old.evaluation.loss)
    outcome = load_outcome(blobs, new.outcome_key)
    assert outcome.accepted == old.validation.accepted and outcome.rejected == old.validation.rejected
    assert outcome.stats == old.validation.stats and outcome.strategy_info == old.aggregated.info
    assert outcome.loo_loss_deltas == old.evaluation.loo_loss_deltas and len(outcome.loo_loss_deltas) > 1
    # complete_round, given the bounded input, works on the same input as the old path gave it.
    old_complete = inputs.complete_round(inp, rnd.round, rnd.selected_clients, old, 1.0)
    new_complete = inputs.complete_round(inp, rnd.round, rnd.selected_clients, new, 1.0)
    filled = complete_input(blobs, new_complete)
    ignore = {"selected", "outcome_key", "evaluation", "aggregation_time"}
    assert filled.model_dump(exclude=ignore) == old_complete.model_dump(exclude=ignore)
    assert filled.evaluation.model_dump(exclude={"evaluation_time"}) == old.evaluation.model_dump(
        exclude={"evaluation_time"}
    )

    # Each message of the round as the data converter encodes it, old path and bounded path.
    print(f"\nper-round payloads at {len(received)} received (bytes): old / bounded")
    print(f"  close_round result: {_size(received)} / {_size(RoundClosed(received=len(received)))}")
    print(f"  process_round input: {_size(request)} / {_size(bounded_request)}")
    print(f"  process_round result: {_size(old)} / {_size(new)}")
    print(f"  complete_round input: {_size(old_complete)} / {_size(new_complete)}")
    return old, new


async def _wait_open_round(engine, exp_id: str, timeout: float) -> Round:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout / 0.2)):
        with session_scope(engine) as s:
            row = s.exec(select(Round).where(Round.experiment_id == exp_id, Round.round == 1)).first()
        if row is not None:
            return row
        await asyncio.sleep(0.2)
    raise AssertionError("round 1 did not open")


def test_outcome_blob_round_trip_and_content_key(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    ref = UpdateRef(update_id="u1", client_id="a", blob_key="updates/exp/1/a-x.safetensors", num_samples=7)
    outcome = RoundOutcome(
        accepted=[ref],
        rejected={"b": "Update norm 9.0 above max_update_norm 1.0"},
        stats={"a": {"update_norm": 0.5}},
        loo_loss_deltas={"a": 0.01},
        strategy_info={"selected": ["a"]},
    )
    key = store_outcome(blobs, "exp", 1, outcome)
    assert key.startswith("outcomes/exp/round-1-") and load_outcome(blobs, key) == outcome
    # The same outcome names the same blob (a retry); a different one, another blob.
    assert store_outcome(blobs, "exp", 1, outcome) == key
    assert store_outcome(blobs, "exp", 1, outcome.model_copy(update={"rejected": {}})) != key
    model = ModelRef(model_id="m", blob_key="models/exp/round-1.safetensors", sha256="0" * 64, round=1)
    evaluation = Evaluation(accuracy=0.5, loss=1.0, evaluation_time=0.1)
    inp = CompleteRoundInput(
        experiment_id="exp",
        round=1,
        total_rounds=1,
        model=model,
        evaluation=evaluation,
        updates=[],
        round_duration=1.0,
        aggregation_time=0.1,
    )
    assert complete_input(blobs, inp) == inp  # no key: the input as older runs carried it
    filled = complete_input(blobs, inp.model_copy(update={"outcome_key": key}))
    assert filled.updates == [ref] and filled.rejected == outcome.rejected and filled.stats == outcome.stats
    assert filled.strategy_info == {"selected": ["a"]} and filled.evaluation.loo_loss_deltas == {"a": 0.01}


def test_too_few_accepted_and_an_outdated_aggregation_worker_fail_the_round() -> None:
    model = ModelRef(model_id="m", blob_key="k", sha256="0" * 64, round=0)
    validation = ValidateInput(experiment_id="exp", round=3, global_model=model, updates=[])
    counted = ProcessRoundOutput(validation=ValidationOutcome(accepted=[]), received=5, accepted_count=2)
    inputs.check_enough(validation, counted, 2, bounded=True)
    with pytest.raises(ApplicationError, match="2 accepted update.s. of 5 received") as exc:
        inputs.check_enough(validation, counted, 3, bounded=True)
    assert exc.value.type == INSUFFICIENT_CLIENTS and exc.value.non_retryable
    # A bounded run's result without counts came from a worker that ignored ``bounded``.
    with pytest.raises(ApplicationError) as exc:
        inputs.check_enough(validation, ProcessRoundOutput(validation=ValidationOutcome(accepted=[])), 0, bounded=True)
    assert exc.value.type == "AGGREGATION_WORKER_OUTDATED"
