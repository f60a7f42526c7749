"""Worker entry point: which workflows and activities run on which task queue."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
from collections.abc import Sequence
from typing import Any

from temporalio.client import Client
from temporalio.worker import Interceptor, Worker

from activities.aggregation import AggregationActivities
from activities.experiment import ExperimentActivities
from fedloom_core.messages import AGGREGATION_TASK_QUEUE, WORKFLOW_TASK_QUEUE
from fedloom_core.settings import Settings
from fedloom_core.storage.blobstore import open_blob_store
from fedloom_core.storage.db import create_schema, make_engine
from fedloom_core.temporal import ensure_search_attributes
from workers import metrics as worker_metrics
from workers import retention, watchdog
from workflows.experiment import ExperimentWorkflow

log = logging.getLogger("fedloom.worker")
QUEUES = ("experiments", "aggregation")
# Any exception in workflow code (a bug, a broken replay) fails the workflow with its message, which
# ends the experiment as failed; by default Temporal would retry the workflow task forever.
WORKFLOW_FAILURES: tuple[type[BaseException], ...] = (Exception,)


def build_workers(
    client: Client,
    settings: Settings,
    queues: Sequence[str] = QUEUES,
    *,
    workflow_queue: str = WORKFLOW_TASK_QUEUE,
    aggregation_queue: str = AGGREGATION_TASK_QUEUE,
    interceptors: Sequence[Interceptor] = (),
    workflow_failures: Sequence[type[BaseException]] = WORKFLOW_FAILURES,
) -> list[Worker]:
    """Workers for the named queues, sharing one database engine and blob store.

    ``interceptors`` wrap every activity and workflow call; the fault-injection tests pass theirs here.
    ``workflow_failures``: exceptions in workflow code that fail the workflow instead of its task.
    """
    engine = make_engine(settings.database_url)
    create_schema(engine)
    blobs = open_blob_store(settings.blob_url, settings.s3_endpoint_url)
    acts = ExperimentActivities(engine, blobs)
    heavy = AggregationActivities(engine, blobs)
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="fedloom-act")
    workers = []
    if "experiments" in queues:
        workers.append(
            Worker(
                client,
                task_queue=workflow_queue,
                workflows=[ExperimentWorkflow],
                workflow_failure_exception_types=workflow_failures,
                activities=acts.all(),
                activity_executor=executor,
                max_concurrent_activities=16,
                interceptors=interceptors,
            )
        )
    if "aggregation" in queues:
        workers.append(
            Worker(
                client,
                task_queue=aggregation_queue,
                activities=[heavy.process_round, heavy.validate_updates, heavy.aggregate_round, heavy.evaluate_model],
                activity_executor=executor,
                # Aggregation and evaluation are CPU- and memory-bound: one at a time per process.
                max_concurrent_activities=1,
                interceptors=interceptors,
            )
        )
    return workers


def limit_torch_threads() -> None:
    """Run torch single-threaded in the worker unless ``OMP_NUM_THREADS`` asks for more.

    The worker's torch work is small operators (evaluation on the test split, memory-bound sums) on
    cores shared with the API, Temporal and the database; intra-op threads there mostly wait for each
    other (measurements in docs/benchmarks.md).
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    torch.set_num_threads(1)


def warm_up() -> None:
    """Import the evaluation path and load the built-in test split before the first round needs them.

    Otherwise the first round's evaluation also pays for importing scikit-learn's dataset loaders and
    torch's lazy initialisation.
    """
    from fedloom_core.learning.datasets import load_test
    from fedloom_core.learning.training import evaluate
    from fedloom_core.learning.zoo import build_model

    evaluate(build_model("MLP", (8, 8, 1), 10), load_test("digits"))


def _prepare_torch() -> None:
    limit_torch_threads()
    warm_up()


def _log_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("warm-up failed (the first round pays for it instead): %s", future.exception())


async def run_workers(
    client: Client, settings: Settings, queues: Sequence[str] = QUEUES, interceptors: Sequence[Interceptor] = ()
) -> None:
    """Run the workers until cancelled."""
    if "aggregation" in queues:
        # In the background, torch's import (about 2 s) included: the workers start polling at once.
        warming = asyncio.get_running_loop().run_in_executor(None, _prepare_torch)
        warming.add_done_callback(_log_failure)
    else:
        limit_torch_threads()
    # A workflow that upserts an unregistered search attribute stalls: register them first.
    await ensure_search_attributes(client, settings.temporal_namespace)
    # Activity timings, the SDK's metrics and experiment tracking (workers/metrics.py).
    client, measured = await worker_metrics.instrument(client, settings)
    workers = build_workers(client, settings, queues, interceptors=[*interceptors, *measured])
    log.info("worker polling %s", ", ".join(w.task_queue for w in workers))
    tasks = [w.run() for w in workers]
    if "experiments" in queues:
        # Experiments whose workflow is stuck or closed without an end are failed with the reason.
        engine = make_engine(settings.database_url)
        acts = ExperimentActivities(engine, open_blob_store(settings.blob_url, settings.s3_endpoint_url))
        tasks.append(watchdog.watch(client, engine, acts.finish_experiment))
        # Deletes what the storage retention rules let go, from the database's committed rounds.
        tasks.append(retention.sweep(engine, acts.blobs, settings))
    await asyncio.gather(*tasks)


def run_beside_api(server: Any, settings: Settings) -> int:
    """Serve the API (a ``uvicorn.Server``) and run every worker in this one process and event loop.

    ``fedloom serve`` runs this by default: one Python process instead of two (about 140 MB less).
    The process ends when the API stops, or with an error when the workers fail, so that serve's
    supervisor restarts it whole.
    """
    from fedloom_core.temporal import connect_with_retry

    async def workers() -> None:
        client = await connect_with_retry(settings.temporal_address or "127.0.0.1:7233", settings.temporal_namespace)
        await run_workers(client, settings)

    async def main() -> int:
        running = asyncio.create_task(workers())
        failed: list[BaseException] = []

        def _stop_api(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:
                failed.append(task.exception())  # type: ignore[arg-type]
                log.error("the workers stopped: %s", task.exception())
                server.should_exit = True

        running.add_done_callback(_stop_api)
        try:
            await server.serve()
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await running
        return 1 if failed else 0

    try:
        # The API's own event loop (uvloop where installed), as ``uvicorn.run`` would pick.
        with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
            return runner.run(main())
    except KeyboardInterrupt:
        return 0
