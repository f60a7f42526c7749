"""A 300-round experiment on a real Temporal dev server whose continue-as-new threshold is lowered:
the workflow hands its state over many times and the rounds and metrics come out whole."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from fedloom_core.temporal import SEARCH_ATTRIBUTES
from tests.conftest import start_dev_server
from tests.workflows.harness import SimClient, run_experiment
from workflows.experiment import workflow_id

ROUNDS = 300
# Temporal suggests continue-as-new at 4,096 events by default; here after 300 (about 8 rounds).
SUGGEST_AFTER_EVENTS = 300


@pytest.fixture
async def dev_server() -> AsyncIterator[WorkflowEnvironment]:
    env = await start_dev_server(
        "--dynamic-config-value", f"limit.historyCount.suggestContinueAsNew={SUGGEST_AFTER_EVENTS}"
    )
    yield env
    await env.shutdown()


@pytest.mark.timeout(600)
async def test_300_rounds_continue_as_new_when_temporal_suggests_it(dev_server: WorkflowEnvironment, tmp_path: Path):
    clients = [SimClient("a", 0), SimClient("b", 1)]
    # continue_as_new_every=None: only Temporal's suggestion triggers the hand-over.
    out = await run_experiment(
        dev_server, tmp_path, clients, rounds=ROUNDS, architecture="MLP", learning_rate=0.05, batch_size=64
    )
    assert out.status == "completed"
    assert [r.round for r in out.rounds] == list(range(1, ROUNDS + 1))
    assert all(r.status == "completed" for r in out.rounds)
    assert len(out.accuracies) == ROUNDS and all(math.isfinite(a) for a in out.accuracies)
    assert out.final_accuracy > 0.9

    runs = [wf async for wf in dev_server.client.list_workflows(f'WorkflowId = "{workflow_id(out.experiment_id)}"')]
    # Each run stayed near the lowered threshold instead of growing one history for 300 rounds.
    assert len(runs) >= ROUNDS // 20, f"only {len(runs)} runs: continue-as-new was not suggested"
    for wf in runs:
        assert wf.history_length is None or wf.history_length < SUGGEST_AFTER_EVENTS + 100
    final = await dev_server.client.get_workflow_handle(workflow_id(out.experiment_id)).describe()
    attrs = final.typed_search_attributes
    assert attrs.get(SEARCH_ATTRIBUTES[2]) == ROUNDS  # CurrentRound
    assert attrs.get(SEARCH_ATTRIBUTES[1]) == "completed"  # ExperimentStatus
