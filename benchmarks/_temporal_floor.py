"""What Temporal alone costs a round on this machine: the experiment workflow's shape, with no work in it.

``FloorWorkflow`` waits for a signal, runs a local activity, then a normal activity on a second task
queue (as ``process_round`` runs on the aggregation queue), then another local activity, once per
round; every activity returns at once. Timed from its history against the same dev server as the
benchmark's ``fedloom serve``, the gap from a round's signal to the end of that round's last workflow
task is the floor under the server overhead that Temporal's round trips set here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import statistics
import time
import uuid
from datetime import timedelta
from typing import Any

from temporalio import activity, workflow

_TIMEOUT = timedelta(seconds=30)


@activity.defn(name="floor_noop")
def floor_noop(value: int) -> int:
    return value


@workflow.defn(name="FloorWorkflow")
class FloorWorkflow:
    def __init__(self) -> None:
        self._signals = 0

    @workflow.run
    async def run(self, rounds: int, work_queue: str) -> int:
        for rnd in range(rounds):
            await workflow.wait_condition(lambda rnd=rnd: self._signals > rnd)
            await workflow.execute_local_activity(floor_noop, rnd, start_to_close_timeout=_TIMEOUT)
            await workflow.execute_activity(floor_noop, rnd, task_queue=work_queue, start_to_close_timeout=_TIMEOUT)
            await workflow.execute_local_activity(floor_noop, rnd, start_to_close_timeout=_TIMEOUT)
        return rounds

    @workflow.signal
    def go(self) -> None:
        self._signals += 1


def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000 if values else float("nan")


async def measure_floor(address: str, rounds: int = 20, gap_s: float = 0.2) -> dict[str, Any]:
    """Run ``FloorWorkflow`` for ``rounds`` rounds against ``address``; medians in milliseconds."""
    from temporalio.client import Client
    from temporalio.worker import Worker

    client = await Client.connect(address)
    run_id = uuid.uuid4().hex[:12]
    main_queue, work_queue = f"floor-{run_id}", f"floor-work-{run_id}"
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="floor")
    signal_rpc: list[float] = []
    async with (
        Worker(
            client,
            task_queue=main_queue,
            workflows=[FloorWorkflow],
            activities=[floor_noop],
            activity_executor=executor,
        ),
        Worker(client, task_queue=work_queue, activities=[floor_noop], activity_executor=executor),
    ):
        handle = await client.start_workflow(
            FloorWorkflow.run, args=[rounds, work_queue], id=f"floor-{run_id}", task_queue=main_queue
        )
        for _ in range(rounds):
            await asyncio.sleep(gap_s)
            started = time.perf_counter()
            await handle.signal(FloorWorkflow.go)
            signal_rpc.append(time.perf_counter() - started)
        await handle.result()
        history = await handle.fetch_history()
    executor.shutdown()
    return {"rounds": rounds, "signal_rpc_ms": _median_ms(signal_rpc), **_history_medians(history)}


def _history_medians(history: Any) -> dict[str, float]:
    """Per round: signal to the end of the round's last workflow task; and the parts of the trip."""
    per_round, dispatch, task, activity_dispatch = [], [], [], []
    signalled = task_scheduled = task_started = activity_scheduled = None
    tasks_since_signal = 0
    for ev in history.events:
        t = ev.event_time.seconds + ev.event_time.nanos / 1e9
        kind = ev.WhichOneof("attributes")
        if kind == "workflow_execution_signaled_event_attributes":
            signalled, tasks_since_signal = t, 0
        elif kind == "workflow_task_scheduled_event_attributes":
            task_scheduled = t
        elif kind == "workflow_task_started_event_attributes" and task_scheduled is not None:
            task_started = t
            dispatch.append(t - task_scheduled)
        elif kind == "workflow_task_completed_event_attributes" and task_started is not None:
            task.append(t - task_started)
            tasks_since_signal += 1
            # The round's second workflow task (after the activity) ends it.
            if signalled is not None and tasks_since_signal == 2:
                per_round.append(t - signalled)
                signalled = None
        elif kind == "activity_task_scheduled_event_attributes":
            activity_scheduled = t
        elif kind == "activity_task_started_event_attributes" and activity_scheduled is not None:
            activity_dispatch.append(t - activity_scheduled)
    return {
        "round_ms": _median_ms(per_round),
        "workflow_task_dispatch_ms": _median_ms(dispatch),
        "workflow_task_ms": _median_ms(task),
        "activity_dispatch_ms": _median_ms(activity_dispatch),
    }


if __name__ == "__main__":
    import sys

    print(asyncio.run(measure_floor(sys.argv[1])))
