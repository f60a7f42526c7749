"""Worker scale-out: two ``fedloom worker --queues aggregation`` processes share the heavy work of
two experiments running at once on a real Temporal dev server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from fedloom_core.messages import AGGREGATION_TASK_QUEUE
from fedloom_tools.launch import terminate
from tests.conftest import start_dev_server
from tests.workflows.harness import SimClient, run_experiment
from workflows.experiment import workflow_id

# The aggregation queue's work: validation, aggregation and evaluation, one activity per round.
HEAVY = {"process_round"}
ROUNDS = 5


@pytest.fixture
async def dev_server() -> AsyncIterator[WorkflowEnvironment]:
    env = await start_dev_server()
    yield env
    await env.shutdown()


def _aggregation_worker(env: WorkflowEnvironment, data_dir: Path, log: Path) -> subprocess.Popen:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("FEDLOOM_")}
    child_env.update(
        {"FEDLOOM_DATA_DIR": str(data_dir), "FEDLOOM_TEMPORAL_ADDRESS": env.client.service_client.config.target_host}
    )
    return subprocess.Popen(
        [sys.executable, "-m", "fedloom.cli", "worker", "--queues", "aggregation"],
        env=child_env,
        stdout=open(log, "wb"),  # noqa: SIM115 - lives as long as the worker
        stderr=subprocess.STDOUT,
    )


async def _heavy_workers(env: WorkflowEnvironment, experiment_id: str) -> dict[str, set[int]]:
    """Which worker identities ran the heavy activities, per activity type, over every run."""
    by_type: dict[str, set[str]] = {}
    async for wf in env.client.list_workflows(f'WorkflowId = "{workflow_id(experiment_id)}"'):
        history = await env.client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
        scheduled = {
            e.event_id: e.activity_task_scheduled_event_attributes.activity_type.name
            for e in history.events
            if e.HasField("activity_task_scheduled_event_attributes")
        }
        for e in history.events:
            if e.HasField("activity_task_started_event_attributes"):
                started = e.activity_task_started_event_attributes
                name = scheduled[started.scheduled_event_id]
                if name in HEAVY:
                    by_type.setdefault(name, set()).add(started.identity)
    return by_type


@pytest.mark.timeout(600)
async def test_two_aggregation_workers_share_two_concurrent_experiments(
    dev_server: WorkflowEnvironment, tmp_path: Path
) -> None:
    workers = [_aggregation_worker(dev_server, tmp_path, tmp_path / f"agg-worker-{i}.log") for i in range(2)]
    try:
        clients = [SimClient(f"c{i}", i) for i in range(3)]
        # Both experiments share one database and blob store, as one deployment's experiments do;
        # their workflows and light activities run here, their heavy activities only in the two workers.
        first, second = await asyncio.gather(
            *(
                run_experiment(
                    dev_server,
                    tmp_path,
                    clients,
                    rounds=ROUNDS,
                    architecture="MLP",
                    seed=seed,
                    aggregation_queue=AGGREGATION_TASK_QUEUE,
                )
                for seed in (1, 2)
            )
        )
        assert all(p.poll() is None for p in workers), "an aggregation worker died"
    finally:
        for proc in workers:
            terminate(proc, timeout=20)

    for out in (first, second):
        assert out.status == "completed"
        assert [r.round for r in out.rounds] == list(range(1, ROUNDS + 1))
        assert out.final_accuracy > 0.8
    pids = {str(p.pid) for p in workers}
    identities = set()
    for out in (first, second):
        by_type = await _heavy_workers(dev_server, out.experiment_id)
        assert set(by_type) == HEAVY
        identities |= set().union(*by_type.values())
    # Every heavy activity ran in one of the two worker processes, and both took a share.
    assert {identity.split("@")[0] for identity in identities} == pids, identities
