"""Client keys: revoke and rotate (in one process, and across two processes on one database), and
registration storing the client row and its key in one transaction."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

import api.auth as auth_module
from api.deps import PRINCIPAL_TTL_S
from fedloom_core.storage.db import ApiKey, Client, Event
from fedloom_core.storage.repo import session_scope


def _register(admin: TestClient, client_id: str) -> str:
    r = admin.post("/clients/register", json={"client_id": client_id})
    assert r.status_code == 200, r.text
    return r.json()["api_key"]


def _as(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _error(r, status: int, code: str) -> None:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["details"] and err["timestamp"].endswith("Z")


def test_revoke_stops_every_key_of_the_client_at_once_and_rotate_issues_a_working_one(local_app) -> None:  # type: ignore[no-untyped-def]
    admin = local_app()
    key = _register(admin, "site-1")
    other = _register(admin, "site-2")
    assert admin.get("/clients/site-1", headers=_as(key)).status_code == 200  # cached as valid now

    r = admin.post("/clients/site-1/revoke")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["client_id"] == "site-1" and body["revoked"] is True and body["revoked_keys"] == 1
    _error(admin.get("/clients/site-1", headers=_as(key)), 401, "UNAUTHORIZED")
    _error(admin.get("/clients/site-1/task", headers=_as(key)), 401, "UNAUTHORIZED")
    assert admin.get("/clients/site-2", headers=_as(other)).status_code == 200  # other clients unaffected
    assert admin.get("/clients/site-1").json()["client_id"] == "site-1"  # the client itself stays registered

    r = admin.post("/clients/site-1/rotate-key")
    assert r.status_code == 200, r.text
    new = r.json()["api_key"]
    assert new.startswith("fl_") and new != key and r.json()["revoked_keys"] == 0
    assert admin.get("/clients/site-1", headers=_as(new)).status_code == 200
    _error(admin.get("/clients/site-1", headers=_as(key)), 401, "UNAUTHORIZED")

    # Rotating again revokes the key just issued.
    newer = admin.post("/clients/site-1/rotate-key").json()["api_key"]
    _error(admin.get("/clients/site-1", headers=_as(new)), 401, "UNAUTHORIZED")
    assert admin.get("/clients/site-1", headers=_as(newer)).status_code == 200

    # Hashed at rest: no stored row holds a key, only its sha256.
    with session_scope(admin.app.state.engine) as s:
        rows = s.exec(select(ApiKey).where(ApiKey.client_id == "site-1")).all()
        events = [e.type for e in s.exec(select(Event).where(Event.client_id == "site-1")).all()]
    assert {r.key_hash for r in rows} == {auth_module.hash_key(k) for k in (key, new, newer)}
    assert [r.revoked for r in sorted(rows, key=lambda r: r.id or 0)] == [True, True, False]
    assert events.count("client_key_rotated") == 2 and events.count("client_keys_revoked") == 1


def test_revoke_and_rotate_refuse_unknown_and_bad_ids_and_non_admins(local_app) -> None:  # type: ignore[no-untyped-def]
    admin = local_app()
    key = _register(admin, "site-1")
    for action in ("revoke", "rotate-key"):
        _error(admin.post(f"/clients/nobody/{action}"), 404, "CLIENT_NOT_REGISTERED")
        _error(admin.post(f"/clients/bad%20id!/{action}"), 400, "INVALID_REQUEST")
        _error(admin.post(f"/clients/site-1/{action}", headers=_as(key)), 403, "FORBIDDEN")
        _error(admin.post(f"/clients/site-1/{action}", headers={"Authorization": ""}), 401, "UNAUTHORIZED")
    assert admin.get("/clients/site-1", headers=_as(key)).status_code == 200  # nothing was revoked


def test_a_key_revoked_by_one_api_process_stops_working_in_another_within_the_cache_ttl(local_app) -> None:  # type: ignore[no-untyped-def]
    first = local_app()
    second = local_app()  # a second app on the same data dir: the same SQLite database
    assert first.app is not second.app
    key = _register(first, "site-1")
    assert second.get("/clients/site-1", headers=_as(key)).status_code == 200  # cached in the second

    assert first.post("/clients/site-1/revoke").status_code == 200
    revoked_at = time.monotonic()
    while second.get("/clients/site-1", headers=_as(key)).status_code == 200:
        assert time.monotonic() - revoked_at < PRINCIPAL_TTL_S + 1.0, "the revoked key kept working past the TTL"
        time.sleep(0.2)
    _error(second.get("/clients/site-1", headers=_as(key)), 401, "UNAUTHORIZED")

    new = second.post("/clients/site-1/rotate-key").json()["api_key"]
    assert first.get("/clients/site-1", headers=_as(new)).status_code == 200  # new keys are never negatively cached


def test_registration_stores_the_client_and_its_key_together_or_neither(local_app, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    admin = local_app()
    # Every new key is the same string, so the second registration's key clashes with the first's
    # in the database's unique index on key_hash: the key insert fails for real.
    monkeypatch.setattr(auth_module, "new_key", lambda prefix="fl": "fl_fixed-for-the-clash")
    assert _register(admin, "first") == "fl_fixed-for-the-clash"
    quiet = TestClient(admin.app, base_url=str(admin.base_url), headers=admin.headers, raise_server_exceptions=False)
    _error(quiet.post("/clients/register", json={"client_id": "second"}), 500, "INTERNAL_ERROR")

    with session_scope(admin.app.state.engine) as s:
        assert s.get(Client, "second") is None  # no client row without its key
        assert s.exec(select(ApiKey).where(ApiKey.client_id == "second")).first() is None
        assert not s.exec(select(Event).where(Event.client_id == "second")).all()
    _error(admin.get("/clients/second"), 404, "CLIENT_NOT_REGISTERED")

    monkeypatch.undo()
    key = _register(admin, "second")  # not locked out: the id registers once the key can be stored
    assert admin.get("/clients/second", headers=_as(key)).status_code == 200
    _error(admin.post("/clients/register", json={"client_id": "second"}), 409, "CONFLICT")


@pytest.mark.parametrize("backend", ["memory", "database"])
def test_an_unknown_key_is_answered_from_the_negative_cache(local_app, backend: str) -> None:  # type: ignore[no-untyped-def]
    admin = local_app(rate_limit_backend=backend)
    engine = admin.app.state.engine
    lookups = []

    def count(conn, cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        if "FROM api_key" in statement:
            lookups.append(statement)

    from sqlalchemy import event

    event.listen(engine, "before_cursor_execute", count)
    try:
        for _ in range(5):
            _error(admin.get("/status", headers=_as("fl_not-a-key")), 401, "UNAUTHORIZED")
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(lookups) == 1  # the first request asked the database, the repeats did not


def test_the_sdk_rotates_and_revokes_keys(local_app) -> None:  # type: ignore[no-untyped-def]
    from fedloom import FLAPIError, FLClient
    from tests.conftest import LOCAL_ADMIN_KEY

    admin = local_app()
    sdk = FLClient("http://test", LOCAL_ADMIN_KEY, transport=admin._transport)
    old = sdk.register_client("site-sdk")["api_key"]
    new = sdk.rotate_client_key("site-sdk")
    assert isinstance(new, str) and new != old
    assert sdk.with_key(new).get_client("site-sdk")["client_id"] == "site-sdk"
    with pytest.raises(FLAPIError) as refused:
        sdk.with_key(old).get_client("site-sdk")
    assert refused.value.status == 401
    assert sdk.revoke_client("site-sdk")["revoked"] is True
    with pytest.raises(FLAPIError) as refused:
        sdk.with_key(new).get_client("site-sdk")
    assert refused.value.status == 401


def test_the_principal_cache_is_bounded_and_forgets_unknown_keys_after_their_ttl(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import api.deps as deps

    clock = [1000.0]
    monkeypatch.setattr(deps.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(deps, "PRINCIPAL_CACHE_MAX", 3)
    cache = deps.PrincipalCache(engine=None)  # type: ignore[arg-type]
    for i in range(5):
        cache.put_unknown(f"d{i}")
    assert [cache.is_unknown(f"d{i}") for i in range(5)] == [False, False, True, True, True]  # oldest dropped
    clock[0] += deps.UNKNOWN_KEY_TTL_S + 0.1
    assert not cache.is_unknown("d4")

    site = auth_module.Principal("client", "site-1")
    cache.put("k1", site)
    cache.put("k2", auth_module.Principal("client", "site-2"))
    assert cache.get("k1") == site and cache.verified("k1")
    clock[0] += deps.PRINCIPAL_TTL_S + 0.1
    assert cache.get("k1") is None and cache.verified("k1")  # re-checked with the database, still exempt
    cache.forget_client("site-1")
    assert not cache.verified("k1") and cache.verified("k2")


def test_cached_keys_past_their_ttl_are_rechecked_all_at_once_and_revoked_ones_refused(local_app, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import api.deps as deps
    from api.auth import revoke_client_keys

    admin = local_app()
    keys = {f"site-{i}": _register(admin, f"site-{i}") for i in range(4)}
    calls = {"resolve_key": 0, "revoked_among": 0}
    for name in calls:
        real = getattr(auth_module, name)

        def counted(*args, _real=real, _name=name):  # type: ignore[no-untyped-def]
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(auth_module, name, counted)
    clock = [time.monotonic()]
    monkeypatch.setattr(deps.time, "monotonic", lambda: clock[0])

    def use_all() -> dict[str, int]:
        return {cid: admin.get(f"/clients/{cid}", headers=_as(key)).status_code for cid, key in keys.items()}

    def since(before: dict[str, int]) -> dict[str, int]:
        return {name: calls[name] - before[name] for name in calls}

    assert set(use_all().values()) == {200}
    assert calls["resolve_key"] == 4  # each key resolved once
    before = dict(calls)
    clock[0] += PRINCIPAL_TTL_S + 0.1
    assert set(use_all().values()) == {200}
    assert since(before) == {"resolve_key": 0, "revoked_among": 1}  # past the TTL: one re-check for every key

    # Revoked in the database, as another API process would: refused once the TTL has passed.
    with session_scope(admin.app.state.engine) as s:
        assert revoke_client_keys(s, "site-2") == 1
    assert use_all()["site-2"] == 200  # still within the TTL of the last re-check
    before = dict(calls)
    clock[0] += PRINCIPAL_TTL_S + 0.1
    assert use_all() == {"site-0": 200, "site-1": 200, "site-2": 401, "site-3": 200}
    assert since(before) == {"resolve_key": 1, "revoked_among": 1}  # the dropped key was looked up on its own
