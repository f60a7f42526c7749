"""An experiment's weights and life beyond one run: initial weights (custom models, warm start) and continuing.

Initial weights come in one request (``PUT .../initial_model``) or through a resumable upload session
(``.../initial_model/sessions``, the machinery of client updates' sessions); both end in ``initial_models.store``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, func
from sqlmodel import select

from api import openapi
from api.current import claim_start
from api.deps import AdminDep, BlobsDep, BodyStreamDep, EngineDep, SettingsDep, TemporalDep, valid_id
from api.multipart import paced
from api.routes import upload_chunks as chunks
from api.routes.training import launch_experiment, repair_orphans
from api.routes.upload_sessions import FinishSession
from fedloom_core.errors import Conflict, FedloomError, NotFound, PayloadTooLarge
from fedloom_core.messages import ExperimentState
from fedloom_core.schemas import StartRequest
from fedloom_core.settings import Settings
from fedloom_core.storage import initial_models
from fedloom_core.storage import upload_sessions as sessions
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


# -- resumable uploads of the initial model ------------------------------------------------------

INITIAL_SESSION = {
    "upload_id": "upl_5f0c1a2b3c4d5e6f708192a3b4c5d6e7",
    "experiment_id": "exp_2025_001",
    "size": 1000000000,
    "offset": 0,
    "complete": False,
    "chunk_max_bytes": 64000000,
    "expires_at": "2025-01-17T10:28:00Z",
    "upload_url": "/api/v1/experiments/exp_2025_001/initial_model/sessions/upl_5f0c1a2b3c4d5e6f708192a3b4c5d6e7",
    "model_id": None,
}
_SESSIONS = "/experiments/{experiment_id}/initial_model/sessions"


class OpenInitialSession(BaseModel):
    """The body of ``POST /experiments/{experiment_id}/initial_model/sessions``."""

    model_config = ConfigDict(extra="forbid")
    size: int = Field(ge=1, description="The file's size in bytes, at most FEDLOOM_MAX_UPLOAD_MB.")
    sha256: str | None = Field(
        default=None, pattern="^[0-9a-f]{64}$", description="If given, the finished file must have this digest."
    )


def _session_state(sess: sessions.Session, settings: Settings) -> JSONResponse:
    fields = {"upload_id": sess.upload_id, "experiment_id": sess.experiment_id}
    url = f"/api/v1/experiments/{sess.experiment_id}/initial_model/sessions/{sess.upload_id}"
    return chunks.state(sess, settings, fields, url, {"model_id": (sess.result or {}).get("model_id")})


async def _load_session(settings: Settings, experiment_id: str, upload_id: str) -> sessions.Session:
    valid_id(experiment_id, "experiment_id")
    valid_id(upload_id, "upload_id")
    return await chunks.load(settings, upload_id, experiment_id, sessions.KIND_INITIAL_MODEL)


@router.post(
    _SESSIONS,
    status_code=201,
    responses={
        201: {"content": {"application/json": {"example": INITIAL_SESSION}}},
        **openapi.errors(400, 404, 409, 413),
    },
)
async def open_initial_session(
    experiment_id: str, body: OpenInitialSession, engine: EngineDep, settings: SettingsDep, _: AdminDep
) -> JSONResponse:
    """Extension: open a resumable upload of the round-0 weights, ``size`` bytes, before the experiment starts."""
    valid_id(experiment_id, "experiment_id")
    await run_in_threadpool(_created, engine, experiment_id)
    chunks.check_size(body.size, settings)
    await chunks.sweep(settings)
    sess = await run_in_threadpool(
        lambda: sessions.create(
            settings.data_dir / "tmp",
            client_id="",
            experiment_id=experiment_id,
            round=0,
            size=body.size,
            metrics={},
            sha256=body.sha256,
            kind=sessions.KIND_INITIAL_MODEL,
        )
    )
    response = _session_state(sess, settings)
    response.status_code = 201
    response.headers["Location"] = f"/api/v1/experiments/{experiment_id}/initial_model/sessions/{sess.upload_id}"
    return response


@router.get(_SESSIONS + "/{upload_id}", responses=openapi.ok(INITIAL_SESSION, 400, 404))
async def initial_session_state(experiment_id: str, upload_id: str, settings: SettingsDep, _: AdminDep) -> Response:
    """Extension: the session's committed ``offset`` (also in the ``Upload-Offset`` header)."""
    return _session_state(await _load_session(settings, experiment_id, upload_id), settings)


@router.head(_SESSIONS + "/{upload_id}", responses=openapi.errors(400, 404))
async def initial_session_offset(experiment_id: str, upload_id: str, settings: SettingsDep, _: AdminDep) -> Response:
    """Extension: the committed offset and the size, as the headers ``Upload-Offset`` and ``Upload-Length``."""
    return _session_state(await _load_session(settings, experiment_id, upload_id), settings)


@router.put(
    _SESSIONS + "/{upload_id}",
    responses=openapi.ok(INITIAL_SESSION, 400, 404, 408, 409, 413),
    openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {}}}},
)
async def put_initial_chunk(
    experiment_id: str, upload_id: str, request: Request, body: BodyStreamDep, settings: SettingsDep, _: AdminDep
) -> JSONResponse:
    """Extension: append the bytes ``Content-Range`` names, from the committed offset; a chunk cut short
    by a dropped connection or a timeout keeps what arrived."""
    sess = await _load_session(settings, experiment_id, upload_id)
    if sess.result is not None:
        raise Conflict(
            "Upload session finished", f"upload session '{upload_id}' was stored as {sess.result['model_id']}"
        )
    await chunks.receive_chunk(request, body, sess, settings)
    return _session_state(sess, settings)


@router.post(_SESSIONS + "/{upload_id}/complete", responses=openapi.ok(openapi.INITIAL_MODEL, 400, 404, 409))
async def finish_initial_session(
    experiment_id: str,
    upload_id: str,
    engine: EngineDep,
    blobs: BlobsDep,
    settings: SettingsDep,
    _: AdminDep,
    body: FinishSession | None = None,
) -> dict:
    """Extension: store the complete file as ``PUT .../initial_model`` would; a repeat answers the same."""
    sess = await _load_session(settings, experiment_id, upload_id)
    if sess.result is not None:
        return sess.result
    await chunks.received_digest(sess, body.sha256 if body else None)
    try:
        await run_in_threadpool(_created, engine, experiment_id)
        answer = await run_in_threadpool(initial_models.store, engine, blobs, experiment_id, sess.data)
    except FedloomError:
        # Refused (invalid file, experiment started or gone): the bytes are of no further use.
        await run_in_threadpool(sessions.remove, sess)
        raise
    await run_in_threadpool(sessions.mark_finished, sess, None, answer)
    return answer


@router.delete(_SESSIONS + "/{upload_id}", status_code=204, responses=openapi.errors(400, 404))
async def abort_initial_session(experiment_id: str, upload_id: str, settings: SettingsDep, _: AdminDep) -> Response:
    """Extension: drop the session and its bytes."""
    await run_in_threadpool(sessions.remove, await _load_session(settings, experiment_id, upload_id))
    return Response(status_code=204)


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
