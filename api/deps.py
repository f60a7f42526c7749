"""Shared dependencies of the routes: settings, database, blob store, Temporal client and auth."""

from __future__ import annotations

import asyncio
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
from fedloom_core.errors import InvalidRequest, Unauthorized
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
    """The process's Temporal client, or SERVICE_UNAVAILABLE (with Retry-After) while Temporal is unreachable."""
    return _state(request).temporal_link.require()


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


# How long a resolved key is trusted without asking the database again: the bound within which a
# key revoked by another API process stops working here (the revoking process forgets it at once).
# Past it, the keys in use are re-checked all at once (one query per REVOKED_CHUNK keys), not one
# query per request: with thousands of clients polling every 10 s, that was most of the API's queries.
PRINCIPAL_TTL_S = 5.0
# How long a key the database does not know is refused without asking it again. Keys are random, so
# an unknown key only becomes valid if it is created, and new keys are never presented beforehand.
UNKNOWN_KEY_TTL_S = 30.0
# How long a verified key stays exempt from its address's auth-failure budget (api/ratelimit.py).
VERIFIED_KEEP_S = 3600.0
PRINCIPAL_CACHE_MAX = 100_000


class PrincipalCache:
    """Keys resolved recently, by the sha256 of the bare key: found ones, unknown ones, verified ones.

    Spares a database session per request (long-polling clients send many) and per repeat of an
    unknown key (a key flood). Each table keeps at most ``PRINCIPAL_CACHE_MAX`` entries, the oldest
    dropped first. Used on the event loop only.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._entries: dict[str, tuple[float, auth.Principal]] = {}
        self._unknown: dict[str, float] = {}  # digest -> when it was found unknown
        self._verified: dict[str, tuple[float, str | None]] = {}  # digest -> (when verified, client id)
        # When the last re-check of every cached key began: an entry is current if resolved or re-checked
        # within PRINCIPAL_TTL_S. The lock makes concurrent requests share one re-check.
        self._rechecked_at = float("-inf")
        self._recheck_lock: asyncio.Lock | None = None
        self._refresher: asyncio.Task | None = None

    def get(self, digest: str) -> auth.Principal | None:
        """The principal of a key resolved within ``PRINCIPAL_TTL_S``, else None."""
        found = self._entries.get(digest)
        if found is None or time.monotonic() - max(found[0], self._rechecked_at) > PRINCIPAL_TTL_S:
            return None
        return found[1]

    def stale(self, digest: str) -> bool:
        """Whether this key is cached but past its TTL (a re-check of the cache can renew it)."""
        return digest in self._entries and self.get(digest) is None

    async def recheck(self) -> None:
        """Re-check every cached key against the database at once, dropping the revoked ones.

        Its query runs on asyncio's own executor, not behind the requests queued for the API's
        threads: a re-check slower than the TTL would leave every key stale again.
        """
        if self._recheck_lock is None:
            self._recheck_lock = asyncio.Lock()
        async with self._recheck_lock:
            if time.monotonic() - self._rechecked_at <= PRINCIPAL_TTL_S / 2:  # one just ran: no convoy
                return
            started = time.monotonic()
            clients = [d for d, (_, who) in self._entries.items() if not who.is_admin]  # the admin key is no row
            revoked = await asyncio.to_thread(auth.revoked_among, self.engine, clients)
            for digest in revoked:
                self._entries.pop(digest, None)
                self._verified.pop(digest, None)
            self._rechecked_at = started

    def refresh_soon(self) -> None:
        """Start a re-check in the background once the last one is half a TTL old, so keys in use
        are renewed before they go stale and requests rarely wait for one."""
        if time.monotonic() - self._rechecked_at <= PRINCIPAL_TTL_S / 2 or not self._entries:
            return
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self.recheck())

    def put(self, digest: str, principal: auth.Principal) -> None:
        """Remember a key the database resolved."""
        now = time.monotonic()
        _put_bounded(self._entries, digest, (now, principal))
        _put_bounded(self._verified, digest, (now, principal.client_id))
        self._unknown.pop(digest, None)

    def is_unknown(self, digest: str) -> bool:
        """Whether the database did not know this key within ``UNKNOWN_KEY_TTL_S``."""
        found = self._unknown.get(digest)
        return found is not None and time.monotonic() - found <= UNKNOWN_KEY_TTL_S

    def put_unknown(self, digest: str) -> None:
        """Remember a key the database does not know."""
        _put_bounded(self._unknown, digest, time.monotonic())
        self._verified.pop(digest, None)

    def verified(self, digest: str) -> bool:
        """Whether this key resolved in this process within ``VERIFIED_KEEP_S`` (and was not revoked here)."""
        found = self._verified.get(digest)
        return found is not None and time.monotonic() - found[0] <= VERIFIED_KEEP_S

    def forget_client(self, client_id: str) -> None:
        """Drop every key of ``client_id`` (its keys were revoked): the next use asks the database."""
        for table in (self._entries, self._verified):
            stale = [d for d, (_, who) in table.items() if _client_of(who) == client_id]
            for digest in stale:
                del table[digest]


def _client_of(who: auth.Principal | str | None) -> str | None:
    return who.client_id if isinstance(who, auth.Principal) else who


def _put_bounded(table: dict, key: str, value: object) -> None:
    """Insert as the newest entry, dropping the oldest when the table is full."""
    table.pop(key, None)
    if len(table) >= PRINCIPAL_CACHE_MAX:
        del table[next(iter(table))]
    table[key] = value


def principal_cache(state) -> PrincipalCache:  # type: ignore[no-untyped-def]
    """The app's cache, made on first use (and again if the app got a new engine)."""
    cache = getattr(state, "principal_cache", None)
    if cache is None or cache.engine is not state.engine:
        cache = state.principal_cache = PrincipalCache(state.engine)
    return cache


def bearer_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, else None."""
    scheme, _, key = (authorization or "").partition(" ")
    return (key.strip() or None) if scheme.lower() == "bearer" else None


async def get_principal(request: Request, authorization: AuthorizationHeader = None) -> auth.Principal:
    """Who is calling: the admin or a client, from the bearer key (cached), or UNAUTHORIZED."""
    return await resolve_principal(_state(request), authorization)


async def resolve_principal(state, authorization: str | None) -> auth.Principal:  # type: ignore[no-untyped-def]
    """The principal of an Authorization header: from the cache, else the database (then cached)."""
    key = bearer_key(authorization)
    if key is None:
        return auth.resolve(state.engine, state.admin_key_hash, authorization)  # raises UNAUTHORIZED
    cache = principal_cache(state)
    digest = auth.hash_key(key)
    principal = cache.get(digest)
    if principal is None and cache.stale(digest):
        await cache.recheck()
        principal = cache.get(digest)
    if principal is not None:
        cache.refresh_soon()
        return principal
    if cache.is_unknown(digest):
        raise auth.unknown_key()
    try:
        principal = await run_in_threadpool(auth.resolve_key, state.engine, state.admin_key_hash, key)
    except Unauthorized:
        cache.put_unknown(digest)
        raise
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
