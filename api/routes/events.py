"""``WS /ws/events``: the event log (the ``event`` table), replayed from ``?since=`` and then followed live.

Auth, ``since``, close codes and how delivery handles PostgreSQL's id gaps: see ``docs/events.md``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, FastAPI, WebSocket
from sqlalchemy import func, or_, select
from sqlalchemy.engine import Engine
from starlette.websockets import WebSocketDisconnect

from api import auth
from fedloom_core.errors import Unauthorized
from fedloom_core.ids import check_id
from fedloom_core.storage.db import Event

log = logging.getLogger("fedloom.api.events")
router = APIRouter(tags=["events"])

POLL_S = 0.2
BATCH = 500
GAP_WAIT_S = 2.0
LOOKBACK = 100
IDLE_STOP_S = 10.0
QUEUE_MAX = 10_000
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_TOO_MANY = 4429
CLOSE_TOO_SLOW = 1013


@dataclass(frozen=True)
class Row:
    """One stored event, ready to send."""

    event_id: int
    client_id: str | None
    text: str
    experiment_id: str | None = None

    @classmethod
    def of(cls, event_id: int, client_id: str | None, payload: dict[str, Any]) -> Row:
        """The row with its message: the payload plus ``event_id``."""
        exp_id = payload.get("experiment_id")
        text = json.dumps({**payload, "event_id": event_id})
        return cls(event_id, client_id, text, exp_id if isinstance(exp_id, str) else None)


@dataclass(eq=False)
class Listener:
    """One connection's view of the hub: what it may see, from which id on, and its queue."""

    principal: auth.Principal
    floor: int = 0
    # Only this experiment's events (those naming no experiment, e.g. registrations, are left out too).
    experiment_id: str | None = None
    queue: asyncio.Queue[Row | None] = field(default_factory=asyncio.Queue)
    overflowed: bool = False

    def may_see(self, client_id: str | None) -> bool:
        """Whether this principal may see an event concerning ``client_id``."""
        return self.principal.is_admin or client_id is None or client_id == self.principal.client_id

    def wants(self, row: Row) -> bool:
        """Whether ``row`` passes this connection's experiment filter."""
        return self.experiment_id is None or row.experiment_id == self.experiment_id

    def offer(self, row: Row) -> None:
        """Queue ``row`` if it is for us; past ``QUEUE_MAX`` waiting rows, mark the listener as overflowed."""
        if self.overflowed or row.event_id <= self.floor or not self.may_see(row.client_id) or not self.wants(row):
            return
        if self.queue.qsize() >= QUEUE_MAX:
            self.overflowed = True
            self.queue.put_nowait(None)
            return
        self.queue.put_nowait(row)


def fetch(engine: Engine, after: int, upto: int | None = None, viewer: auth.Principal | None = None) -> list[Row]:
    """Up to ``BATCH`` events with ``after < event_id (<= upto)`` in id order, those ``viewer`` may see."""
    query = select(Event.event_id, Event.client_id, Event.payload).where(Event.event_id > after)
    if upto is not None:
        query = query.where(Event.event_id <= upto)
    if viewer is not None and not viewer.is_admin:
        query = query.where(or_(Event.client_id.is_(None), Event.client_id == viewer.client_id))  # type: ignore[union-attr]
    with engine.connect() as conn:
        rows = conn.execute(query.order_by(Event.event_id).limit(BATCH)).all()
    return [Row.of(r[0], r[1], r[2]) for r in rows]


class EventHub:
    """Tails the event table for one API process and fans new events out to its listeners."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.wait_for_gaps = engine.dialect.name == "postgresql"
        self.cursor = 0  # every id up to here has been delivered or given up on
        self.newest = 0  # the highest id seen in the table
        self.connections: Counter[str] = Counter()  # key hash -> open connections
        self._listeners: set[Listener] = set()
        self._gaps: dict[int, float] = {}  # missing id -> when first noticed (loop time)
        self._task: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()

    def _initial(self) -> tuple[int, int]:
        """Where a fresh hub starts: ``(cursor, newest id)``; on PostgreSQL ``LOOKBACK`` ids back."""
        with self.engine.connect() as conn:
            newest = conn.execute(select(func.max(Event.event_id))).scalar() or 0
            if not self.wait_for_gaps:
                return newest, newest
            below = conn.execute(
                select(Event.event_id).order_by(Event.event_id.desc()).offset(LOOKBACK).limit(1)  # type: ignore[union-attr]
            ).scalar()
        return below or 0, newest

    async def subscribe(self, listener: Listener, since: int | None) -> int:
        """Register ``listener`` and return the cursor: a ``since`` listener must replay ``(since, cursor]``."""
        async with self._start_lock:
            if self._task is None:
                self.cursor, self.newest = await anyio.to_thread.run_sync(self._initial)
                self._gaps.clear()
                self._task = asyncio.create_task(self._run(), name="fedloom-event-hub")
            # No await from here on: no event can slip between the cursor and the registration.
            listener.floor = self.newest if since is None else max(since, self.cursor)
            self._listeners.add(listener)
            return self.cursor

    def unsubscribe(self, listener: Listener) -> None:
        """Forget ``listener``."""
        self._listeners.discard(listener)

    async def _run(self) -> None:
        """Poll and publish until no listener has been left for ``IDLE_STOP_S``."""
        loop = asyncio.get_running_loop()
        idle_since = loop.time()
        while True:
            more = False
            try:
                rows = await anyio.to_thread.run_sync(fetch, self.engine, self.cursor)
                # A full batch delivered to its end: read on at once; else wait for new events (or a gap).
                more = self._publish(rows, loop.time()) and len(rows) == BATCH
            except Exception:  # noqa: BLE001 - the database may be briefly unreachable; keep tailing
                log.warning("event tailer: polling failed", exc_info=True)
                await asyncio.sleep(1.0)
            if self._listeners:
                idle_since = loop.time()
            elif loop.time() - idle_since > IDLE_STOP_S:
                self._task = None  # a later subscribe starts a fresh hub loop
                return
            if not more:
                await asyncio.sleep(POLL_S)

    def _publish(self, rows: list[Row], now: float) -> bool:
        """Hand ``rows`` (in id order) to the listeners, stopping at a young gap on PostgreSQL; True if all went."""
        expected = self.cursor + 1
        for row in rows:
            self.newest = max(self.newest, row.event_id)
            if self.wait_for_gaps and row.event_id != expected:
                noticed = self._gaps.setdefault(expected, now)
                if now - noticed < GAP_WAIT_S:
                    self._forget_gaps()
                    return False
                log.info("event ids %d..%d never appeared; skipping them", expected, row.event_id - 1)
            self.cursor = row.event_id
            expected = row.event_id + 1
            for listener in list(self._listeners):
                listener.offer(row)
        self._forget_gaps()
        return True

    def _forget_gaps(self) -> None:
        """Drop the gaps the cursor has passed."""
        self._gaps = {k: v for k, v in self._gaps.items() if k > self.cursor}


def hub_for(app: FastAPI) -> EventHub:
    """The process's hub, created on first use."""
    hub = getattr(app.state, "event_hub", None)
    if hub is None or hub.engine is not app.state.engine:
        hub = app.state.event_hub = EventHub(app.state.engine)
    return hub


def _key_of(ws: WebSocket) -> str | None:
    """The API key of a handshake: the bearer header, else ``?api_key=``."""
    header = ws.headers.get("authorization")
    if header is not None:
        scheme, _, key = header.partition(" ")
        return (key.strip() or None) if scheme.lower() == "bearer" else None
    return ws.query_params.get("api_key") or None


async def _refuse(ws: WebSocket, code: int, reason: str) -> None:
    """Accept, then close with ``code``: browsers see close codes but not refused handshakes."""
    await ws.accept()
    await ws.close(code, reason)


@router.websocket("/ws/events")
async def events(ws: WebSocket) -> None:
    """Stream events as JSON messages; ``docs/events.md`` describes auth, ``since`` and close codes."""
    state = ws.app.state
    key = _key_of(ws)
    principal = None
    if key:
        try:
            principal = await anyio.to_thread.run_sync(auth.resolve_key, state.engine, state.admin_key_hash, key)
        except Unauthorized:
            principal = None
    if key is None or principal is None:
        await _refuse(ws, CLOSE_UNAUTHORIZED, "missing or invalid API key")
        return
    raw_since = ws.query_params.get("since")
    since = None
    if raw_since is not None:
        if not (raw_since.isascii() and raw_since.isdigit() and len(raw_since) <= 18):
            await _refuse(ws, CLOSE_BAD_REQUEST, "since must be a non-negative integer event_id")
            return
        since = int(raw_since)
    experiment_id = ws.query_params.get("experiment_id")
    if experiment_id is not None:
        try:
            check_id(experiment_id, "experiment_id")
        except ValueError:
            await _refuse(ws, CLOSE_BAD_REQUEST, "experiment_id must be 1-128 letters, digits, '.', '_' or '-'")
            return
    hub = hub_for(ws.app)
    key_hash = auth.hash_key(key)
    if not principal.is_admin and hub.connections[key_hash] >= state.settings.rate_limit_websockets:
        await _refuse(ws, CLOSE_TOO_MANY, f"at most {state.settings.rate_limit_websockets} connection(s) per key")
        return
    hub.connections[key_hash] += 1
    listener = Listener(principal, experiment_id=experiment_id)
    try:
        cursor = await hub.subscribe(listener, since)
        await ws.accept()
        await _serve(ws, hub, listener, since, cursor)
    finally:
        hub.unsubscribe(listener)
        hub.connections[key_hash] -= 1
        if hub.connections[key_hash] <= 0:
            del hub.connections[key_hash]


async def _serve(ws: WebSocket, hub: EventHub, listener: Listener, since: int | None, cursor: int) -> None:
    """Send the replay, then live events, until the peer leaves or the listener overflows."""

    async def send_all() -> None:
        """Replay ``(since, cursor]`` page by page, then forward the queue."""
        if since is not None:
            after = since
            while after < cursor:
                rows = await anyio.to_thread.run_sync(fetch, hub.engine, after, cursor, listener.principal)
                if not rows:
                    break
                for row in rows:
                    if listener.wants(row):
                        await ws.send_text(row.text)
                after = rows[-1].event_id
        while (row := await listener.queue.get()) is not None:
            await ws.send_text(row.text)
        await ws.close(CLOSE_TOO_SLOW, "too far behind; reconnect with since=<last event_id>")

    async def until_disconnect() -> None:
        """Read (and ignore) what the peer sends until it disconnects."""
        while (await ws.receive())["type"] != "websocket.disconnect":
            pass

    async def then_stop(part: Callable[[], Awaitable[None]], scope: anyio.CancelScope) -> None:
        """Run one half; when it ends (the peer left, or we closed), end the other."""
        try:
            await part()
        except (WebSocketDisconnect, RuntimeError, OSError):  # the peer is gone mid-send
            pass
        finally:
            scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(then_stop, send_all, group.cancel_scope)
        group.start_soon(then_stop, until_disconnect, group.cancel_scope)
