"""Long experiments continue as new with their state; recorded histories still replay on today's code."""

from __future__ import annotations

import json
import os
from pathlib import Path

from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from tests.workflows.harness import SimClient, run_experiment
from workflows.experiment import BOUNDED_ROUND_PATCH, ExperimentWorkflow

HISTORIES = Path(__file__).parent / "histories"


async def test_continue_as_new_keeps_rounds_strategy_state_and_metrics(
    time_skipping_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    clients = [SimClient(f"l{i}", i) for i in range(3)]
    out = await run_experiment(
        time_skipping_env,
        tmp_path,
        clients,
        rounds=5,
        architecture="MLP",
        strategy="FedAdam",
        params={"server_lr": 0.05},
        continue_as_new_every=2,
    )
    assert out.status == "completed" and out.continued_as_new
    assert [r.round for r in out.rounds] == [1, 2, 3, 4, 5]
    assert all(r.status == "completed" for r in out.rounds)
    assert len(out.accuracies) == 5
    # FedAdam's moments went through continue-as-new: the first run ended after round 2 carrying them.
    events = out.history.events
    last = events[-1]
    assert last.HasField("workflow_execution_continued_as_new_event_attributes")
    carried = json.loads(last.workflow_execution_continued_as_new_event_attributes.input.payloads[0].data)
    assert carried["state"]["next_round"] == 3
    assert carried["state"]["strategy_state_key"].endswith("round-2.safetensors")
    if os.environ.get("FEDLOOM_RECORD_HISTORIES"):
        # One file per workflow version: older files stay, so CI keeps replaying every version.
        # Named after the newest patch the workflow carries.
        (HISTORIES / f"fedadam-continue-as-new-{BOUNDED_ROUND_PATCH}.json").write_text(out.history.to_json())


async def test_recorded_histories_replay_without_nondeterminism() -> None:
    files = sorted(HISTORIES.glob("*.json"))
    assert files, "no recorded histories: run with FEDLOOM_RECORD_HISTORIES=1 once"
    replayer = Replayer(workflows=[ExperimentWorkflow], data_converter=pydantic_data_converter)
    for path in files:
        history = WorkflowHistory.from_json("experiment-recorded", path.read_text())
        await replayer.replay_workflow(history)
    # Both sides of the search-attribute patch are covered: a history from before it and one after.
    texts = [path.read_text() for path in files]
    assert any("upsertWorkflowSearchAttributes" not in t for t in texts)
    assert any("upsertWorkflowSearchAttributes" in t and "markerRecorded" in t for t in texts)
    # And both sides of the local-steps patch: short steps as normal activities, and as local ones.
    assert any('"name": "open_round"' in t for t in texts)
    assert any("core_local_activity" in t for t in texts)
    # And both sides of the fused-round patch: three heavy activities a round, and one.
    assert any('"name": "aggregate_round"' in t for t in texts)
    assert any('"name": "process_round"' in t for t in texts)
    # And both sides of the best-accuracy patch: runs that never set BestAccuracy, and one that does.
    assert any("BestAccuracy" not in t for t in texts)
    assert any("BestAccuracy" in t for t in texts)
    # And both sides of the bounded-round patch: update refs through close_round, and a count.
    assert any('"name": "process_round"' in t and not _bounded(t) for t in texts)
    assert any(_bounded(t) for t in texts)


def _bounded(history_json: str) -> bool:
    """Whether a recorded run processed its rounds with "bounded-round-v1" (process_round reading the updates)."""
    history = WorkflowHistory.from_json("experiment-recorded", history_json)
    for event in history.events:
        attrs = event.activity_task_scheduled_event_attributes
        if event.HasField("activity_task_scheduled_event_attributes") and attrs.activity_type.name == "process_round":
            return bool(json.loads(attrs.input.payloads[0].data).get("bounded"))
    return False
