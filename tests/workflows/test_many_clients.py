"""15,000 registered clients: the experiment's workflow carries only what grows with the round's size.

A real Temporal dev server runs the real workflow and activities on SQLite; the clients are bulk
inserted into the database. Round 1 must open (its clients selected, their task available) with no
workflow-task failure and no history event over 256 KB.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import insert
from sqlmodel import select
from temporalio.api.enums.v1 import EventType
from temporalio.testing import WorkflowEnvironment

from api.taskboard import read_task
from fedloom_core.messages import ExperimentInput
from fedloom_core.policy.selection import SelectionOutcome
from fedloom_core.schemas import PolicyConfig, StartRequest
from fedloom_core.settings import Settings
from fedloom_core.storage.blobstore import LocalBlobStore
from fedloom_core.storage.candidates import MAX_REASON_KINDS as MAX_KINDS
from fedloom_core.storage.candidates import exclusion_counts, load_selection_details, store_selection
from fedloom_core.storage.db import Client, Experiment, Round, create_schema, make_engine, utcnow
from fedloom_core.storage.repo import session_scope
from tests.conftest import start_dev_server
from workers.main import build_workers
from workflows.experiment import ExperimentWorkflow, workflow_id

REGISTERED = 15_000
FRACTION = 0.067  # about 1,000 selected
EVENT_LIMIT = 256 * 1024
# Per-client policy results that matter: a deny rule leaves some out, a configure rule sets others' batch size.
RULES = [
    {
        "id": "no-blocked",
        "name": "No clients from the blocked region",
        "type": "client_selection",
        "priority": 100,
        "effect": "deny",
        "when": {"field": "location.region", "operator": "==", "value": "blocked"},
    },
    {
        "id": "small-batches",
        "name": "Smaller batches for low-power clients",
        "type": "client_selection",
        "priority": 200,
        "effect": "configure",
        "when": {"field": "capabilities.compute_power", "operator": "==", "value": "low"},
        "set": {"batch_size": 8},
    },
]


def _low(i: int) -> bool:
    return i % 3 == 0


def _blocked(i: int) -> bool:
    return i % 50 == 1


@pytest.fixture(scope="module")
async def dev_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await start_dev_server("--headless")
    yield env
    await env.shutdown()


def _register_bulk(engine, count: int) -> None:  # type: ignore[no-untyped-def]
    """Insert ``count`` clients in one statement: registration through HTTP is not what is under test."""
    now = utcnow()
    rows = [
        {
            "client_id": f"client-{i:05d}",
            "registration_id": f"reg-{i:05d}",
            "status": "registered",
            "client_config": {},
            "capabilities": {"compute_power": "low" if _low(i) else "high"},
            "location": {"region": "blocked" if _blocked(i) else "eu"},
            "registered_at": now,
            "current_round": 0,
            "trust_score": 1.0,
            "contribution_score": 0.0,
        }
        for i in range(count)
    ]
    with engine.begin() as conn:
        conn.execute(insert(Client.__table__), rows)  # type: ignore[attr-defined]


async def test_round_one_opens_with_15000_registered_clients(dev_env: WorkflowEnvironment, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    engine = make_engine(settings.database_url)
    create_schema(engine)
    _register_bulk(engine, REGISTERED)
    suffix = uuid.uuid4().hex[:8]
    exp_id = f"many-{suffix}"
    req = StartRequest.model_validate(
        {
            "experiment_config": {
                "experiment_id": exp_id,
                "rounds": 2,
                "min_clients": 10,
                "client_fraction": FRACTION,
                "dataset": "digits",
                "model_architecture": "MLP",
            },
            "aggregation_config": {"min_updates": 1},
        }
    )
    policy = PolicyConfig.model_validate({"rules": RULES})
    with session_scope(engine) as s:
        s.add(
            Experiment(
                experiment_id=exp_id,
                status="running",
                total_rounds=2,
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
        rnd = await _wait_open_round(engine, exp_id, timeout=45)
        history = await handle.fetch_history()
        await handle.terminate("test done")

    failures = [e for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED]
    assert not failures, failures[0].workflow_task_failed_event_attributes.failure.message
    sizes = [e.ByteSize() for e in history.events]
    assert max(sizes) < EVENT_LIMIT, f"largest history event is {max(sizes)} bytes"
    # Far below the limit: the selection's per-client details are in the blob store, not the history.
    assert sum(sizes) < 100 * 1024, f"history up to round 1 opening is {sum(sizes)} bytes"

    blocked = sum(_blocked(i) for i in range(REGISTERED))
    expected = math.ceil((REGISTERED - blocked) * FRACTION)
    assert len(rnd.selected_clients) == expected
    # The round row still has every client's exclusion and policy result, read back from the blob store.
    assert len(rnd.exclusions) == REGISTERED - expected
    assert sum(r.startswith("Denied by") for r in rnd.exclusions.values()) == blocked
    assert len(rnd.policy_results) == REGISTERED
    low = {cid for cid in rnd.selected_clients if _low(int(cid.split("-")[1]))}
    assert low and {cid for cid, cfg in rnd.client_config.items() if cfg.get("batch_size") == 8} == low
    task, _ = read_task(engine, rnd.selected_clients[0])
    assert task["status"] == "train" and task["round"] == 1
    outsider = next(f"client-{i:05d}" for i in range(REGISTERED) if f"client-{i:05d}" not in rnd.selected_clients)
    assert read_task(engine, outsider)[0]["status"] == "wait"


async def _wait_open_round(engine, exp_id: str, timeout: float) -> Round:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout / 0.2)):
        with session_scope(engine) as s:
            row = s.exec(select(Round).where(Round.experiment_id == exp_id, Round.round == 1)).first()
        if row is not None:
            return row
        await asyncio.sleep(0.2)
    raise AssertionError("round 1 did not open")


def test_selection_details_round_trip_and_summary(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    excluded = {f"c{i}": f"Trust score below threshold (0.{i % 10}0 < 0.90)" for i in range(50)}
    excluded |= {f"d{i}": f"Denied by rule {i}" for i in range(30)}
    outcome = SelectionOutcome(selected=["a", "b"], excluded=excluded, policy_results={"a": {"selected": True}})
    sel = store_selection(blobs, "exp", 3, outcome, {"local_epochs": 2})
    assert sel.selected == ["a", "b"] and sel.excluded == {} and sel.policy_results == {}
    assert sel.round_config == {"local_epochs": 2}
    assert sel.details_key is not None and sel.details_key.startswith("selections/exp/round-3-")
    assert load_selection_details(blobs, sel.details_key) == (excluded, {"a": {"selected": True}})
    # Storing the same selection again names the same blob; a different one, another blob.
    assert store_selection(blobs, "exp", 3, outcome, {}).details_key == sel.details_key
    other = SelectionOutcome(selected=["a"], excluded={"b": "x"})
    assert store_selection(blobs, "exp", 3, other, {}).details_key != sel.details_key
    counts = exclusion_counts(excluded)
    assert counts["Trust score below threshold"] == 50
    assert len(counts) == MAX_KINDS + 1 and sum(counts.values()) == 80 and counts["other"] == 11
