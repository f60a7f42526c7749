"""Every error leaves the API in the spec's format: {"error": {code, message, details, timestamp}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedloom_core.errors import FedloomError
from fedloom_core.storage.blobstore import BlobStoreError
from fedloom_core.storage.db import utcnow
from fedloom_core.storage.repo import iso

log = logging.getLogger("fedloom.api")

_HTTP_CODES = {
    400: "INVALID_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "INVALID_REQUEST",
    409: "CONFLICT",
    413: "INVALID_REQUEST",
    415: "INVALID_REQUEST",
    422: "INVALID_REQUEST",
    429: "RATE_LIMITED",
    503: "SERVICE_UNAVAILABLE",
}


def error_body(code: str, message: str, details: str) -> dict:
    """The spec's error envelope."""
    return {"error": {"code": code, "message": message, "details": details, "timestamp": iso(utcnow())}}


def error_response(status: int, code: str, message: str, details: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "the request is malformed"


def install(app: FastAPI) -> None:
    """Register handlers that turn every exception into the spec's error format."""

    @app.exception_handler(FedloomError)
    async def _fedloom(_: Request, exc: FedloomError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.details)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, "INVALID_REQUEST", "Malformed request body or parameters", _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "INTERNAL_ERROR" if exc.status_code >= 500 else "INVALID_REQUEST")
        message = "Resource not found" if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, code, message, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(OperationalError)
    async def _db_down(_: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", exc)
        return error_response(
            503, "SERVICE_UNAVAILABLE", "Service temporarily unavailable", "the database is not reachable"
        )

    @app.exception_handler(BlobStoreError)
    async def _blob_down(_: Request, exc: BlobStoreError) -> JSONResponse:
        log.warning("blob store error: %s", exc)
        return error_response(503, "SERVICE_UNAVAILABLE", "Service temporarily unavailable", "the blob store failed")

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "INTERNAL_ERROR", "Server internal error", type(exc).__name__)
