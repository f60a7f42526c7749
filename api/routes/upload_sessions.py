"""Resumable uploads of client updates: open a session, append ranged chunks, ask the offset, finish.

A dropped connection keeps what arrived; the client asks the committed offset and goes on from there.
The finish step takes the single-request upload's own path (``models.accept_update``). Sessions live
in ``fedloom_core.storage.upload_sessions``; what every kind of session shares here, in ``upload_chunks``.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api import openapi
from api.deps import BlobsDep, BodyStreamDep, EngineDep, PrincipalDep, SettingsDep, TemporalDep, valid_id
from api.routes import upload_chunks as chunks
from api.routes.models import accept_update, update_body
from fedloom_core.errors import Conflict, FedloomError, RoundNotActive
from fedloom_core.settings import Settings
from fedloom_core.storage import upload_sessions as sessions
from fedloom_core.storage import uploads

router = APIRouter(tags=["models"])
SESSION = {
    "upload_id": "upl_5f0c1a2b3c4d5e6f708192a3b4c5d6e7",
    "client_id": "client-001",
    "experiment_id": "exp_2025_001",
    "round": 5,
    "size": 1000000000,
    "offset": 0,
    "complete": False,
    "chunk_max_bytes": 64000000,
    "expires_at": "2025-01-17T10:28:00Z",
    "upload_url": "/api/v1/model/update/client-001/sessions/upl_5f0c1a2b3c4d5e6f708192a3b4c5d6e7",
}


class FinishSession(BaseModel):
    """The optional body of ``POST .../sessions/{upload_id}/complete``."""

    model_config = ConfigDict(extra="forbid")
    sha256: str | None = Field(
        default=None, pattern="^[0-9a-f]{64}$", description="If given, the received file must have this digest."
    )


class OpenSession(BaseModel):
    """The body of ``POST /model/update/{client_id}/sessions``."""

    model_config = ConfigDict(extra="forbid")
    size: int = Field(ge=1, description="The file's size in bytes, at most FEDLOOM_MAX_UPLOAD_MB.")
    metrics: dict[str, Any] = Field(description="As the single-request upload's metrics field (data_samples > 0).")
    sha256: str | None = Field(
        default=None, pattern="^[0-9a-f]{64}$", description="If given, the finished file must have this digest."
    )
    experiment_id: str | None = Field(
        default=None, max_length=128, description="The experiment whose task this update answers."
    )


def _state(sess: sessions.Session, settings: Settings) -> JSONResponse:
    fields = {
        "upload_id": sess.upload_id,
        "client_id": sess.client_id,
        "experiment_id": sess.experiment_id,
        "round": sess.round,
    }
    url = f"/api/v1/model/update/{sess.client_id}/sessions/{sess.upload_id}"
    return chunks.state(sess, settings, fields, url, {"update_id": sess.update_id})


async def _load(settings: Settings, client_id: str, upload_id: str, principal) -> sessions.Session:  # type: ignore[no-untyped-def]
    valid_id(client_id, "client_id")
    valid_id(upload_id, "upload_id")
    principal.require_client(client_id)
    return await chunks.load(settings, upload_id, client_id, sessions.KIND_UPDATE)


@router.post(
    "/model/update/{client_id}/sessions",
    status_code=201,
    responses={201: {"content": {"application/json": {"example": SESSION}}}, **openapi.errors(400, 404, 409, 413)},
)
async def open_session(
    client_id: str, body: OpenSession, engine: EngineDep, settings: SettingsDep, principal: PrincipalDep
) -> JSONResponse:
    """Extension: open a resumable upload of ``size`` bytes for this client's open round."""
    valid_id(client_id, "client_id")
    if body.experiment_id is not None:
        valid_id(body.experiment_id, "experiment_id")
    principal.require_client(client_id)
    # Registered, selected, round open: checked before anything is accepted, as for a single upload.
    target = await run_in_threadpool(uploads.find_target, engine, client_id, body.experiment_id)
    chunks.check_size(body.size, settings)
    metrics = uploads.parse_metrics(json.dumps(body.metrics))
    await chunks.sweep(settings)
    sess = await run_in_threadpool(
        lambda: sessions.create(
            settings.data_dir / "tmp",
            client_id=client_id,
            experiment_id=target.experiment_id,
            round=target.round,
            size=body.size,
            metrics=metrics,
            sha256=body.sha256,
        )
    )
    response = _state(sess, settings)
    response.status_code = 201
    response.headers["Location"] = f"/api/v1/model/update/{client_id}/sessions/{sess.upload_id}"
    return response


@router.get("/model/update/{client_id}/sessions/{upload_id}", responses=openapi.ok(SESSION, 400, 404))
async def session_state(client_id: str, upload_id: str, settings: SettingsDep, principal: PrincipalDep) -> Response:
    """Extension: the session's committed ``offset`` (also in the ``Upload-Offset`` header)."""
    sess = await _load(settings, client_id, upload_id, principal)
    return _state(sess, settings)


@router.head("/model/update/{client_id}/sessions/{upload_id}", responses=openapi.errors(400, 404))
async def session_offset(client_id: str, upload_id: str, settings: SettingsDep, principal: PrincipalDep) -> Response:
    """Extension: the committed offset and the size, as the headers ``Upload-Offset`` and ``Upload-Length``."""
    sess = await _load(settings, client_id, upload_id, principal)
    return _state(sess, settings)


@router.put(
    "/model/update/{client_id}/sessions/{upload_id}",
    responses=openapi.ok(SESSION, 400, 404, 408, 409, 413),
    openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {}}}},
)
async def put_chunk(
    client_id: str,
    upload_id: str,
    request: Request,
    body: BodyStreamDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> JSONResponse:
    """Extension: append the bytes ``Content-Range`` names; they must start at the committed offset.

    A chunk cut short by a dropped connection or a timeout keeps what arrived (ask the offset and go
    on); one that sends more than its range says is discarded.
    """
    sess = await _load(settings, client_id, upload_id, principal)
    if sess.update_id is not None:
        raise Conflict("Upload session finished", f"upload session '{upload_id}' was stored as {sess.update_id}")
    await chunks.receive_chunk(request, body, sess, settings)
    return _state(sess, settings)


@router.post(
    "/model/update/{client_id}/sessions/{upload_id}/complete",
    responses=openapi.ok(openapi.UPLOAD_RESPONSE, 400, 404, 409),
)
async def finish_session(
    client_id: str,
    upload_id: str,
    engine: EngineDep,
    blobs: BlobsDep,
    settings: SettingsDep,
    temporal: TemporalDep,
    principal: PrincipalDep,
    body: FinishSession | None = None,
) -> dict:
    """Extension: store the complete file as ``POST /model/update/{client_id}`` would; a repeat answers the same."""
    sess = await _load(settings, client_id, upload_id, principal)
    if sess.update_id is not None:
        return update_body(await run_in_threadpool(uploads.get_update, engine, sess.update_id))
    digest = await chunks.received_digest(sess, body.sha256 if body else None)
    try:
        target = await run_in_threadpool(uploads.find_target, engine, client_id, sess.experiment_id)
        if target.round != sess.round:
            raise RoundNotActive(
                "Specified round is not currently active",
                f"the session was opened for round {sess.round}; round {target.round} is open now",
            )
        answer = await accept_update(
            engine, blobs, temporal, client_id, sess.data, sess.metrics, digest, sess.experiment_id
        )
    except FedloomError:
        # Refused (invalid file, round closed, conflict): the bytes are of no further use.
        await run_in_threadpool(sessions.remove, sess)
        raise
    await run_in_threadpool(sessions.mark_finished, sess, answer["update_id"])
    return answer


@router.delete("/model/update/{client_id}/sessions/{upload_id}", status_code=204, responses=openapi.errors(400, 404))
async def abort_session(client_id: str, upload_id: str, settings: SettingsDep, principal: PrincipalDep) -> Response:
    """Extension: drop the session and its bytes."""
    sess = await _load(settings, client_id, upload_id, principal)
    await run_in_threadpool(sessions.remove, sess)
    return Response(status_code=204)
