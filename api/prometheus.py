"""``GET /metrics`` (admin key): Prometheus metrics of the API, the workers and the shared database.

Two kinds of series, each correct however many API and worker processes there are:

- What the database records (rounds, updates, rejections, current rounds, round durations) is read
  from it at scrape time by :class:`DatabaseCollector`, so every API replica reports the same truth.
- What one process sees (HTTP request durations, open WebSockets, the workers' activity timings and
  the Temporal SDK's worker metrics) is kept by prometheus-client. Under ``fedloom serve`` its
  processes share ``PROMETHEUS_MULTIPROC_DIR`` and any of them reports the sum; elsewhere each
  process reports its own (a worker on ``FEDLOOM_METRICS_PORT``). See docs/operations.md.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from prometheus_client import REGISTRY, CollectorRegistry, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.engine import Engine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import openapi
from api.deps import AdminDep
from fedloom_core.storage.db import Event, Experiment, RoundMetrics, Update

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Round durations run from a second (tiny models) to hours (stragglers, long deadlines).
ROUND_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

HTTP_SECONDS = Histogram(
    "fedloom_http_request_duration_seconds",
    "HTTP request durations by route template, method and status code",
    ["route", "method", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
WS_LISTENERS = Gauge(
    "fedloom_websocket_listeners",
    "Open WebSocket connections to /ws/events",
    multiprocess_mode="livesum",
)

router = APIRouter(tags=["status"])

# What a rejection's reason text says, reduced to a bounded label (reasons carry numbers).
_REASONS = (
    ("max_update_norm", "max_update_norm"),
    ("max_norm_ratio", "norm_ratio"),
    ("min_cosine_similarity", "cosine_similarity"),
)


def reason_label(reason: str | None) -> str:
    """The rejection's label: which validation bound refused it, else ``rule`` (an update_validation rule)."""
    text = reason or ""
    for needle, label in _REASONS:
        if needle in text:
            return label
    return "rule"


class DatabaseCollector(Collector):
    """Series computed from the shared database at scrape time (the same on every API replica)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        with self.engine.connect() as conn:
            rounds = conn.execute(
                select(RoundMetrics.experiment_id, func.count()).group_by(RoundMetrics.experiment_id)
            ).all()
            results = conn.execute(
                select(Update.validation_status, func.count(), func.coalesce(func.sum(Update.size_bytes), 0)).group_by(
                    Update.validation_status
                )
            ).all()
            reasons = conn.execute(select(Update.reason).where(Update.validation_status == "rejected")).scalars().all()
            rejected_events = conn.execute(
                select(func.count()).select_from(Event).where(Event.type == "update_rejected")
            ).scalar_one()
            experiments = conn.execute(
                select(Experiment.experiment_id, Experiment.status, Experiment.current_round)
            ).all()
            durations = conn.execute(
                select(
                    *(func.sum(case((RoundMetrics.round_duration <= b, 1), else_=0)) for b in ROUND_BUCKETS),
                    func.count(),
                    func.coalesce(func.sum(RoundMetrics.round_duration), 0.0),
                )
            ).one()
        yield from self._rounds(rounds, durations)
        yield from self._updates(results, reasons, rejected_events)
        yield from self._experiments(experiments)

    @staticmethod
    def _rounds(rounds: list, durations: tuple) -> Iterator[Metric]:
        done = CounterMetricFamily(
            "fedloom_rounds_completed",
            "Rounds completed (aggregated and recorded), per experiment",
            labels=["experiment_id"],
        )
        for experiment_id, count in rounds:
            done.add_metric([experiment_id], count)
        yield done
        *cumulative, count, total = durations
        buckets = [(repr(b), int(c or 0)) for b, c in zip(ROUND_BUCKETS, cumulative, strict=True)]
        hist = HistogramMetricFamily("fedloom_round_duration_seconds", "Wall-clock duration of completed rounds")
        hist.add_metric([], [*buckets, ("+Inf", int(count))], float(total))
        yield hist

    @staticmethod
    def _updates(results: list, reasons: list, rejected_events: int) -> Iterator[Metric]:
        received = CounterMetricFamily(
            "fedloom_updates_received",
            "Model updates stored, by result (accepted, rejected by a round's validation, pending)",
            labels=["result"],
        )
        size = CounterMetricFamily("fedloom_upload_bytes", "Bytes of stored model updates")
        counts = {"accepted": 0, "rejected": 0, "pending": 0}
        stored_bytes = 0
        for status, count, nbytes in results:
            counts[status] = counts.get(status, 0) + count
            stored_bytes += int(nbytes)
        for status, count in sorted(counts.items()):
            received.add_metric([status], count)
        size.add_metric([], stored_bytes)
        yield received
        yield size
        by_reason = {label: 0 for _needle, label in _REASONS} | {"rule": 0}
        for reason in reasons:
            by_reason[reason_label(reason)] += 1
        # Every rejection is announced once; those not stored as updates were refused at upload.
        by_reason["invalid_upload"] = max(0, rejected_events - len(reasons))
        rejections = CounterMetricFamily(
            "fedloom_update_rejections", "Rejected model updates, by reason", labels=["reason"]
        )
        for label, count in sorted(by_reason.items()):
            rejections.add_metric([label], count)
        yield rejections

    @staticmethod
    def _experiments(experiments: list) -> Iterator[Metric]:
        current = GaugeMetricFamily(
            "fedloom_current_round", "The round each experiment is in (or ended at)", labels=["experiment_id", "status"]
        )
        by_status: dict[str, int] = {}
        for experiment_id, status, rnd in experiments:
            current.add_metric([experiment_id, status], rnd)
            by_status[status] = by_status.get(status, 0) + 1
        yield current
        counts = GaugeMetricFamily("fedloom_experiments", "Experiments by status", labels=["status"])
        for status, count in sorted(by_status.items()):
            counts.add_metric([status], count)
        yield counts


def render(engine: Engine) -> bytes:
    """The exposition text: the database's series, then this process's or every process's."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(engine))
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(registry) + generate_latest(REGISTRY)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **openapi.COMMON_ERRORS,
    },
)
async def metrics(request: Request, _admin: AdminDep) -> Response:
    """Prometheus metrics in the text exposition format (admin key)."""
    body = await run_in_threadpool(render, request.app.state.engine)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


# A path that no route matched is reported under one label, so unknown URLs cannot grow the series.
_UNMATCHED = "<unmatched>"
_SAFE = re.compile(r"[^\w{}/.:-]")
# Any other method a client sends is counted as OTHER: the label's values stay bounded.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_template(scope: Scope) -> str:
    """The matched route's path template with its router prefix (``/api/v1/clients/{client_id}``)."""
    template = getattr(scope.get("route"), "path_format", None)
    if not template:
        return _UNMATCHED
    # An included router's route knows its own path only; the prefix is what the path has before it.
    rendered = template
    for key, value in (scope.get("path_params") or {}).items():
        rendered = rendered.replace("{" + key + "}", str(value))
    path = scope.get("path", "")
    if path != rendered and path.endswith(rendered):
        template = path[: len(path) - len(rendered)] + template
    return _SAFE.sub("_", template)


class RequestMetrics:
    """ASGI middleware: each HTTP request's duration by route template, and open WebSockets."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            HTTP_SECONDS.labels(route_template(scope), method, str(status)).observe(time.perf_counter() - started)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        accepted = False

        async def send_counted(message: Message) -> None:
            nonlocal accepted
            if message["type"] == "websocket.accept" and not accepted:
                accepted = True
                WS_LISTENERS.inc()
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            if accepted:
                WS_LISTENERS.dec()


def install(app: FastAPI) -> None:
    """Serve ``GET /metrics`` and time every request."""
    app.include_router(router)
    app.add_middleware(RequestMetrics)
