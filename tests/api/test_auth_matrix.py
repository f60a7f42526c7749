"""Who may call what: every endpoint against the admin key, its own client key, another client's key,
no key and an unknown key."""

from __future__ import annotations

import itertools

import httpx
import pytest

from tests.conftest import LiveServer

pytestmark = pytest.mark.e2e

ADMIN, OWN, OTHER = "admin", "own", "other"
_counter = itertools.count()


def _new_id() -> str:
    return f"matrix-new-{next(_counter)}"


# (method, path, who may call it, request kwargs). "{me}" is the owner's client id.
ENDPOINTS = [
    ("GET", "/status", {ADMIN, OWN, OTHER}, {}),
    ("GET", "/training/status", {ADMIN, OWN, OTHER}, {}),
    ("GET", "/model/global", {ADMIN, OWN, OTHER}, {}),
    ("GET", "/model/download/model_none_round_0", {ADMIN, OWN, OTHER}, {}),
    ("GET", "/clients/{me}", {ADMIN, OWN}, {}),
    ("GET", "/clients/{me}/task", {ADMIN, OWN}, {}),
    ("GET", "/metrics/clients/{me}", {ADMIN, OWN}, {}),
    (
        "POST",
        "/model/update/{me}",
        {ADMIN, OWN},
        {"files": {"model_file": ("m", b"x")}, "data": {"metrics": '{"data_samples": 1}'}},
    ),
    ("POST", "/model/validate/{me}", {ADMIN, OWN}, {"files": {"model_file": ("m", b"x")}}),
    ("POST", "/clients/register", {ADMIN}, {"json": lambda: {"client_id": _new_id()}}),
    ("GET", "/clients", {ADMIN}, {}),
    ("GET", "/clients/select", {ADMIN}, {}),
    (
        "POST",
        "/training/start",
        {ADMIN},
        {"json": lambda: {"experiment_config": {"experiment_id": _new_id(), "min_clients": 1000}}},
    ),
    ("POST", "/training/stop", {ADMIN}, {"json": lambda: {"reason": "matrix"}}),
    ("GET", "/metrics/training", {ADMIN}, {}),
    ("GET", "/experiments", {ADMIN}, {}),
    (
        "POST",
        "/experiments",
        {ADMIN},
        {
            "json": lambda: {
                "experiment_id": _new_id(),
                "name": "m",
                "dataset_config": {"name": "digits"},
                "model_config": {"architecture": "MLP", "input_shape": [8, 8, 1], "num_classes": 10},
            }
        },
    ),
    ("GET", "/experiments/none-such", {ADMIN}, {}),
]


@pytest.fixture(scope="module")
def keys(live_server: LiveServer) -> dict[str, str]:
    out = {ADMIN: live_server.admin_key}
    for role, cid in ((OWN, "owner"), (OTHER, "intruder")):
        resp = httpx.post(f"{live_server.api}/clients/register", json={"client_id": cid}, headers=live_server.headers())
        assert resp.status_code == 200, resp.text
        out[role] = resp.json()["api_key"]
    return out


@pytest.mark.parametrize(("method", "path", "allowed", "kwargs"), ENDPOINTS, ids=[f"{m} {p}" for m, p, *_ in ENDPOINTS])
def test_access(
    live_server: LiveServer, keys: dict[str, str], method: str, path: str, allowed: set[str], kwargs: dict
) -> None:
    url = f"{live_server.api}{path.format(me='owner')}"

    def call(headers: dict[str, str]) -> httpx.Response:
        resolved = {k: (v() if callable(v) else v) for k, v in kwargs.items()}
        return httpx.request(method, url, headers=headers, timeout=30, **resolved)

    for role in (ADMIN, OWN, OTHER):
        resp = call({"Authorization": f"Bearer {keys[role]}"})
        if role in allowed:
            assert resp.status_code not in (401, 403), f"{role}: {resp.status_code} {resp.text}"
        else:
            assert resp.status_code == 403, f"{role}: {resp.status_code} {resp.text}"
            assert resp.json()["error"]["code"] == "FORBIDDEN"
    for headers in ({}, {"Authorization": "Bearer fl_not-a-real-key"}):
        resp = call(headers)
        assert resp.status_code == 401, resp.text
        assert resp.json()["error"]["code"] == "UNAUTHORIZED"


def test_health_is_open(live_server: LiveServer) -> None:
    assert httpx.get(f"{live_server.api}/health").status_code == 200


def test_client_keys_are_stored_hashed(live_server: LiveServer, keys: dict[str, str]) -> None:
    files = [p for p in live_server.data_dir.glob("fedloom.db*") if p.is_file()]
    assert files
    for path in files:
        content = path.read_bytes()
        for role in (OWN, OTHER):
            assert keys[role].encode() not in content, path
