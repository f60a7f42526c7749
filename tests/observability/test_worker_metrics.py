"""The worker's metrics without a server: the Temporal runtime's buffered metrics copied into
prometheus-client, and the aggregation and evaluation seconds taken from round activities' results."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from temporalio.runtime import MetricBuffer, MetricBufferDurationFormat, Runtime, TelemetryConfig

from fedloom_core.messages import Evaluation, ProcessRoundOutput, ValidationOutcome
from fedloom_tools.launch import free_port
from workers.metrics import SdkMetricMirror, record_result, serve_metrics

pytestmark = pytest.mark.unit


def _samples(mirror: SdkMetricMirror) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in mirror._metrics.values()
        for family in metric.collect()
        for s in family.samples
    }


def test_the_runtimes_buffered_metrics_become_prometheus_series() -> None:
    buffer = MetricBuffer(1000, duration_format=MetricBufferDurationFormat.SECONDS)
    meter = Runtime(telemetry=TelemetryConfig(metrics=buffer)).metric_meter
    polls = meter.create_counter("fl_test_polls", "polls").with_additional_attributes({"task_queue": "q1"})
    polls.add(3)
    polls.add(2)
    meter.create_gauge("fl_test_slots", "slots").set(7, {"worker_type": "ActivityWorker"})
    latency = meter.create_histogram_timedelta("fl_test_latency", "latency")
    latency.record(timedelta(milliseconds=250))
    latency.record(timedelta(seconds=3))
    mirror = SdkMetricMirror(buffer)
    assert mirror.drain() == 5
    got = _samples(mirror)
    base = (("service_name", "temporal-core-sdk"),)
    assert got[("temporal_fl_test_polls_total", (*base, ("task_queue", "q1")))] == 5
    assert got[("temporal_fl_test_slots", (*base, ("worker_type", "ActivityWorker")))] == 7
    assert got[("temporal_fl_test_latency_count", base)] == 2
    assert got[("temporal_fl_test_latency_sum", base)] == pytest.approx(3.25)  # seconds, not milliseconds
    assert got[("temporal_fl_test_latency_bucket", (("le", "0.5"), *base))] == 1
    assert mirror.drain() == 0  # drained once
    # Outside a multiprocess directory the mirror reports them itself, one family per name.
    meter.create_counter("fl_test_polls", "polls").add(1, {"task_queue": "q2"})
    mirror.drain()
    registry = CollectorRegistry()
    registry.register(mirror)
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    polls = [
        (s.labels["task_queue"], s.value)
        for s in families["temporal_fl_test_polls"].samples
        if s.name.endswith("_total")
    ]
    assert sorted(polls) == [("q1", 5.0), ("q2", 1.0)]


def _count(name: str) -> float:
    return REGISTRY.get_sample_value(f"{name}_count") or 0.0


def test_round_activities_report_aggregation_and_evaluation_seconds() -> None:
    before = {n: _count(n) for n in ("fedloom_aggregation_seconds", "fedloom_evaluation_seconds")}
    agg_sum = REGISTRY.get_sample_value("fedloom_aggregation_seconds_sum") or 0.0
    fused = ProcessRoundOutput.model_construct(
        validation=ValidationOutcome(accepted=[]),
        aggregated=object(),
        evaluation=Evaluation(accuracy=0.9, loss=0.2, evaluation_time=0.4),
        aggregation_time=1.25,
    )
    record_result("process_round", fused, elapsed=9.0)
    # A round that failed validation aggregated nothing: no observation.
    record_result("process_round", ProcessRoundOutput(validation=ValidationOutcome(accepted=[])), elapsed=1.0)
    record_result("evaluate_model", Evaluation(accuracy=None, loss=None, evaluation_time=0.3), elapsed=2.0)
    record_result("aggregate_round", object(), elapsed=0.7)
    record_result("open_round", None, elapsed=0.1)
    assert _count("fedloom_aggregation_seconds") - before["fedloom_aggregation_seconds"] == 2
    assert _count("fedloom_evaluation_seconds") - before["fedloom_evaluation_seconds"] == 2
    agg_after = REGISTRY.get_sample_value("fedloom_aggregation_seconds_sum")
    assert agg_after - agg_sum == pytest.approx(1.25 + 0.7)


def test_a_worker_serves_its_metrics_on_its_own_port() -> None:
    record_result("aggregate_round", object(), elapsed=0.2)
    port = free_port()
    server = serve_metrics(f"127.0.0.1:{port}")
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        server.shutdown()
        server.server_close()
    assert "fedloom_aggregation_seconds_count" in text and "fedloom_activity_duration_seconds" in text
