"""Shared dependencies of the routes: settings, database, blob store, Temporal client and auth."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.engine import Engine
from temporalio.client import Client as TemporalClient

from api import auth
from fedloom_core.blobstore import BlobStore
from fedloom_core.contracts import check_id
from fedloom_core.errors import InvalidRequest, ServiceUnavailable
from fedloom_core.settings import Settings


def _state(request: Request):  # type: ignore[no-untyped-def]
    return request.app.state


def get_settings(request: Request) -> Settings:
    return _state(request).settings


def get_engine(request: Request) -> Engine:
    return _state(request).engine


def get_blobs(request: Request) -> BlobStore:
    return _state(request).blobs


def get_temporal(request: Request) -> TemporalClient:
    client = _state(request).temporal
    if client is None:
        raise ServiceUnavailable("Service temporarily unavailable", "the Temporal server is not reachable")
    return client


async def get_principal(request: Request, authorization: Annotated[str | None, Header()] = None) -> auth.Principal:
    state = _state(request)
    return await run_in_threadpool(auth.resolve, state.engine, state.admin_key_hash, authorization)


async def require_admin(principal: Annotated[auth.Principal, Depends(get_principal)]) -> auth.Principal:
    principal.require_admin()
    return principal


async def require_registrar(request: Request, authorization: Annotated[str | None, Header()] = None) -> auth.Principal:
    """The admin key, or the enrollment token (when one is configured) for self-registering clients."""
    token = _state(request).settings.enrollment_token
    if token and authorization:
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode()):
            return auth.Principal("enrollment")
    principal = await get_principal(request, authorization)
    principal.require_admin()
    return principal


def valid_id(value: str, what: str) -> str:
    """Check an id taken from a URL before it reaches a query or a path."""
    try:
        return check_id(value, what)
    except ValueError as exc:
        raise InvalidRequest(f"Invalid {what}", str(exc)) from None


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]
TemporalDep = Annotated[TemporalClient, Depends(get_temporal)]
PrincipalDep = Annotated[auth.Principal, Depends(get_principal)]
AdminDep = Annotated[auth.Principal, Depends(require_admin)]
RegistrarDep = Annotated[auth.Principal, Depends(require_registrar)]
