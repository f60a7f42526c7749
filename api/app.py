"""The FastAPI application: lifespan (engine, blob store, one Temporal client), routers, errors."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from temporalio.client import Client as TemporalClient

from api import errors, openapi, ratelimit
from api.auth import hash_key, load_or_create_admin_key
from api.body_limits import BodyLimit
from api.routes import clients, evaluations, events, experiments, lifecycle, metrics, models, status, training
from fedloom_core.settings import Settings
from fedloom_core.storage.blobstore import open_blob_store
from fedloom_core.storage.db import create_schema, make_engine
from fedloom_core.temporal import connect_with_retry

log = logging.getLogger("fedloom.api")
API_PREFIX = "/api/v1"
VERSION = "1.0.0"


async def _connect_temporal(settings: Settings, attempts: int = 30) -> TemporalClient | None:
    """The process's Temporal client, or None (health then reports Temporal down) if it stays unreachable."""
    address = settings.temporal_address or "127.0.0.1:7233"
    try:
        return await connect_with_retry(address, settings.temporal_namespace, attempts=attempts)
    except Exception as exc:  # noqa: BLE001 - the API still serves what needs no Temporal
        log.error("cannot reach Temporal at %s: %s", address, exc)
        return None


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
        admin_key, _ = load_or_create_admin_key(settings.data_dir, settings.admin_api_key)
        app.state.admin_key_hash = hash_key(admin_key)
        app.state.temporal = await _connect_temporal(settings)
        yield
        app.state.engine.dispose()

    app = FastAPI(
        title="fedloom FL Framework API",
        version=VERSION,
        description="Federated-learning orchestration: clients, training, models, metrics.",
        lifespan=lifespan,
    )
    errors.install(app)
    for router in (
        status.router,
        clients.router,
        training.router,
        models.router,
        evaluations.router,
        metrics.router,
        experiments.router,
        lifecycle.router,
    ):
        app.include_router(router, prefix=API_PREFIX, responses=openapi.COMMON_ERRORS)
    app.include_router(events.router)
    ratelimit.install(app, settings)
    # Added last, so it runs first: no body is read past its cap, whatever else the request needs.
    app.add_middleware(
        BodyLimit, json_limit=settings.max_json_kb * 1024, upload_limit=int(settings.max_upload_mb * 1e6)
    )
    return app
