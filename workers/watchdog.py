"""The workflow watchdog: an experiment whose workflow cannot make progress is failed with the reason.

Temporal retries a failing workflow task forever (a payload over the server's limit, a replay that no
longer matches the code): the experiment would hang silently. The worker fails the workflow itself
for exceptions in workflow code (``workflow_failure_exception_types``); what is left is found here
by looking at every experiment the database calls running:

- its workflow is closed without having recorded an end (failed outside workflow code, terminated,
  timed out): the experiment is marked failed with the close event's reason;
- its pending workflow task has failed ``STUCK_TASK_ATTEMPTS`` times: the workflow is terminated and
  the experiment marked failed with the task failure's message.

Every experiments worker runs one; two of them finding the same experiment is harmless (ending an
experiment is idempotent, and terminating a closed workflow is ignored).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sqlalchemy.engine import Engine
from sqlmodel import select
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType, WorkflowTaskFailedCause
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.workflowservice.v1 import GetWorkflowExecutionHistoryReverseRequest
from temporalio.client import Client, WorkflowExecutionDescription, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from fedloom_core.messages import FinishInput
from fedloom_core.storage.db import Experiment
from fedloom_core.storage.repo import session_scope
from workflows.experiment import workflow_id
from workflows.failures import REASON_MAX_CHARS

log = logging.getLogger("fedloom.watchdog")

# A workflow task that failed this many times in a row is not going to succeed by itself.
STUCK_TASK_ATTEMPTS = 3
CHECK_EVERY_S = 10.0
# How many of a run's latest events are read to find why it is stuck or closed.
RECENT_EVENTS = 50
WORKFLOW_TASK_FAILED = "WORKFLOW_TASK_FAILED"
WORKFLOW_CLOSED = "WORKFLOW_CLOSED"
_CLOSED = {WorkflowExecutionStatus.FAILED, WorkflowExecutionStatus.TERMINATED, WorkflowExecutionStatus.TIMED_OUT}

Finish = Callable[[FinishInput], None]


def _running(engine: Engine) -> list[tuple[str, int]]:
    with session_scope(engine) as s:
        rows = s.exec(select(Experiment).where(Experiment.status == "running")).all()
        return [(e.experiment_id, e.current_round) for e in rows]


async def _recent_events(client: Client, desc: WorkflowExecutionDescription) -> list[HistoryEvent]:
    """The run's latest events, newest first."""
    resp = await client.workflow_service.get_workflow_execution_history_reverse(
        GetWorkflowExecutionHistoryReverseRequest(
            namespace=client.namespace,
            execution=WorkflowExecution(workflow_id=desc.id, run_id=desc.run_id),
            maximum_page_size=RECENT_EVENTS,
        )
    )
    return list(resp.history.events)


def task_failure(events: list[HistoryEvent]) -> str | None:
    """Why the latest workflow task failed, from the newest ``WorkflowTaskFailed`` event, if any."""
    for event in events:
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
            attrs = event.workflow_task_failed_event_attributes
            cause = WorkflowTaskFailedCause.Name(attrs.cause).removeprefix("WORKFLOW_TASK_FAILED_CAUSE_")
            return f"the workflow task keeps failing ({cause}): {attrs.failure.message or 'no message'}"
    return None


def close_reason(events: list[HistoryEvent]) -> str:
    """Why a run closed, from its closing event."""
    for event in events:
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED:
            failure = event.workflow_execution_failed_event_attributes.failure
            return f"the workflow failed: {failure.message or failure.cause.message or 'no message'}"
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED:
            return f"the workflow was terminated: {event.workflow_execution_terminated_event_attributes.reason}"
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT:
            return "the workflow timed out"
    return "the workflow ended without recording the experiment's end"


async def check_experiment(client: Client, exp_id: str, rounds_done: int, finish: Finish) -> str | None:
    """Fail ``exp_id`` if its workflow is closed or stuck; return the reason when it did."""
    handle = client.get_workflow_handle(workflow_id(exp_id))
    try:
        desc = await handle.describe()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return None  # not started (yet): the API's start repair handles a start that died
        raise
    if desc.status in _CLOSED:
        reason, code = close_reason(await _recent_events(client, desc)), WORKFLOW_CLOSED
    elif desc.status == WorkflowExecutionStatus.RUNNING:
        pending = desc.raw_description.pending_workflow_task
        if pending.attempt < STUCK_TASK_ATTEMPTS:
            return None
        found = task_failure(await _recent_events(client, desc))
        if found is None:
            return None  # timeouts only (a worker away): not a failure of the workflow
        reason, code = found, WORKFLOW_TASK_FAILED
        try:
            await handle.terminate(reason=reason[:REASON_MAX_CHARS])
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
    else:
        return None
    reason = reason[:REASON_MAX_CHARS]
    log.error("experiment %s failed: %s", exp_id, reason)
    done = max(0, rounds_done - 1)
    inp = FinishInput(experiment_id=exp_id, status="failed", rounds_completed=done, reason=reason, error_code=code)
    await asyncio.to_thread(finish, inp)
    return reason


async def check_all(client: Client, engine: Engine, finish: Finish) -> dict[str, str]:
    """One pass over the running experiments: the ones failed now, with their reasons."""
    failed = {}
    for exp_id, current_round in await asyncio.to_thread(_running, engine):
        try:
            reason = await check_experiment(client, exp_id, current_round, finish)
        except RPCError as exc:  # Temporal unreachable or busy: the next pass tries again
            log.warning("watchdog could not check experiment %s: %s", exp_id, exc)
            continue
        if reason is not None:
            failed[exp_id] = reason
    return failed


async def watch(client: Client, engine: Engine, finish: Finish, every_s: float = CHECK_EVERY_S) -> None:
    """Check the running experiments every ``every_s`` seconds until cancelled."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await check_all(client, engine, finish)
        except Exception:  # noqa: BLE001 - a failed pass (database away) must not end the worker
            log.exception("watchdog pass failed")
