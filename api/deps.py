"""Shared dependencies of the routes: settings, database, blob store, Temporal client and auth."""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.engine import Engine
from temporalio.client import Client as TemporalClient

from api import auth
from api.taskboard import TaskBoard
from fedloom_core.errors import InvalidRequest, ServiceUnavailable
from fedloom_core.ids import check_id
from fedloom_core.settings import Settings
from fedloom_core.storage.blobstore import BlobStore

AuthorizationHeader = Annotated[str | None, Header()]


def _state(request: Request):  # type: ignore[no-untyped-def]
    return request.app.state


def get_settings(request: Request) -> Settings:
    """The settings the app was built with."""
    return _state(request).settings


def get_engine(request: Request) -> Engine:
    """The database engine."""
    return _state(request).engine


def get_blobs(request: Request) -> BlobStore:
    """The blob store."""
    return _state(request).blobs


def get_temporal(request: Request) -> TemporalClient:
    """The process's Temporal client, or SERVICE_UNAVAILABLE when Temporal could not be reached."""
    client = _state(request).temporal
    if client is None:
        raise ServiceUnavailable("Service temporarily unavailable", "the Temporal server is not reachable")
    return client


async def get_task_board(request: Request) -> TaskBoard:
    """The app's task board, made on first use (and again if the app got a new engine).

    Async so that FastAPI calls it on the event loop, not in a worker thread: it does no I/O.
    """
    state = _state(request)
    board = getattr(state, "task_board", None)
    if board is None or board.engine is not state.engine:
        board = state.task_board = TaskBoard(state.engine)
    return board


def request_body_stream(request: Request) -> AsyncIterator[bytes]:
    """The request body as it arrives (tests override this dependency to hold or cut an upload)."""
    return request.stream()


# How long a resolved client key is trusted without asking the database again.
PRINCIPAL_TTL_S = 10.0
PRINCIPAL_CACHE_MAX = 100_000


class PrincipalCache:
    """Client keys resolved recently, by the sha256 of the Authorization header.

    Spares a database session per request (long-polling clients send many). Only successful
    look-ups are kept, for ``PRINCIPAL_TTL_S``, so an unknown key is still refused at once, and a
    key revoked in the database stops working within that time.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._entries: dict[str, tuple[float, auth.Principal]] = {}

    def get(self, digest: str) -> auth.Principal | None:
        found = self._entries.get(digest)
        if found is None or time.monotonic() - found[0] > PRINCIPAL_TTL_S:
            return None
        return found[1]

    def put(self, digest: str, principal: auth.Principal) -> None:
        if len(self._entries) >= PRINCIPAL_CACHE_MAX:
            self._entries.clear()
        self._entries[digest] = (time.monotonic(), principal)


def _principal_cache(request: Request) -> PrincipalCache:
    """The app's cache, made on first use (and again if the app got a new engine)."""
    state = _state(request)
    cache = getattr(state, "principal_cache", None)
    if cache is None or cache.engine is not state.engine:
        cache = state.principal_cache = PrincipalCache(state.engine)
    return cache


async def get_principal(request: Request, authorization: AuthorizationHeader = None) -> auth.Principal:
    """Who is calling: the admin or a client, from the bearer key (cached), or UNAUTHORIZED."""
    state = _state(request)
    if not authorization:
        return auth.resolve(state.engine, state.admin_key_hash, authorization)  # raises UNAUTHORIZED
    cache = _principal_cache(request)
    digest = auth.hash_key(authorization)
    principal = cache.get(digest)
    if principal is None:
        principal = await run_in_threadpool(auth.resolve, state.engine, state.admin_key_hash, authorization)
        cache.put(digest, principal)
    return principal


PrincipalDep = Annotated[auth.Principal, Depends(get_principal)]


async def require_admin(principal: PrincipalDep) -> auth.Principal:
    """The caller, who must hold the admin key."""
    principal.require_admin()
    return principal


async def require_registrar(request: Request, authorization: AuthorizationHeader = None) -> auth.Principal:
    """The admin key, or the enrollment token (when one is configured) for self-registering clients."""
    token = _state(request).settings.enrollment_token
    if token and authorization:
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode()):
            return auth.Principal("enrollment")
    principal = await get_principal(request, authorization)
    principal.require_admin()
    return principal


# Bound of integers in query strings: rounds, offsets (beyond it a database integer would overflow).
MAX_QUERY_INT = 2**31 - 1


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
AdminDep = Annotated[auth.Principal, Depends(require_admin)]
RegistrarDep = Annotated[auth.Principal, Depends(require_registrar)]
TaskBoardDep = Annotated[TaskBoard, Depends(get_task_board)]
BodyStreamDep = Annotated[AsyncIterator[bytes], Depends(request_body_stream)]
