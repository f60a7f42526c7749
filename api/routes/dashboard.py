"""The operator dashboard: ``GET /dashboard`` and its static files, and the per-round client scores it plots.

The page (``api/static/dashboard/``) is static and holds no secret: it asks for a key, or reads it
from the URL fragment, and calls the API with it like any other client. See ``docs/operators.md``.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlmodel import select

from api import openapi
from api.deps import AdminDep, EngineDep, valid_id
from fedloom_core.errors import NotFound
from fedloom_core.storage.db import ClientRoundScore, Experiment
from fedloom_core.storage.repo import latest_experiment, session_scope

STATIC_DIR = Path(__file__).resolve().parent.parent / "static" / "dashboard"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}
# One or two path segments of plain names with a known suffix: nothing else is looked up on disk.
ASSET = re.compile(r"^(?:[a-z0-9_-]{1,40}/)?[A-Za-z0-9_.-]{1,80}\.(?:html|js|css|txt)$")
# Everything the page needs comes from this origin; no inline script or style, no framing.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["dashboard"], include_in_schema=False)
api_router = APIRouter(tags=["metrics"])


def _file(name: str) -> FileResponse:
    path = (STATIC_DIR / name).resolve()
    if not ASSET.match(name) or STATIC_DIR not in path.parents or not path.is_file():
        raise NotFound("Resource not found", f"no dashboard file {name!r}")
    return FileResponse(path, media_type=CONTENT_TYPES[path.suffix], headers=HEADERS)


@router.get("/dashboard")
async def dashboard() -> FileResponse:
    """The dashboard page."""
    return _file("index.html")


@router.get("/dashboard/{name:path}")
async def dashboard_asset(name: str) -> FileResponse:
    """A script, style sheet or licence file of the dashboard."""
    return _file(name)


def _scores(engine, experiment_id: str | None) -> dict:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        exp = s.get(Experiment, experiment_id) if experiment_id is not None else latest_experiment(s)
        if exp is None:
            raise NotFound("Resource not found", f"experiment '{experiment_id or '(latest)'}' does not exist")
        rows = s.exec(
            select(ClientRoundScore)
            .where(ClientRoundScore.experiment_id == exp.experiment_id)
            .order_by(ClientRoundScore.round, ClientRoundScore.client_id)  # type: ignore[arg-type]
        ).all()
    return {
        "experiment_id": exp.experiment_id,
        "scores": [
            {
                "round": r.round,
                "client_id": r.client_id,
                "delivered": r.delivered,
                "accepted": r.accepted,
                "reason": r.reason,
                "trust_score": r.trust_score,
                "contribution": r.contribution,
            }
            for r in rows
        ],
    }


SCORES_EXAMPLE = {
    "experiment_id": "exp_2025_001",
    "scores": [
        {
            "round": 1,
            "client_id": "client-001",
            "delivered": True,
            "accepted": True,
            "reason": None,
            "trust_score": 0.97,
            "contribution": 0.52,
        }
    ],
}


@api_router.get("/metrics/scores", responses=openapi.ok(SCORES_EXAMPLE, 400, 404))
async def client_scores(engine: EngineDep, _: AdminDep, experiment_id: str | None = Query(default=None)) -> dict:
    """Extension: each selected client's trust and contribution after every completed round of an experiment.

    One entry per round and selected client, in round order: whether it delivered, whether its update
    was accepted (else ``reason``), its trust score after the round and its contribution share (null
    when it contributed nothing). Default: the latest experiment.
    """
    if experiment_id is not None:
        valid_id(experiment_id, "experiment_id")
    return await run_in_threadpool(_scores, engine, experiment_id)
