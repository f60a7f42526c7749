"""The FastAPI application: lifespan (engine, blob store, one Temporal client), routers, errors."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from temporalio.client import Client as TemporalClient
from temporalio.service import RPCError

from api import errors, openapi, prometheus, ratelimit
from api.auth import hash_key
from api.body_limits import BodyLimit
from api.routes import (
    clients,
    dashboard,
    evaluations,
    events,
    experiments,
    lifecycle,
    metrics,
    models,
    status,
    training,
    upload_sessions,
)
from fedloom_core.admin_key import load_or_create_admin_key
from fedloom_core.settings import Settings
from fedloom_core.storage import retention
from fedloom_core.storage.blobstore import open_blob_store
from fedloom_core.storage.db import create_schema, make_engine
from fedloom_core.temporal import API_RPC_RETRY, TemporalLink, TemporalUnavailable, connect, is_unreachable

log = logging.getLogger("fedloom.api")
API_PREFIX = "/api/v1"
VERSION = "1.0.0"


async def _connect_temporal(settings: Settings) -> TemporalClient | None:
    """One attempt at the process's Temporal client (the link retries in the background)."""
    return await connect(settings.temporal_address or "127.0.0.1:7233", settings.temporal_namespace, API_RPC_RETRY)


def _temporal_down(app: FastAPI, details: str) -> JSONResponse:
    link: TemporalLink = app.state.temporal_link
    return errors.error_response(
        503,
        "SERVICE_UNAVAILABLE",
        "Service temporarily unavailable",
        details,
        headers={"Retry-After": str(link.retry_after_s)},
    )


def _install_temporal_errors(app: FastAPI) -> None:
    """503 with Retry-After while Temporal is down; an RPC that finds it unreachable starts a reconnect."""

    @app.exception_handler(TemporalUnavailable)
    async def _not_connected(request: Request, exc: TemporalUnavailable) -> JSONResponse:
        return _temporal_down(request.app, exc.details)

    @app.exception_handler(RPCError)
    async def _rpc(request: Request, exc: RPCError) -> JSONResponse:
        if not is_unreachable(exc):
            log.exception("Temporal refused a request")
            return errors.error_response(500, "INTERNAL_ERROR", "Server internal error", "RPCError")
        request.app.state.temporal_link.mark_down(f"{exc.status.name if exc.status else 'RPC'}: {exc.message}")
        return _temporal_down(request.app, "the Temporal server is not reachable")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for ``settings`` (read from the environment when omitted)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.started = time.time()
        app.state.engine = make_engine(settings.database_url)
        await asyncio.to_thread(create_schema, app.state.engine)
        app.state.blobs = open_blob_store(settings.blob_url, settings.s3_endpoint_url)
        # Spool files of uploads an earlier process was receiving when it died.
        await asyncio.to_thread(
            retention.clean_spool,
            settings.data_dir / "tmp",
            app.state.started,
            session_ttl_s=settings.upload_session_ttl_s,
        )
        admin_key, _ = load_or_create_admin_key(settings.data_dir, settings.admin_api_key)
        app.state.admin_key_hash = hash_key(admin_key)
        # Temporal is connected in the background: the API serves at once, and routes that need
        # Temporal answer 503 until it is reachable (again).
        app.state.temporal_link = link = TemporalLink(lambda: _connect_temporal(settings))
        link.start()
        yield
        await link.stop()
        app.state.engine.dispose()

    app = FastAPI(
        title="fedloom FL Framework API",
        version=VERSION,
        description="Federated-learning orchestration: clients, training, models, metrics.",
        lifespan=lifespan,
    )
    errors.install(app)
    _install_temporal_errors(app)
    for router in (
        status.router,
        clients.router,
        training.router,
        models.router,
        upload_sessions.router,
        evaluations.router,
        metrics.router,
        experiments.router,
        lifecycle.router,
        dashboard.api_router,
    ):
        app.include_router(router, prefix=API_PREFIX, responses=openapi.COMMON_ERRORS)
    app.include_router(events.router)
    # GET /metrics (admin key) and per-route request timings: api/prometheus.py.
    prometheus.install(app)
    app.include_router(dashboard.router)
    ratelimit.install(app, settings)
    # Added last, so it runs first: no body is read past its cap, whatever else the request needs.
    app.add_middleware(
        BodyLimit, json_limit=settings.max_json_kb * 1024, upload_limit=int(settings.max_upload_mb * 1e6)
    )
    if settings.cors_origin_list:
        # Outermost: preflights are answered before any limit, and every answer (a 413 or 429 too)
        # carries the headers a page of an allowed origin needs to read it.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=[
                "Retry-After",
                "X-RateLimit-Limit",
                "X-RateLimit-Remaining",
                "X-RateLimit-Reset",
                "X-Model-SHA256",
            ],
            max_age=600,
        )
    return app
