"""Global models (metadata and download) and client model updates."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from api import openapi
from api.current import check_unambiguous
from api.deps import MAX_QUERY_INT, BlobsDep, BodyStreamDep, EngineDep, PrincipalDep, SettingsDep, TemporalDep, valid_id
from api.multipart import ReceivedForm, receive_form
from fedloom_core.errors import InvalidRequest, NotFound
from fedloom_core.learning import weights
from fedloom_core.learning.catalog import builtin_architecture
from fedloom_core.learning.export import export_onnx
from fedloom_core.messages import UpdateNotice
from fedloom_core.settings import Settings
from fedloom_core.storage import uploads
from fedloom_core.storage.db import Experiment, GlobalModel
from fedloom_core.storage.repo import iso, latest_experiment, latest_model, session_scope
from workflows.experiment import ExperimentWorkflow, workflow_id

router = APIRouter(tags=["models"])
FORMATS = ("pytorch", "safetensors", "onnx")
CHUNK = 1 << 20
# Pieces of a streamed model download: each is one hop between the event loop and a worker thread.
DOWNLOAD_CHUNK = 4 << 20
_SUFFIX = {"pytorch": "pt", "onnx": "onnx", "safetensors": "safetensors"}


def _check_format(fmt: str | None) -> str:
    fmt = (fmt or "safetensors").lower()
    if fmt not in FORMATS:
        raise InvalidRequest(
            "Unsupported model format", f"format {fmt!r} is not available; formats: {', '.join(FORMATS)}"
        )
    return fmt


def _global_model(engine, experiment_id: str | None, round: int | None) -> GlobalModel:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        exp_id = experiment_id
        check_unambiguous(s, experiment_id, "GET /model/global")
        if exp_id is None:
            exp = latest_experiment(s)
            if exp is None:
                raise NotFound("Resource not found", "no experiment has been started")
            exp_id = exp.experiment_id
        model = latest_model(s, exp_id, round)
    if model is None:
        where = f"round {round} of " if round is not None else ""
        raise NotFound("Resource not found", f"no global model for {where}experiment '{exp_id}'")
    return model


@router.get("/model/global", responses=openapi.ok(openapi.GLOBAL_MODEL, 400, 404))
async def get_global_model(
    engine: EngineDep,
    _: PrincipalDep,
    round: int | None = Query(default=None, ge=0, le=MAX_QUERY_INT),
    format: str | None = Query(default=None),
    experiment_id: str | None = Query(default=None),
) -> dict:
    """Metadata of the global model of a round (default: the latest) and where to download it.

    Without ``experiment_id`` it is the running (or last) experiment's; 400 while several run.
    """
    fmt = _check_format(format or "pytorch")
    if experiment_id is not None:
        valid_id(experiment_id, "experiment_id")
    model = await run_in_threadpool(_global_model, engine, experiment_id, round)
    return {
        "model_id": model.model_id,
        "experiment_id": model.experiment_id,
        "round": model.round,
        "accuracy": model.accuracy,
        "loss": model.loss,
        "parameters_count": model.parameters_count,
        "model_size_mb": round_mb(model.size_bytes),
        "created_at": iso(model.created_at),
        "format": fmt,
        "sha256": model.sha256,
        "download_url": f"/model/download/{model.model_id}?format={fmt}",
    }


def round_mb(size: int) -> float:
    return round(size / 1e6, 3)


def _find_model(engine, model_id: str) -> GlobalModel:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        model = s.get(GlobalModel, model_id)
    if model is None:
        raise NotFound("Resource not found", f"model '{model_id}' does not exist")
    return model


def _export(engine, blobs, model: GlobalModel, fmt: str) -> tuple[str, str, int]:  # type: ignore[no-untyped-def]
    """Write ``model`` in ``fmt`` (pytorch or onnx) to a temp file; return its path, sha256 and size."""
    fd, out = tempfile.mkstemp(prefix="fedloom-dl-", suffix=f".{fmt}")
    os.close(fd)
    try:
        with blobs.open_local(model.blob_key) as path:
            state = weights.load_state(path)
        if fmt == "pytorch":
            import torch

            torch.save(state, out)
        else:
            with session_scope(engine) as s:
                exp = s.get(Experiment, model.experiment_id)
            cfg = exp.model_config_ if exp else {}
            if builtin_architecture(cfg.get("architecture", "")) is None:
                raise InvalidRequest(
                    "Unsupported model format",
                    f"ONNX export needs a built-in architecture; '{cfg.get('architecture')}' is a custom model "
                    "(download it as safetensors or pytorch)",
                )
            export_onnx(state, cfg["architecture"], cfg["input_shape"], cfg["num_classes"], out)
    except BaseException:
        os.unlink(out)
        raise
    digest = hashlib.sha256()
    with open(out, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return out, digest.hexdigest(), os.path.getsize(out)


def _stream_file(path: str):  # type: ignore[no-untyped-def]
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


@router.get(
    "/model/download/{model_id}",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The model file"},
        **openapi.errors(400, 404),
    },
)
async def download_model(
    model_id: str, engine: EngineDep, blobs: BlobsDep, _: PrincipalDep, format: str | None = Query(default=None)
) -> StreamingResponse:
    """The model file, streamed, with its length and sha256."""
    valid_id(model_id, "model_id")
    fmt = _check_format(format)
    model = await run_in_threadpool(_find_model, engine, model_id)
    if fmt == "safetensors":
        # Opening the blob (an S3 GET) blocks, so it runs in a thread, as does each chunk's read.
        chunks = await run_in_threadpool(blobs.iter_bytes, model.blob_key, chunk_size=DOWNLOAD_CHUNK)
        return StreamingResponse(
            chunks,
            media_type="application/octet-stream",
            headers={
                "Content-Length": str(model.size_bytes),
                "X-Model-SHA256": model.sha256,
                "Content-Disposition": f'attachment; filename="{model_id}.safetensors"',
            },
        )
    path, digest, size = await run_in_threadpool(_export, engine, blobs, model, fmt)
    return StreamingResponse(
        _stream_file(path),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(size),
            "X-Model-SHA256": digest,
            "Content-Disposition": f'attachment; filename="{model_id}.{_SUFFIX[fmt]}"',
        },
        background=BackgroundTask(os.unlink, path),
    )


def _form_body(required: list[str]) -> dict:
    """The multipart request body, documented by hand: the route reads the body itself, as a stream."""
    properties = {
        "model_file": {"type": "string", "format": "binary", "description": "safetensors or torch.save state_dict"},
        "metrics": {"type": "string", "description": 'JSON object, e.g. {"data_samples": 500, "local_accuracy": 0.8}'},
    }
    schema = {"type": "object", "properties": properties, "required": required}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


async def _receive(
    body: AsyncIterator[bytes], request: Request, settings: Settings, required: tuple[str, ...]
) -> ReceivedForm:
    """Stream the multipart body: the model file goes to ``<data dir>/tmp`` (beside the blobs) while it is hashed."""
    form = await receive_form(
        body,
        request.headers.get("content-type"),
        settings.data_dir / "tmp",
        int(settings.max_upload_mb * 1e6),
        idle_s=settings.upload_read_timeout_s,
        min_rate=settings.upload_min_rate_kbps * 1000,
    )
    try:
        form.require(*required)
    except BaseException:
        form.discard()
        raise
    return form


@router.post(
    "/model/update/{client_id}",
    responses=openapi.ok(openapi.UPLOAD_RESPONSE, 400, 404, 408, 409, 413),
    openapi_extra=_form_body(["model_file", "metrics"]),
)
async def upload_update(
    client_id: str,
    request: Request,
    body: BodyStreamDep,
    engine: EngineDep,
    blobs: BlobsDep,
    settings: SettingsDep,
    temporal: TemporalDep,
    principal: PrincipalDep,
    experiment_id: str | None = Query(default=None, description="The experiment whose task this update answers."),
) -> dict:
    """Receive a client's locally trained model; it is validated before aggregation.

    Without ``experiment_id`` it goes to the running experiment whose open round selected the client.
    """
    valid_id(client_id, "client_id")
    if experiment_id is not None:
        valid_id(experiment_id, "experiment_id")
    principal.require_client(client_id)
    # Registered, selected, round open: known before a byte of the body is read.
    target = await run_in_threadpool(uploads.find_target, engine, client_id, experiment_id)
    form = await _receive(body, request, settings, ("model_file", "metrics"))
    assert form.path is not None
    try:
        parsed = uploads.parse_metrics(form.fields["metrics"])
        return await accept_update(
            engine, blobs, temporal, client_id, form.path, parsed, form.sha256, target.experiment_id
        )
    finally:
        form.discard()


async def accept_update(  # type: ignore[no-untyped-def]
    engine, blobs, temporal, client_id: str, path, metrics: dict, sha256: str | None, experiment_id: str
) -> dict:
    """Validate, store and record a received update file, and wake the workflow if it completed the round.

    The one path both the single-request upload and a resumable upload's finish take.
    """
    stored = await run_in_threadpool(
        uploads.store_update,
        engine,
        blobs,
        client_id=client_id,
        upload_path=path,
        metrics=metrics,
        upload_sha256=sha256,
        experiment_id=experiment_id,
    )
    upd = stored.update
    # The workflow waits for the round's last update (or its deadline); the database is the record.
    # So only the upload that completes the round wakes it, naming every client that reported: one
    # workflow task per round instead of one per upload. A new upload knows from its own transaction;
    # a repeat checks again, since the first attempt may have died before it could signal (a second
    # notice changes nothing).
    reported = (
        stored.completed_round
        if stored.created
        else await run_in_threadpool(uploads.round_reported, engine, upd.experiment_id, upd.round)
    )
    if reported is not None:
        await temporal.get_workflow_handle(workflow_id(upd.experiment_id)).signal(
            ExperimentWorkflow.update_received,
            UpdateNotice(update_id=upd.update_id, client_id=client_id, round=upd.round, reported=reported),
        )
    return update_body(upd)


def update_body(upd) -> dict:  # type: ignore[no-untyped-def]
    return {
        "update_id": upd.update_id,
        "client_id": upd.client_id,
        "experiment_id": upd.experiment_id,
        "round": upd.round,
        "status": "received",
        "model_size_mb": round_mb(upd.size_bytes),
        "received_at": iso(upd.received_at),
        "validation_status": upd.validation_status,
        "reason": upd.reason,
        "data_samples": upd.num_samples,
        "metrics": upd.metrics,
    }


@router.get("/model/update/{update_id}", responses=openapi.ok(openapi.UPLOAD_RESPONSE, 400, 404))
async def get_update(update_id: str, engine: EngineDep, principal: PrincipalDep) -> dict:
    """Extension: an uploaded update's final validation status and the reason."""
    valid_id(update_id, "update_id")
    upd = await run_in_threadpool(uploads.get_update, engine, update_id)
    principal.require_client(upd.client_id)
    return update_body(upd)


@router.post(
    "/model/validate/{client_id}",
    responses=openapi.errors(400, 404, 408, 413),
    openapi_extra=_form_body(["model_file"]),
)
async def validate_update(
    client_id: str,
    request: Request,
    body: BodyStreamDep,
    engine: EngineDep,
    blobs: BlobsDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> dict:
    """Run an upload's checks as a dry run that stores nothing."""
    valid_id(client_id, "client_id")
    principal.require_client(client_id)
    # An unregistered client is refused before a byte of the body is read.
    target = await run_in_threadpool(uploads.dry_run_target, engine, client_id)
    form = await _receive(body, request, settings, ("model_file",))
    assert form.path is not None
    try:
        checks = await run_in_threadpool(
            uploads.dry_run,
            engine,
            blobs,
            target=target,
            upload_path=form.path,
            raw_metrics=form.fields.get("metrics"),
        )
    finally:
        form.discard()
    return {
        "client_id": client_id,
        "valid": all(c.passed for c in checks),
        "checks": [{"name": c.name, "passed": c.passed, "details": c.details} for c in checks],
    }
