"""An experiment's weights and life beyond one run: initial weights (custom models, warm start) and continuing."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, func
from sqlmodel import select

from api import openapi
from api.current import claim_start
from api.deps import AdminDep, BlobsDep, BodyStreamDep, EngineDep, SettingsDep, TemporalDep, valid_id
from api.multipart import paced
from api.routes.training import launch_experiment, repair_orphans
from fedloom_core.errors import Conflict, NotFound, PayloadTooLarge
from fedloom_core.messages import ExperimentState
from fedloom_core.schemas import StartRequest
from fedloom_core.settings import Settings
from fedloom_core.storage import initial_models
from fedloom_core.storage.blobstore import BlobStore
from fedloom_core.storage.db import (
    ClientEvaluation,
    Experiment,
    GlobalModel,
    Round,
    RoundMetrics,
    Update,
    utcnow,
)
from fedloom_core.storage.keys import state_key
from fedloom_core.storage.model_rows import model_ref
from fedloom_core.storage.repo import emit_event, session_scope

router = APIRouter(tags=["experiments"])

_RAW_MODEL_BODY = {
    "requestBody": {
        "required": True,
        "description": "The round-0 weights: a safetensors file or a torch.save state_dict, as the raw body.",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


async def _spool(body: AsyncIterator[bytes], request: Request, settings: Settings) -> Path:
    """Write the raw request body to a file in the spool directory, refusing it once it passes the upload
    limit (413) or stalls or trickles as an update upload may not (408)."""
    directory, limit = settings.data_dir / "tmp", int(settings.max_upload_mb * 1e6)
    too_large = PayloadTooLarge("Model file too large", f"the model exceeds the upload limit of {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="initial-", dir=directory)
    size = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            async for chunk in paced(body, settings.upload_read_timeout_s, settings.upload_min_rate_kbps * 1000):
                size += len(chunk)
                if size > limit:
                    raise too_large
                fh.write(chunk)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


@router.put(
    "/experiments/{experiment_id}/initial_model",
    responses=openapi.ok(openapi.INITIAL_MODEL, 400, 404, 408, 409, 413),
    openapi_extra=_RAW_MODEL_BODY,
)
async def upload_initial_model(
    experiment_id: str,
    request: Request,
    body: BodyStreamDep,
    engine: EngineDep,
    blobs: BlobsDep,
    settings: SettingsDep,
    _: AdminDep,
) -> dict:
    """Store an experiment's round-0 global model, before it starts (required for a custom architecture)."""
    valid_id(experiment_id, "experiment_id")
    await run_in_threadpool(_created, engine, experiment_id)
    path = await _spool(body, request, settings)
    try:
        return await run_in_threadpool(initial_models.store, engine, blobs, experiment_id, path)
    finally:
        path.unlink(missing_ok=True)


def _created(engine, experiment_id: str) -> Experiment:  # type: ignore[no-untyped-def]
    """The experiment, if it has not started yet (initial weights are fixed once it runs)."""
    with session_scope(engine) as s:
        exp = s.get(Experiment, experiment_id)
    if exp is None:
        raise NotFound("Resource not found", f"experiment '{experiment_id}' does not exist")
    if exp.status != "created":
        raise Conflict(
            "Experiment already started", f"experiment '{experiment_id}' is {exp.status}; its initial model is fixed"
        )
    return exp


class ContinueRequest(BaseModel):
    """The body of ``POST /experiments/{experiment_id}/continue``."""

    model_config = ConfigDict(extra="forbid")
    rounds: int = Field(ge=1, le=100_000, description="How many more rounds to run.")


@router.post("/experiments/{experiment_id}/continue", responses=openapi.ok(openapi.START_RESPONSE, 400, 404, 409))
async def continue_experiment(
    experiment_id: str,
    body: ContinueRequest,
    engine: EngineDep,
    blobs: BlobsDep,
    settings: SettingsDep,
    temporal: TemporalDep,
    _: AdminDep,
) -> dict:
    """Run a stopped or completed experiment for more rounds, from its last global model and strategy state."""
    valid_id(experiment_id, "experiment_id")
    await repair_orphans(engine, temporal)
    exp, req, state = await run_in_threadpool(
        _prepare_continue, engine, blobs, experiment_id, body.rounds, settings.max_running_experiments
    )
    return await launch_experiment(engine, settings, temporal, exp, req, state)


def _prepare_continue(
    engine,
    blobs: BlobStore,
    experiment_id: str,
    more: int,
    limit: int = 1,  # type: ignore[no-untyped-def]
) -> tuple[Experiment, StartRequest, ExperimentState]:
    """Mark the experiment running again; the workflow's state: the next round, the last model, strategy state."""
    with session_scope(engine) as s:
        claim_start(s, limit)
        exp = s.get(Experiment, experiment_id)
        if exp is None:
            raise NotFound("Resource not found", f"experiment '{experiment_id}' does not exist")
        if exp.status not in ("completed", "stopped"):
            raise Conflict(
                "Experiment cannot be continued",
                f"experiment '{experiment_id}' is {exp.status}; only a stopped or completed one continues",
            )
        last = s.exec(select(func.max(RoundMetrics.round)).where(RoundMetrics.experiment_id == experiment_id)).one()
        last = int(last or 0)
        model = s.exec(
            select(GlobalModel).where(GlobalModel.experiment_id == experiment_id, GlobalModel.round == last)
        ).first()
        if model is None:
            raise Conflict("Experiment cannot be continued", f"experiment '{experiment_id}' has no global model yet")
        # A round the stop interrupted starts again from scratch, under the same number.
        for table in (Update, ClientEvaluation, GlobalModel, Round):
            s.exec(delete(table).where(table.experiment_id == experiment_id, table.round > last))
        req = StartRequest.model_validate(exp.config)
        req.experiment_config.rounds = last + more
        exp.status, exp.total_rounds, exp.current_round = "running", last + more, last
        exp.finished_at = exp.final_model_id = exp.stop_reason = exp.error = exp.error_code = None
        exp.config = req.model_dump(mode="json")
        exp.training_config = {**(exp.training_config or {}), "rounds": last + more}
        s.add(exp)
        emit_event(s, type="training_started", experiment_id=experiment_id, total_rounds=last + more)
        s.flush()
        s.refresh(exp)
    key = state_key(experiment_id, last)
    state = ExperimentState(
        next_round=last + 1,
        global_model=model_ref(model),
        strategy_state_key=key if last and blobs.exists(key) else None,
    )
    exp.started_at = exp.started_at or utcnow()
    return exp, req, state
