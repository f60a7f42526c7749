"""Per-key fixed-window rate limiting: an in-process or a database counter store behind one middleware.

Limits come from the settings: *general* (every request except the health check), *uploads*
(``POST /api/v1/model/update/...`` and the validate dry run ``POST /api/v1/model/validate/...``)
and *training start* (``POST /api/v1/training/start``); an upload or a start also counts toward
*general*. A WebSocket handshake counts toward *general*.

* Identity: the sha256 of the bearer key (for WebSockets also ``?api_key=``), else the client IP.
  The key is not verified here (the route does that), so a made-up key gets a budget of its own;
  what bounds made-up keys is the per-address budget of failed authentications
  (:mod:`api.auth_failures`), checked first.
* Windows are fixed and aligned to the Unix epoch: ``[k*w, (k+1)*w)``. Every hit counts, allowed
  or not, toward every limit that applies to it.
* Headers on every response: ``X-RateLimit-Limit``/``-Remaining``/``-Reset`` (the window end, a
  Unix timestamp) of the tightest limit: a limit that is exceeded (the one that resets last), else
  the one with the fewest requests left. Past a limit: 429 ``RATE_LIMITED`` with ``Retry-After``;
  a WebSocket handshake is accepted and closed with code 4429.
* Stores: :class:`MemoryStore` (a dict and a lock: one process) and :class:`DatabaseStore` (the
  ``rate_counter`` table: one atomic ``INSERT ... ON CONFLICT DO UPDATE`` per counter, so replicas
  sharing a database share one budget, on SQLite and PostgreSQL alike).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import anyio.to_thread
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import Headers, MutableHeaders, QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import hash_key
from api.auth_failures import AuthFailureGuard, address_of
from api.auth_first import AuthFirst
from api.errors import error_response
from fedloom_core.settings import Settings

log = logging.getLogger("fedloom.api.ratelimit")

EXEMPT_PATHS = frozenset({"/health", "/api/v1/health"})
UPLOAD_PREFIX = "/api/v1/model/update/"
# The validate dry run reads the round's stored updates, so it spends from the uploads budget too.
VALIDATE_PREFIX = "/api/v1/model/validate/"
START_PATH = "/api/v1/training/start"
WS_CLOSE_RATE_LIMITED = 4429
WS_CLOSE_UNAUTHORIZED = 4401
PRUNE_EVERY_S = 300.0

# One statement per counter: insert, or count into the current window, or restart a rolled-over one.
# A hit stamped with an older window (a replica whose clock lags) counts into the stored window.
_UPSERT = text(
    "INSERT INTO rate_counter (bucket, window_start, count) VALUES (:bucket, :window_start, 1) "
    "ON CONFLICT (bucket) DO UPDATE SET "
    "count = CASE WHEN rate_counter.window_start >= excluded.window_start "
    "THEN rate_counter.count + 1 ELSE 1 END, "
    "window_start = CASE WHEN rate_counter.window_start >= excluded.window_start "
    "THEN rate_counter.window_start ELSE excluded.window_start END "
    "RETURNING count, window_start"
)
_PRUNE = text("DELETE FROM rate_counter WHERE window_start < :cutoff")


@dataclass(frozen=True)
class Limit:
    """At most ``limit`` requests per fixed window of ``window_s`` seconds."""

    name: str
    limit: int
    window_s: float

    def window_start_ms(self, now: float) -> int:
        """The start of the window holding ``now``, in Unix milliseconds."""
        return round(math.floor(now / self.window_s) * self.window_s * 1000)


@dataclass(frozen=True)
class Usage:
    """How much of one limit a key has used in the current window."""

    limit: Limit
    count: int
    reset: float  # the window end, Unix seconds

    @property
    def remaining(self) -> int:
        """Requests left in the window (never negative)."""
        return max(0, self.limit.limit - self.count)

    @property
    def exceeded(self) -> bool:
        """Whether this hit went past the limit."""
        return self.count > self.limit.limit


@dataclass(frozen=True)
class Decision:
    """The outcome for one request: allowed or not, and the usage its headers report."""

    allowed: bool
    usage: Usage
    now: float

    @property
    def retry_after(self) -> int:
        """Whole seconds until the blocking window ends (at least 1)."""
        return max(1, math.ceil(self.usage.reset - self.now))

    def headers(self) -> dict[str, str]:
        """The ``X-RateLimit-*`` headers, plus ``Retry-After`` when refused."""
        out = {
            "X-RateLimit-Limit": str(self.usage.limit.limit),
            "X-RateLimit-Remaining": str(self.usage.remaining),
            "X-RateLimit-Reset": str(math.ceil(self.usage.reset)),
        }
        if not self.allowed:
            out["Retry-After"] = str(self.retry_after)
        return out


class CounterStore(Protocol):
    """Counts hits per bucket and fixed window."""

    #: True when :meth:`hit` does I/O and must run in a worker thread.
    blocking: bool

    def hit(self, hits: Sequence[tuple[str, int, int]]) -> list[tuple[int, int]]:
        """Count one hit per ``(bucket, window_start_ms, window_ms)``; return each ``(count, window_start_ms)``."""
        ...


class MemoryStore:
    """Counters in this process only: the embedded single-process default."""

    blocking = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, list[int]] = {}  # bucket -> [window_start_ms, count, window_ms]
        self._pruned = time.monotonic()

    def hit(self, hits: Sequence[tuple[str, int, int]]) -> list[tuple[int, int]]:
        """Count the hits under one lock."""
        out = []
        with self._lock:
            self._maybe_prune()
            for bucket, start, window_ms in hits:
                entry = self._counters.get(bucket)
                if entry is None or entry[0] < start:
                    entry = self._counters[bucket] = [start, 0, window_ms]
                entry[1] += 1
                out.append((entry[1], entry[0]))
        return out

    def _maybe_prune(self) -> None:
        """Drop counters of ended windows, at most every ``PRUNE_EVERY_S`` (the lock is held)."""
        if time.monotonic() - self._pruned < PRUNE_EVERY_S:
            return
        self._pruned = time.monotonic()
        now_ms = time.time() * 1000
        for bucket in [b for b, (start, _, window_ms) in self._counters.items() if start + window_ms < now_ms]:
            del self._counters[bucket]


class DatabaseStore:
    """Counters in the ``rate_counter`` table, shared by every API replica on the database."""

    blocking = True

    def __init__(self, engine: Engine, keep_s: float = 7200.0) -> None:
        self.engine = engine
        self._keep_ms = int(keep_s * 1000)
        self._pruned = time.monotonic()

    def hit(self, hits: Sequence[tuple[str, int, int]]) -> list[tuple[int, int]]:
        """Count the hits in one transaction, buckets in sorted order so that replicas never deadlock."""
        results: dict[str, tuple[int, int]] = {}
        with self.engine.begin() as conn:
            for bucket, start, _ in sorted(hits):
                row = conn.execute(_UPSERT, {"bucket": bucket, "window_start": start}).one()
                results[bucket] = (int(row[0]), int(row[1]))
            if time.monotonic() - self._pruned > PRUNE_EVERY_S:
                self._pruned = time.monotonic()
                conn.execute(_PRUNE, {"cutoff": int(time.time() * 1000) - self._keep_ms})
        return [results[bucket] for bucket, _, _ in hits]


class RateLimiter:
    """Checks one identity against a set of limits with a counter store."""

    def __init__(self, store: CounterStore) -> None:
        self.store = store

    def check(self, identity: str, limits: Sequence[Limit], now: float | None = None) -> Decision:
        """Count one request of ``identity`` toward every limit in ``limits`` and decide."""
        now = time.time() if now is None else now
        hits = [(f"{lim.name}:{identity}", lim.window_start_ms(now), round(lim.window_s * 1000)) for lim in limits]
        counted = self.store.hit(hits)
        usages = [
            Usage(lim, count, start / 1000 + lim.window_s) for lim, (count, start) in zip(limits, counted, strict=True)
        ]
        exceeded = [u for u in usages if u.exceeded]
        if exceeded:
            return Decision(False, max(exceeded, key=lambda u: u.reset), now)
        return Decision(True, min(usages, key=lambda u: (u.remaining, u.limit.limit, -u.reset)), now)

    async def acheck(self, identity: str, limits: Sequence[Limit]) -> Decision:
        """:meth:`check`, in a worker thread when the store does I/O."""
        if self.store.blocking:
            return await anyio.to_thread.run_sync(self.check, identity, limits)
        return self.check(identity, limits)


@dataclass(frozen=True)
class Limits:
    """The configured limits."""

    general: Limit
    uploads: Limit
    training_start: Limit

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """The limits ``settings`` configure."""
        return cls(
            Limit("general", settings.rate_limit_general, settings.rate_limit_general_window_s),
            Limit("uploads", settings.rate_limit_uploads, settings.rate_limit_uploads_window_s),
            Limit("training_start", settings.rate_limit_training_start, settings.rate_limit_training_start_window_s),
        )

    def applicable(self, scope: Scope) -> list[Limit]:
        """The limits a request counts toward (none for the health check)."""
        path = scope.get("path", "")
        if path in EXEMPT_PATHS:
            return []
        if scope["type"] == "http" and scope.get("method") == "POST":
            if path.startswith((UPLOAD_PREFIX, VALIDATE_PREFIX)):
                return [self.general, self.uploads]
            if path.rstrip("/") == START_PATH:
                return [self.general, self.training_start]
        return [self.general]


def presented_key(scope: Scope) -> str:
    """The API key a request carries (bearer header; for WebSockets also ``?api_key=``), else ""."""
    key = ""
    scheme, _, value = Headers(scope=scope).get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        key = value.strip()
    if not key and scope["type"] == "websocket":
        key = QueryParams(scope.get("query_string", b"").decode("latin-1")).get("api_key", "").strip()
    return key


def identity_of(scope: Scope) -> str:
    """Whom a request counts for: ``key:<sha256 of the API key>`` or ``ip:<client address>``."""
    key = presented_key(scope)
    return f"key:{hash_key(key)}" if key else f"ip:{address_of(scope)}"


class RateLimitMiddleware:
    """ASGI middleware that counts each HTTP request and WebSocket handshake and refuses those past a limit."""

    def __init__(self, app: ASGIApp, settings: Settings, store_factory: Callable[[Engine], CounterStore]) -> None:
        self.app = app
        self.limits = Limits.from_settings(settings)
        self.auth_limit = Limit(
            "auth_failures", settings.rate_limit_auth_failures, settings.rate_limit_auth_failures_window_s
        )
        self.guard = AuthFailureGuard(self.auth_limit.limit, self.auth_limit.window_s)
        self._store_factory = store_factory
        self._limiter: RateLimiter | None = None

    def _limiter_for(self, scope: Scope) -> RateLimiter:
        """The limiter, (re)built when the app's engine is new (the lifespan ran again)."""
        engine = getattr(scope["app"].state, "engine", None)
        limiter = self._limiter
        if limiter is None or getattr(limiter.store, "engine", engine) is not engine:
            limiter = self._limiter = RateLimiter(self._store_factory(engine))
        return limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Count the request, then refuse it or pass it on with the rate-limit headers."""
        limits = self.limits.applicable(scope) if scope["type"] in ("http", "websocket") else []
        if not limits:
            await self.app(scope, receive, send)
            return
        key = presented_key(scope)
        if not (key and self.guard.trusted(scope, key)):
            wait = self.guard.retry_after(address_of(scope))
            if wait:
                await self._refuse_address(scope, receive, send, wait)
                return
        try:
            decision = await self._limiter_for(scope).acheck(identity_of(scope), limits)
        except SQLAlchemyError as exc:  # fail open: the route answers 503 itself if the database is down
            log.warning("rate limiter unavailable, request not limited: %s", exc)
            await self.app(scope, receive, send)
            return
        headers = decision.headers()
        if scope["type"] == "websocket":
            failed = await self._websocket(scope, receive, send, decision, headers)
        else:
            failed = await self._http(scope, receive, send, decision, headers)
        if failed:
            await self._auth_failed(scope)

    async def _refuse_address(self, scope: Scope, receive: Receive, send: Send, wait: int) -> None:
        """Answer 429 (a WebSocket: close 4429) to an address past its auth-failure budget."""
        self.guard.note(address_of(scope), scope.get("path", ""), None, refused=True)
        if scope["type"] == "websocket":
            message = await receive()
            if message["type"] == "websocket.connect":
                await send({"type": "websocket.accept", "headers": _raw({"Retry-After": str(wait)})})
                reason = f"rate limited; retry in {wait} s"
                await send({"type": "websocket.close", "code": WS_CLOSE_RATE_LIMITED, "reason": reason})
            return
        details = self.guard.details(wait)
        response = error_response(429, "RATE_LIMITED", "Rate limit exceeded", details, {"Retry-After": str(wait)})
        await response(scope, receive, send)

    async def _auth_failed(self, scope: Scope) -> None:
        """Count a failed authentication toward its address's budget; block the address past it."""
        address = address_of(scope)
        try:
            decision = await self._limiter_for(scope).acheck(f"ip:{address}", [self.auth_limit])
        except SQLAlchemyError as exc:
            log.warning("rate limiter unavailable, authentication failure not counted: %s", exc)
            return
        if not decision.allowed:
            self.guard.block(address, decision.usage.reset, decision.usage.count)
        self.guard.note(address, scope.get("path", ""), decision.usage.count, refused=False)

    async def _http(self, scope: Scope, receive: Receive, send: Send, decision: Decision, headers: dict) -> bool:
        """Answer 429, or run the app and add ``headers`` to its response; whether the app answered 401."""
        if not decision.allowed:
            lim = decision.usage.limit
            details = (
                f"{lim.limit} {lim.name.replace('_', ' ')} request(s) per {lim.window_s:g} s for this key; "
                f"retry in {decision.retry_after} s"
            )
            await error_response(429, "RATE_LIMITED", "Rate limit exceeded", details, headers)(scope, receive, send)
            return False
        started = False
        status = 0

        async def send_with_headers(message: Message) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                MutableHeaders(scope=message).update(headers)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:
            # The app's last-resort handler answers outside this middleware, without our headers:
            # answer here in the same format (the outer handler still logs and re-raises).
            if not started:
                response = error_response(500, "INTERNAL_ERROR", "Server internal error", type(exc).__name__, headers)
                await response(scope, receive, send)
            raise
        return status == 401

    async def _websocket(self, scope: Scope, receive: Receive, send: Send, decision: Decision, headers: dict) -> bool:
        """Accept and close with 4429, or run the app and add ``headers`` to its handshake answer.

        Returns whether the app closed the connection as unauthorized (4401).
        """
        if not decision.allowed:
            message = await receive()
            if message["type"] == "websocket.connect":
                reason = f"rate limited; retry in {decision.retry_after} s"
                await send({"type": "websocket.accept", "headers": _raw(headers)})
                await send({"type": "websocket.close", "code": WS_CLOSE_RATE_LIMITED, "reason": reason})
            return False
        unauthorized = False

        async def send_with_headers(message: Message) -> None:
            nonlocal unauthorized
            if message["type"] == "websocket.accept":
                message = {**message, "headers": [*message.get("headers", []), *_raw(headers)]}
            elif message["type"] == "websocket.close" and message.get("code") == WS_CLOSE_UNAUTHORIZED:
                unauthorized = True
            await send(message)

        await self.app(scope, receive, send_with_headers)
        return unauthorized


def _raw(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """Headers as ASGI wants them."""
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


def make_store_factory(settings: Settings) -> Callable[[Engine], CounterStore]:
    """What builds the counter store ``settings`` ask for, given the app's engine."""
    if settings.rate_limit_backend == "database":
        return DatabaseStore
    memory = MemoryStore()
    return lambda _engine: memory


def install(app: FastAPI, settings: Settings) -> None:
    """Add the rate-limiting middleware to ``app``; the database store uses ``app.state.engine``.

    Inside it, :class:`api.auth_first.AuthFirst` authenticates body-carrying requests before their
    body is read, so its 401s count toward the address's auth-failure budget.
    """
    app.add_middleware(AuthFirst)
    app.add_middleware(RateLimitMiddleware, settings=settings, store_factory=make_store_factory(settings))
