"""Key floods: made-up keys and keyless requests from one address are limited per address, before any
key lookup, while valid keys from the same address keep working; failures are logged without the key;
revoked keys stop working. Against a live server (memory counters) and in-process apps (database
counters, two apps sharing them)."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import event
from starlette.websockets import WebSocketDisconnect

from fedloom_tools.launch import memory_bytes
from tests.conftest import LiveServer, start_serve, stop_serve

MB = 1 << 20
BUDGET = 20
# Windows are fixed and aligned to the clock: an hour makes a rollover during the flood (and 20 more 401s) unlikely.
WINDOW_S = 3600


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_serve(
        tmp_path_factory.mktemp("auth") / "data",
        {"FEDLOOM_RATE_LIMIT_AUTH_FAILURES": str(BUDGET), "FEDLOOM_RATE_LIMIT_AUTH_FAILURES_WINDOW_S": str(WINDOW_S)},
    )
    yield live
    stop_serve(live)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.e2e
def test_300_made_up_keys_from_one_address_are_mostly_refused_429_and_valid_keys_still_work(
    server: LiveServer,
) -> None:
    api_pid = server.child_pid("api")
    with httpx.Client(base_url=server.api, headers=server.headers(), timeout=30) as http:
        key = http.post("/clients/register", json={"client_id": "flood-ok"}).json()["api_key"]
        assert http.get("/clients/flood-ok", headers=_bearer(key)).status_code == 200  # verified before the flood
        rss = memory_bytes(api_pid)
        assert rss is not None

        made_up = [f"fl_{secrets.token_urlsafe(32)}" for _ in range(300)]
        statuses, slowest, started = [], 0.0, time.monotonic()
        for bad in made_up:
            t0 = time.monotonic()
            r = http.get("/status", headers=_bearer(bad))
            slowest = max(slowest, time.monotonic() - t0)
            statuses.append(r.status_code)
            err = r.json()["error"]
            assert err["message"] and err["details"] and err["timestamp"].endswith("Z")
            if r.status_code == 429:
                assert err["code"] == "RATE_LIMITED" and int(r.headers["Retry-After"]) >= 1
            else:
                assert (r.status_code, err["code"]) == (401, "UNAUTHORIZED")
        elapsed = time.monotonic() - started

        assert elapsed < 60 and slowest < 1.0, (elapsed, slowest)  # 300 requests within a minute
        refused = statuses.count(429)
        assert refused >= 300 - BUDGET - 1 and statuses.count(401) + refused == 300, statuses
        assert statuses[:BUDGET] == [401] * BUDGET  # the budget itself is served

        # Keyless requests from the blocked address are refused too; a verified client key and the admin
        # key from the same address are served.
        blocked = http.get("/status", headers={"Authorization": ""})
        assert blocked.status_code == 429 and blocked.json()["error"]["code"] == "RATE_LIMITED"
        assert http.get("/clients/flood-ok", headers=_bearer(key)).status_code == 200
        assert http.get("/clients/flood-ok").status_code == 200
        assert http.get("/health").status_code == 200
        growth = memory_bytes(api_pid) - rss
        assert growth < 50 * MB, growth
        print(f"\nkey flood: {refused}/300 answered 429, slowest {slowest * 1000:.0f} ms, RSS +{growth / MB:.1f} MB")

    # The failures were logged, throttled, with the address and never a key or a piece of one.
    log = (server.data_dir / "logs" / "api.log").read_text(errors="replace")
    lines = [line for line in log.splitlines() if "authentication failure" in line]
    assert 2 <= len(lines) <= 5, lines
    assert "127.0.0.1" in lines[0] and "'/api/v1/status'" in lines[0]
    assert f"1 in the current {WINDOW_S} s window" in lines[0]
    assert any("127.0.0.1 is over its budget" in line for line in lines), lines
    for bad in made_up:
        assert bad[3:15] not in log and bad[-12:] not in log


def test_the_database_counters_share_one_address_budget_between_api_processes(local_app, caplog) -> None:  # type: ignore[no-untyped-def]
    """Two apps on one database (and one rate_counter table): the budget is shared, and once an app
    knows the address is over it, its refusals run no database statement at all."""
    # A window ending in 2033, so no rollover resets the shared count mid-test.
    settings = {
        "rate_limit_backend": "database",
        "rate_limit_auth_failures": 5,
        "rate_limit_auth_failures_window_s": 1e9,
        "rate_limit_general": 10_000,
    }
    first, second = local_app(**settings), local_app(**settings)
    key = first.post("/clients/register", json={"client_id": "nat-site"}).json()["api_key"]
    assert second.get("/clients/nat-site", headers=_bearer(key)).status_code == 200

    caplog.set_level(logging.WARNING, logger="fedloom.api.auth")
    statuses = [first.get("/status", headers=_bearer(f"fl_bad-{i}")).status_code for i in range(6)]
    assert statuses == [401] * 6  # the sixth failure goes past the budget of 5
    assert first.get("/status", headers=_bearer("fl_bad-7")).status_code == 429

    # The second app shares the count: its first failure from the address is already past the budget.
    assert second.get("/status", headers=_bearer("fl_bad-8")).status_code == 401
    statements: list[str] = []

    def record(_conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        statements.append(statement)

    engine = second.app.state.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        for i in range(20):
            r = second.get("/status", headers=_bearer(f"fl_other-{i}"))
            assert r.status_code == 429 and r.headers["Retry-After"]
        assert statements == []  # refused before any key lookup or counter update
    finally:
        event.remove(engine, "before_cursor_execute", record)
    with (
        second.websocket_connect("ws://test/ws/events?api_key=fl_ws", headers={"Authorization": ""}) as ws,
        pytest.raises(WebSocketDisconnect) as closed,
    ):
        ws.receive_json()
    assert closed.value.code == 4429  # the event stream's handshake is refused the same way
    assert second.get("/clients/nat-site", headers=_bearer(key)).status_code == 200  # verified there
    assert caplog.records and all("fl_bad" not in r.getMessage() for r in caplog.records)
    assert all("fl_other" not in r.getMessage() for r in caplog.records)


def test_a_body_is_never_read_before_its_request_is_authenticated(local_app) -> None:  # type: ignore[no-untyped-def]
    admin = local_app()
    key = admin.post("/clients/register", json={"client_id": "site-1"}).json()["api_key"]
    pulled: list[str] = []

    def body(path: str) -> Iterator[bytes]:
        pulled.append(path)
        yield b'{"client_id": "site-2"}'

    for method, path in [
        ("POST", "/clients/register"),
        ("POST", "/training/start"),
        ("POST", "/experiments"),
        ("POST", "/model/update/site-1"),
        ("PUT", "/experiments/exp-1/initial_model"),
    ]:
        for headers in ({"Authorization": ""}, _bearer("fl_made-up"), {"Authorization": "Basic abc"}):
            r = admin.request(method, path, content=body(path), headers={**headers, "Content-Type": "application/json"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "UNAUTHORIZED", (path, r.text)
    assert pulled == []
    # With a key, the body is read and the route decides (a client key may not register: 403).
    r = admin.post(
        "/clients/register", content=body("ok"), headers={**_bearer(key), "Content-Type": "application/json"}
    )
    assert r.status_code == 403 and pulled == ["ok"]
