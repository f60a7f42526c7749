"""Rate limits (memory and database stores) and ``WS /ws/events`` during a real federated run."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import NullPool
from sqlmodel import Session, func, select
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from api import errors, ratelimit
from api.auth import hash_key
from api.ratelimit import DatabaseStore, Limit, MemoryStore, RateLimiter
from api.routes import events
from api.routes.events import GAP_WAIT_S, EventHub, fetch
from fedloom_core.settings import Settings
from fedloom_core.storage.db import Event, create_schema, make_engine
from fedloom_core.storage.repo import emit_event
from tests.conftest import LiveServer, start_serve, stop_serve

WINDOW_S = 30
PG_URL = os.environ.get("FEDLOOM_TEST_POSTGRES_URL") or "postgresql+psycopg://postgres@127.0.0.1:5432/test"
CLIENTS = 2


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, LiveServer]]:
    """A server with tight limits (memory store) and one for the run (database store), started together."""
    tight = {
        "FEDLOOM_RATE_LIMIT_GENERAL": "100",
        "FEDLOOM_RATE_LIMIT_GENERAL_WINDOW_S": str(WINDOW_S),
        "FEDLOOM_RATE_LIMIT_UPLOADS": "10",
        "FEDLOOM_RATE_LIMIT_UPLOADS_WINDOW_S": str(WINDOW_S),
        "FEDLOOM_RATE_LIMIT_TRAINING_START": "5",
        "FEDLOOM_RATE_LIMIT_TRAINING_START_WINDOW_S": str(WINDOW_S),
    }
    # Client processes and the test share the admin key: the run gets a generous budget.
    roomy = {"FEDLOOM_RATE_LIMIT_BACKEND": "database", "FEDLOOM_RATE_LIMIT_GENERAL": "100000"}
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(start_serve, tmp_path_factory.mktemp("rl") / "data", tight),
            pool.submit(start_serve, tmp_path_factory.mktemp("ws") / "data", roomy),
        ]
    started = [f.result() for f in futures if f.exception() is None]
    try:
        for f in futures:
            f.result()  # re-raise a failed start, after the other server is in ``started``
        yield started[0], started[1]
    finally:
        for server in started:
            stop_serve(server)


def pg_engine(schema: str) -> Engine:
    """A ``make_engine`` engine whose connections all use ``schema``."""
    engine = make_engine(PG_URL)

    @event.listens_for(engine, "connect")
    def _search_path(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cur:
            cur.execute(f'SET search_path TO "{schema}"')
        dbapi_conn.commit()

    return engine


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Engine, Any]]:
    """An engine with the schema, and a factory of further engines on the same database (replicas)."""
    made: list[Engine] = []
    if request.param == "sqlite":

        def factory() -> Engine:
            made.append(make_engine(f"sqlite:///{tmp_path}/rl.db"))
            return made[-1]

        engine = factory()
        create_schema(engine)
        yield engine, factory
        for eng in made:
            eng.dispose()
        return
    admin = create_engine(make_url(PG_URL), poolclass=NullPool)
    try:
        with admin.connect():
            pass
    except Exception as exc:  # noqa: BLE001
        admin.dispose()
        reason = f"PostgreSQL not reachable at {PG_URL}: {type(exc).__name__}"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    schema = f"rl_{uuid.uuid4().hex}"
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))

    def pg_factory() -> Engine:
        made.append(pg_engine(schema))
        return made[-1]

    try:
        engine = pg_factory()
        create_schema(engine)
        yield engine, pg_factory
    finally:
        for eng in made:
            eng.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def register(server: LiveServer, client_id: str) -> str:
    resp = httpx.post(f"{server.api}/clients/register", headers=server.headers(), json={"client_id": client_id})
    assert resp.status_code == 200, resp.text
    return resp.json()["api_key"]


def fresh_window(need_s: float) -> None:
    """Sleep into the next fixed window unless this one has ``need_s`` left."""
    left = WINDOW_S - time.time() % WINDOW_S
    if left < need_s:
        time.sleep(left + 0.05)


def limit_headers(resp: httpx.Response) -> tuple[int, int, int]:
    h = resp.headers
    return int(h["x-ratelimit-limit"]), int(h["x-ratelimit-remaining"]), int(h["x-ratelimit-reset"])


def assert_rate_limited(resp: httpx.Response, limit: int) -> None:
    assert resp.status_code == 429, resp.text
    err = resp.json()["error"]
    assert err["code"] == "RATE_LIMITED" and err["message"] and err["details"] and err["timestamp"].endswith("Z")
    got_limit, remaining, reset = limit_headers(resp)
    assert (got_limit, remaining) == (limit, 0)
    assert 1 <= int(resp.headers["retry-after"]) <= math.ceil(reset - time.time()) + 1 <= WINDOW_S + 1


# ---------------------------------------------------------------- live limits (memory store)


@pytest.mark.e2e
def test_general_limit_counts_down_then_refuses_and_keys_have_their_own_budget(servers: tuple) -> None:
    server = servers[0]
    k1, k2 = register(server, "rl-g1"), register(server, "rl-g2")
    fresh_window(8)
    with httpx.Client(base_url=server.api, headers=server.headers(k1)) as http:
        resets = set()
        for i in range(1, 101):
            resp = http.get("/status")
            assert resp.status_code == 200, resp.text
            limit, remaining, reset = limit_headers(resp)
            assert (limit, remaining) == (100, 100 - i)
            resets.add(reset)
        assert len(resets) == 1 and reset % WINDOW_S == 0 and 0 < reset - time.time() <= WINDOW_S
        assert_rate_limited(http.get("/status"), 100)
        assert_rate_limited(http.get("/clients/rl-g1"), 100)
        assert http.get("/health").status_code == 200 and "x-ratelimit-limit" not in http.get("/health").headers
    other = httpx.get(f"{server.api}/status", headers=server.headers(k2))
    assert other.status_code == 200 and limit_headers(other)[:2] == (100, 99)
    # Errors carry the headers too; a request without a key counts for its IP.
    anonymous = httpx.get(f"{server.api}/status")
    assert anonymous.status_code == 401 and limit_headers(anonymous)[0] == 100


@pytest.mark.e2e
def test_eleventh_upload_is_refused_even_when_uploads_are_invalid(servers: tuple) -> None:
    server = servers[0]
    key = register(server, "rl-up")
    fresh_window(5)
    with httpx.Client(base_url=server.api, headers=server.headers(key)) as http:
        for i in range(1, 11):
            resp = http.post("/model/update/rl-up", data={"metrics": "{}"})
            # Nothing is running, so the upload is refused before its body is read.
            assert resp.status_code == 409, resp.text
            assert limit_headers(resp)[:2] == (10, 10 - i)  # the uploads limit is the tightest
        assert_rate_limited(http.post("/model/update/rl-up", data={"metrics": "{}"}), 10)
        # Every upload also counted toward the general limit.
        assert limit_headers(http.get("/status"))[:2] == (100, 100 - 12)


@pytest.mark.e2e
def test_sixth_training_start_is_refused(servers: tuple) -> None:
    server = servers[0]
    key = server.admin_key
    fresh_window(5)
    bad = {"experiment_config": {"rounds": "many"}}
    with httpx.Client(base_url=server.api, headers=server.headers(key)) as http:
        for i in range(1, 6):
            resp = http.post("/training/start", json=bad)
            assert resp.status_code == 400 and limit_headers(resp)[:2] == (5, 5 - i), resp.text
        assert_rate_limited(http.post("/training/start", json=bad), 5)


# ---------------------------------------------------------------- counter stores


def hammer(limiter: RateLimiter, threads: int = 8, hits: int = 30) -> list[bool]:
    """``threads`` threads each checking ``hits`` times at once; whether each check was allowed."""
    limits = [Limit("general", 100, 60)]
    now = time.time() // 60 * 60 + 1  # early in a window: no roll-over during the test
    allowed: list[bool] = []
    barrier = threading.Barrier(threads)

    def run() -> None:
        barrier.wait()
        for _ in range(hits):
            allowed.append(limiter.check("key:abc", limits, now=now).allowed)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    last = limiter.check("key:abc", limits, now=now)
    assert last.usage.count == threads * hits + 1 and last.headers()["X-RateLimit-Remaining"] == "0"
    return allowed


def test_memory_store_allows_exactly_the_limit_under_concurrency() -> None:
    allowed = hammer(RateLimiter(MemoryStore()))
    assert len(allowed) == 240 and sum(allowed) == 100


def test_database_store_allows_exactly_the_limit_under_concurrency(db: tuple) -> None:
    engine, _ = db
    allowed = hammer(RateLimiter(DatabaseStore(engine)))
    assert len(allowed) == 240 and sum(allowed) == 100


def test_two_replicas_share_one_budget_and_windows_roll_over(db: tuple) -> None:
    _, factory = db
    a, b = RateLimiter(DatabaseStore(factory())), RateLimiter(DatabaseStore(factory()))
    limits = [Limit("general", 5, 10), Limit("uploads", 2, 10)]
    t0 = 1_000_000.0
    got = [(a if i % 2 else b).check("key:k", limits, now=t0 + i * 0.1) for i in range(4)]
    assert [d.allowed for d in got] == [True, True, False, False]
    assert got[0].usage.limit.name == "uploads" and got[1].headers()["X-RateLimit-Remaining"] == "0"
    assert got[3].usage.reset == t0 + 10 and got[3].retry_after == 10
    assert a.check("key:other", limits, now=t0).allowed  # another key, another budget
    fresh = b.check("key:k", limits, now=t0 + 10)
    assert fresh.allowed and fresh.usage.count == 1
    # A replica whose clock lags counts into the newer window instead of resetting it.
    lagging = a.check("key:k", limits, now=t0 + 9)
    assert lagging.usage.count == 2 and lagging.usage.reset == t0 + 20


def test_database_middleware_limits_and_marks_every_response(db: tuple) -> None:
    engine, _ = db
    # A window of ~4 months: the test cannot straddle a window boundary.
    settings = Settings(rate_limit_backend="database", rate_limit_general=4, rate_limit_general_window_s=1e7)
    app = FastAPI()
    errors.install(app)

    @app.get("/api/v1/ok")
    def ok() -> dict:
        return {"ok": True}

    @app.get("/api/v1/boom")
    def boom() -> dict:
        raise ValueError("boom")

    @app.get("/api/v1/health")
    def health() -> dict:
        return {"status": "healthy"}

    @app.websocket("/ws/hello")
    async def hello(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text("hello")
        await ws.close()

    ratelimit.install(app, settings)
    app.state.engine = engine
    with TestClient(app, raise_server_exceptions=False) as http:
        assert http.get("/api/v1/ok").headers["x-ratelimit-remaining"] == "3"
        crashed = http.get("/api/v1/boom")
        assert crashed.status_code == 500 and crashed.json()["error"]["code"] == "INTERNAL_ERROR"
        assert crashed.headers["x-ratelimit-remaining"] == "2"
        with http.websocket_connect("/ws/hello") as ws:
            assert ws.receive_text() == "hello"
            assert dict(ws.extra_headers or [])[b"x-ratelimit-remaining"] == b"1"
        assert http.get("/api/v1/ok").headers["x-ratelimit-remaining"] == "0"
        refused = http.get("/api/v1/ok")
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "RATE_LIMITED"
        assert int(refused.headers["retry-after"]) >= 1
        with http.websocket_connect("/ws/hello") as ws, pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
        assert closed.value.code == 4429
        assert http.get("/api/v1/health").status_code == 200
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count FROM rate_counter")).scalar() == 6


@pytest.mark.postgres
@pytest.mark.parametrize("db", ["postgresql"], indirect=True)  # SQLite commits ids in order
def test_postgres_ids_committed_out_of_order_are_delivered_in_order(db: tuple) -> None:
    engine, _ = db
    hub = EventHub(engine)
    with Session(engine) as first:
        emit_event(first, type="slow")
        first.flush()  # the id is taken, not committed
        slow = first.exec(select(func.max(Event.event_id))).one()
        with Session(engine) as second:
            emit_event(second, type="fast")
            second.commit()
        hub._publish(fetch(engine, hub.cursor), now=0.0)
        assert hub.cursor == slow - 1 and hub.newest == slow + 1
        first.commit()
    hub._publish(fetch(engine, hub.cursor), now=0.1)
    assert hub.cursor == slow + 1
    # A rolled-back id is given up on after GAP_WAIT_S.
    with Session(engine) as rolled:
        emit_event(rolled, type="gone")
        rolled.flush()
        rolled.rollback()
    with Session(engine) as s:
        emit_event(s, type="after")
        s.commit()
    hub._publish(fetch(engine, hub.cursor), now=1.0)
    assert hub.cursor == slow + 1
    hub._publish(fetch(engine, hub.cursor), now=1.0 + GAP_WAIT_S)
    assert hub.cursor == slow + 3


# ---------------------------------------------------------------- WebSocket events


def events_app(engine: Engine, admin_key: str) -> FastAPI:
    """Just the events route on ``engine``: one API process of several."""
    app = FastAPI()
    app.include_router(events.router)
    app.state.engine = engine
    app.state.admin_key_hash = hash_key(admin_key)
    app.state.settings = Settings()
    return app


@pytest.mark.timeout(60)
def test_two_api_processes_deliver_concurrent_writes_in_commit_safe_order(db: tuple) -> None:
    engine, factory = db
    admin = {"Authorization": "Bearer fladmin_test"}
    with Session(engine) as s:
        emit_event(s, type="before")
        s.commit()

    def write(n: int) -> None:
        for i in range(25):
            with Session(engine) as s:
                emit_event(s, type="concurrent", experiment_id=f"w{n}", i=i)
                s.commit()

    apps = [events_app(factory(), "fladmin_test") for _ in range(2)]
    with TestClient(apps[0]) as one, TestClient(apps[1]) as two:
        with (
            one.websocket_connect("/ws/events?since=0", headers=admin) as replaying,
            two.websocket_connect("/ws/events", headers=admin) as live,
        ):
            writers = [threading.Thread(target=write, args=(n,)) for n in range(4)]
            for t in writers:
                t.start()
            for t in writers:
                t.join(30)
            got_replaying = [replaying.receive_json() for _ in range(101)]
            got_live = [live.receive_json() for _ in range(100)]
    with engine.connect() as conn:
        stored = [r[0] for r in conn.execute(text("SELECT event_id FROM event ORDER BY event_id"))]
    assert [m["event_id"] for m in got_replaying] == stored
    assert got_live == got_replaying[1:]
    assert got_replaying[0]["type"] == "before" and {m["type"] for m in got_live} == {"concurrent"}


def ws_url(server: LiveServer, **params: object) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"{server.url.replace('http', 'ws', 1)}/ws/events" + (f"?{query}" if query else "")


async def collect(ws: ClientConnection, into: list[dict], until: str, timeout: float = 90) -> None:
    """Append messages to ``into`` until one of type ``until`` arrives."""
    async with asyncio.timeout(timeout):
        while True:
            into.append(json.loads(await ws.recv()))
            if into[-1]["type"] == until:
                return


async def closed_with(url: str, headers: dict | None = None) -> int:
    async with connect(url, additional_headers=headers) as ws:
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 10)
    assert info.value.rcvd is not None
    return info.value.rcvd.code


@pytest.mark.e2e
async def test_ws_refuses_bad_keys_and_bad_since(servers: tuple) -> None:
    server = servers[1]
    assert await closed_with(ws_url(server)) == 4401
    assert await closed_with(ws_url(server, api_key="nope")) == 4401
    assert await closed_with(ws_url(server), {"Authorization": "Bearer nope"}) == 4401
    assert await closed_with(ws_url(server, since="abc"), server.headers()) == 4400


def start_body() -> dict:
    return {
        "experiment_config": {
            "experiment_id": "ws-run",
            "rounds": 2,
            "min_clients": CLIENTS,
            "client_fraction": 1.0,
            "dataset": "digits",
            "model_architecture": "MLP",
        },
        "training_config": {"local_epochs": 1, "batch_size": 32, "learning_rate": 0.05, "optimizer": "SGD"},
        "aggregation_config": {"strategy": "FedAvg", "weighted": True, "min_updates": CLIENTS},
    }


@pytest.mark.e2e
async def test_events_of_a_real_run_reach_listeners_in_order_and_survive_reconnects(
    servers: tuple, tmp_path: Path
) -> None:
    server = servers[1]
    keys = {f"ws{i}": register(server, f"ws{i}") for i in range(1, CLIENTS + 1)}
    admin = server.headers()
    procs: list[subprocess.Popen] = []
    a_msgs: list[dict] = []
    b_msgs: list[dict] = []
    c_msgs: list[dict] = []
    try:
        # Client processes take a while to boot; they find themselves registered (no event) and wait.
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDLOOM_")}
        for i, client_id in enumerate(keys, 1):
            cmd = [sys.executable, "-m", "fedloom.cli", "client", "--server", server.url]
            cmd += ["--api-key", server.admin_key, "--client-id", client_id, "--partition", f"{i}/{CLIENTS}"]
            log = open(tmp_path / f"{client_id}.log", "wb")  # noqa: SIM115
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        async with (
            connect(ws_url(server), additional_headers=admin) as a,
            connect(ws_url(server, api_key=server.admin_key)) as b,
            connect(ws_url(server), additional_headers=server.headers(keys["ws1"])) as c,
        ):
            assert await closed_with(ws_url(server, api_key=keys["ws1"])) == 4429  # c holds ws1's one slot
            async with httpx.AsyncClient(base_url=server.api, headers=admin, timeout=60) as http:
                started = await http.post("/training/start", json=start_body())
                assert started.status_code == 200, started.text
            a_task = asyncio.create_task(collect(a, a_msgs, "training_completed"))
            c_task = asyncio.create_task(collect(c, c_msgs, "training_completed"))
            await collect(b, b_msgs, "round_completed")
            await b.close()  # b leaves mid-run ...
            async with asyncio.timeout(60):
                while not a_msgs or a_msgs[-1]["event_id"] < b_msgs[-1]["event_id"] + 2:
                    await asyncio.sleep(0.05)
            async with connect(ws_url(server, since=b_msgs[-1]["event_id"]), additional_headers=admin) as b2:
                await collect(b2, b_msgs, "training_completed")  # ... and catches up
            await asyncio.gather(a_task, c_task)
        for proc in procs:
            assert proc.wait(timeout=60) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()

    ids = [m["event_id"] for m in a_msgs]
    assert ids == sorted(set(ids)), ids
    assert b_msgs == a_msgs  # every event exactly once across the reconnect
    assert_run_events(a_msgs)
    assert {m.get("client_id") for m in c_msgs} == {None, "ws1"}
    assert [m["round"] for m in c_msgs if m["type"] == "client_update"] == [1, 2]
    assert [m for m in a_msgs if m.get("client_id") in (None, "ws1")] == c_msgs

    # since=0 replays the whole log; for a client key, without other clients' events.
    replay: list[dict] = []
    async with connect(ws_url(server, since=0), additional_headers=admin) as ws:
        await collect(ws, replay, "training_completed")
    assert [m for m in replay if m["event_id"] >= a_msgs[0]["event_id"]] == a_msgs
    assert {m["client_id"] for m in replay if m["type"] == "client_registered"} >= set(keys)
    for _ in range(20):  # c's slot is released once the server has seen it close
        try:
            mine: list[dict] = []
            async with connect(ws_url(server, since=0, api_key=keys["ws1"])) as ws:
                await collect(ws, mine, "training_completed", timeout=20)
            break
        except ConnectionClosed:
            await asyncio.sleep(0.1)
    assert {m.get("client_id") for m in mine} == {None, "ws1"}


def assert_run_events(msgs: list[dict]) -> None:
    types = [m["type"] for m in msgs]
    assert types[0] == "training_started" and types[-1] == "training_completed", types
    assert types.count("round_completed") == types.count("training_progress") == 2
    assert types.count("client_update") == 2 * CLIENTS
    for m in msgs:
        assert m["timestamp"].endswith("Z") and isinstance(m["event_id"], int)
    for rnd in (1, 2):
        done = next(m for m in msgs if m["type"] == "round_completed" and m["round"] == rnd)
        assert done["experiment_id"] == "ws-run" and done["participating_clients"] == CLIENTS
        assert set(done["global_metrics"]) >= {"accuracy", "loss"} and done["round_duration"] > 0
        progress = next(m for m in msgs if m["type"] == "training_progress" and m["round"] == rnd)
        assert progress["experiment_id"] == "ws-run" and progress["progress"] == rnd / 2
        assert progress["metrics"] == done["global_metrics"]
        updates = [m for m in msgs if m["type"] == "client_update" and m["round"] == rnd]
        assert {u["client_id"] for u in updates} == {f"ws{i}" for i in range(1, CLIENTS + 1)}
        for u in updates:
            assert u["status"] == "training_completed" and u["experiment_id"] == "ws-run"
            assert set(u["metrics"]) >= {"local_accuracy", "training_time"}
            assert u["event_id"] < done["event_id"]
