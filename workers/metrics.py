"""The worker's Prometheus metrics: activity timings (an interceptor) and the Temporal SDK's own metrics.

The SDK's metrics arrive through a ``MetricBuffer`` on the worker's Temporal runtime and are copied
into prometheus-client metrics, so they land where the worker's other series do: the shared
``PROMETHEUS_MULTIPROC_DIR`` under ``fedloom serve`` (the API's ``/metrics`` reports them), or the
worker's own port when ``FEDLOOM_WORKER_METRICS_ADDRESS`` is set.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from temporalio import activity
from temporalio.client import Client
from temporalio.runtime import (
    BUFFERED_METRIC_KIND_COUNTER,
    BUFFERED_METRIC_KIND_GAUGE,
    MetricBuffer,
    MetricBufferDurationFormat,
    Runtime,
    TelemetryConfig,
)
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from fedloom_core.settings import Settings

log = logging.getLogger("fedloom.worker.metrics")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)

ACTIVITY_SECONDS = Histogram(
    "fedloom_activity_duration_seconds",
    "Activity executions on this worker, by activity type and outcome",
    ["activity", "outcome"],
    buckets=_STEP_BUCKETS,
)
AGGREGATION_SECONDS = Histogram(
    "fedloom_aggregation_seconds", "Seconds the workers spent aggregating a round's updates", buckets=_STEP_BUCKETS
)
EVALUATION_SECONDS = Histogram(
    "fedloom_evaluation_seconds", "Seconds the workers spent evaluating a round's new model", buckets=_STEP_BUCKETS
)


def record_result(name: str, result: Any, elapsed: float) -> None:
    """Aggregation and evaluation seconds from what a round activity returned."""
    if name == "process_round":
        if getattr(result, "aggregated", None) is not None:
            AGGREGATION_SECONDS.observe(result.aggregation_time)
        evaluation = getattr(result, "evaluation", None)
        if evaluation is not None:
            EVALUATION_SECONDS.observe(evaluation.evaluation_time)
    elif name == "aggregate_round":
        AGGREGATION_SECONDS.observe(elapsed)
    elif name == "evaluate_model":
        EVALUATION_SECONDS.observe(getattr(result, "evaluation_time", elapsed))


class ActivityTimings(Interceptor):
    """Times every activity the worker runs; the round activities also report aggregation and evaluation."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _TimedActivity(next)


class _TimedActivity(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        name = activity.info().activity_type if activity.in_activity() else getattr(input.fn, "__name__", "unknown")
        started = time.perf_counter()
        outcome = "failed"
        try:
            result = await self.next.execute_activity(input)
            outcome = "completed"
            record_result(name, result, time.perf_counter() - started)
            return result
        finally:
            ACTIVITY_SECONDS.labels(name, outcome).observe(time.perf_counter() - started)


_NAME = re.compile(r"[^a-zA-Z0-9_]")
_SDK_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0, 1800.0)


class SdkMetricMirror(Collector):
    """Copies the Temporal SDK's buffered metric updates into prometheus-client metrics.

    Under a multiprocess directory the copies are written there; otherwise the mirror is itself
    the collector that reports them.
    """

    def __init__(self, buffer: MetricBuffer) -> None:
        self.buffer = buffer
        self._metrics: dict[tuple[str, tuple[str, ...]], Any] = {}

    def _metric(self, name: str, kind: int, description: str, labels: tuple[str, ...]) -> Any:
        key = (name, labels)
        metric = self._metrics.get(key)
        if metric is None:
            # Not registered: one SDK metric may come with several label sets; the exposition merges them.
            args = (name, description or name, labels)
            if kind == BUFFERED_METRIC_KIND_COUNTER:
                metric = Counter(*args, registry=None)
            elif kind == BUFFERED_METRIC_KIND_GAUGE:
                metric = Gauge(*args, registry=None, multiprocess_mode="livesum")
            else:
                metric = Histogram(*args, registry=None, buckets=_SDK_BUCKETS)
            self._metrics[key] = metric
        return metric

    def collect(self) -> Iterator[Metric]:
        """The copied metrics, one family per name (an SDK metric may carry several label sets)."""
        merged: dict[str, Metric] = {}
        for metric in list(self._metrics.values()):
            for family in metric.collect():
                if family.name in merged:
                    merged[family.name].samples.extend(family.samples)
                else:
                    merged[family.name] = family
        yield from merged.values()

    def drain(self) -> int:
        """Apply every buffered update; return how many there were."""
        updates = self.buffer.retrieve_updates()
        for update in updates:
            raw = update.metric.name
            name = _NAME.sub("_", raw if raw.startswith("temporal_") else f"temporal_{raw}")
            attrs = {_NAME.sub("_", str(k)): str(v) for k, v in update.attributes.items()}
            labels = tuple(sorted(attrs))
            kind = update.metric.kind
            metric = self._metric(name, kind, update.metric.description or "", labels)
            child = metric.labels(*(attrs[k] for k in labels)) if labels else metric
            if kind == BUFFERED_METRIC_KIND_COUNTER:
                child.inc(update.value)
            elif kind == BUFFERED_METRIC_KIND_GAUGE:
                child.set(update.value)
            else:
                child.observe(update.value)
        return len(updates)

    async def run(self, every_s: float = 1.0) -> None:
        """Drain the buffer until cancelled."""
        while True:
            try:
                self.drain()
            except Exception:  # noqa: BLE001 - metrics must never stop the worker
                log.exception("could not copy Temporal SDK metrics")
            await asyncio.sleep(every_s)


def serve_metrics(address: str) -> Any:
    """Serve this worker's metrics (every process's, under a multiprocess directory) on ``host:port``."""
    host, _, port = address.rpartition(":")
    registry = REGISTRY
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
    log.info("worker metrics on http://%s/metrics", address)
    return server


async def instrument(client: Client, settings: Settings) -> tuple[Client, list[Interceptor]]:
    """The client to build workers on and the interceptors to add, for metrics and experiment tracking.

    When metrics are exported (``PROMETHEUS_MULTIPROC_DIR`` or ``FEDLOOM_WORKER_METRICS_ADDRESS``),
    the workers run on a client of their own whose runtime buffers the SDK's metrics.
    """
    from fedloom_core.tracking import start_exporter

    start_exporter(settings)
    if not (os.environ.get(MULTIPROC_ENV) or settings.worker_metrics_address):
        return client, [ActivityTimings()]
    if settings.worker_metrics_address:
        serve_metrics(settings.worker_metrics_address)
    buffer = MetricBuffer(100_000, duration_format=MetricBufferDurationFormat.SECONDS)
    runtime = Runtime(telemetry=TelemetryConfig(metrics=buffer))
    config = client.config()
    metered = await Client.connect(
        client.service_client.config.target_host,
        namespace=client.namespace,
        data_converter=config["data_converter"],
        runtime=runtime,
    )
    mirror = SdkMetricMirror(buffer)
    if not os.environ.get(MULTIPROC_ENV):
        REGISTRY.register(mirror)
    task = asyncio.get_running_loop().create_task(mirror.run(), name="fedloom-sdk-metrics")
    metered._fedloom_metrics_task = task  # type: ignore[attr-defined]  # kept alive with the client
    return metered, [ActivityTimings()]
