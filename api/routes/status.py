"""Server status and health."""

from __future__ import annotations

import os
import time

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import func, text
from sqlmodel import select

from api import openapi
from api.deps import BlobsDep, EngineDep, PrincipalDep
from fedloom_core.storage.db import Client, utcnow
from fedloom_core.storage.repo import iso, latest_experiment, session_scope

router = APIRouter(tags=["status"])


def _status_body(engine) -> dict:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        exp = latest_experiment(s)
        registered = s.exec(select(func.count()).select_from(Client)).one()
        active = s.exec(select(func.count()).select_from(Client).where(Client.status == "active")).one()
    cfg = (exp.config if exp else {}) or {}
    ec, tc = cfg.get("experiment_config", {}), cfg.get("training_config", {})
    return {
        "status": exp.status if exp else "idle",
        "version": "1.0.0",
        "current_round": exp.current_round if exp else 0,
        "total_rounds": exp.total_rounds if exp else 0,
        "active_clients": active,
        "registered_clients": registered,
        "experiment_id": exp.experiment_id if exp else None,
        "model_config": {
            "architecture": ec.get("model_architecture"),
            "dataset": ec.get("dataset"),
            "batch_size": tc.get("batch_size"),
        },
        "training_config": {
            "rounds": ec.get("rounds"),
            "min_clients": ec.get("min_clients"),
            "client_fraction": ec.get("client_fraction"),
            "local_epochs": tc.get("local_epochs"),
        },
        "timestamp": iso(utcnow()),
    }


@router.get("/status", responses=openapi.ok(openapi.STATUS))
async def get_status(engine: EngineDep, _: PrincipalDep) -> dict:
    """Current FL server status and configuration."""
    return await run_in_threadpool(_status_body, engine)


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _db_ok(engine) -> None:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


async def _check(fn, *args) -> str:  # type: ignore[no-untyped-def]
    try:
        await run_in_threadpool(fn, *args)
        return "up"
    except Exception as exc:  # noqa: BLE001 - any failure means the component is down
        return f"down: {type(exc).__name__}"


@router.get("/health", responses=openapi.ok(openapi.HEALTH, 503))
async def get_health(request: Request, engine: EngineDep, blobs: BlobsDep) -> JSONResponse:
    """Liveness and dependencies; open without a key so load balancers can probe it."""
    state = request.app.state
    uptime = time.time() - state.started
    cpu = os.times()
    link = state.temporal_link
    temporal_status = "up" if await link.check() else "down: reconnecting"
    components = {
        "database": await _check(_db_ok, engine),
        "blob_store": await _check(blobs.ping),
        "temporal": temporal_status,
    }
    healthy = all(v == "up" for v in components.values())
    body = {
        "status": "healthy" if healthy else "unhealthy",
        "timestamp": iso(utcnow()),
        "uptime": int(uptime),
        "memory_usage": f"{_rss_mb():.0f}MB",
        "cpu_usage": f"{100 * (cpu.user + cpu.system) / max(uptime, 1e-6):.0f}%",
        "components": components,
    }
    if not healthy:
        down = ", ".join(k for k, v in components.items() if v != "up")
        body = {
            "error": {
                "code": "SERVICE_UNAVAILABLE",
                "message": "Service temporarily unavailable",
                "details": f"down: {down}",
                "timestamp": body["timestamp"],
            },
            **body,
        }
    headers = None if healthy else {"Retry-After": str(link.retry_after_s)}
    return JSONResponse(body, status_code=200 if healthy else 503, headers=headers)
