"""Hostile input against a live server: ids built to escape the data dir in every path parameter,
oversized uploads, malformed multipart bodies. None may cause a 5xx, touch a file outside the data
dir, or make the server read a whole oversized body."""

from __future__ import annotations

import json
import re
import select
import socket
import time
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest

from api import auth
from fedloom_tools.launch import memory_bytes
from tests.conftest import LOCAL_ADMIN_KEY, LiveServer, start_serve, stop_serve

LIMIT_MB = 2
# Each is one path segment as sent on the wire (already percent-encoded where needed).
HOSTILE_IDS = {
    "dot-dot": "..",
    "encoded dot-dot": "%2e%2e",
    "traversal": quote("../../outside/secret.safetensors", safe=""),
    "double-encoded traversal": "..%252F..%252Foutside",
    "NUL": "alpha%00.safetensors",
    "10 kB": "a" * 10_000,
    "fullwidth letters": quote("ａｌｐｈａ"),
    "right-to-left override": quote("alpha\u202efdp.exe"),
    "combining accent": quote("alpha\u0301"),
    "backslash": quote("..\\..\\outside", safe=""),
    "leading dash": "-rf",
    "space": "alpha%20beta",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("hostile")
    (root / "outside").mkdir()
    (root / "outside" / "secret.safetensors").write_bytes(b"do not touch")
    live = start_serve(root / "data", {"FEDLOOM_MAX_UPLOAD_MB": str(LIMIT_MB)})
    yield live
    stop_serve(live)


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.api, headers=server.headers(), timeout=60) as client:
        reg = client.post("/clients/register", json={"client_id": "alpha", "capabilities": {}, "location": {}})
        assert reg.status_code == 200, reg.text
        yield client


def _outside_snapshot(server: LiveServer) -> dict[str, bytes]:
    """Every file beside the data dir (not in it), with its content."""
    root = server.data_dir.parent
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and server.data_dir not in p.parents and not p.name.endswith(".log")
    }


def _path_routes(server: LiveServer) -> list[tuple[str, str]]:
    """(method, path template) of every API route with a path parameter, from the OpenAPI document."""
    spec = httpx.get(f"{server.url}/openapi.json").json()
    return [
        (method.upper(), path)
        for path, item in spec["paths"].items()
        if "{" in path
        for method in item
        if method in {"get", "post", "put", "delete", "patch"}
    ]


def test_hostile_ids_in_every_path_parameter(server: LiveServer, http: httpx.Client) -> None:
    routes = _path_routes(server)
    assert len(routes) >= 8, routes  # clients, task, experiments, metrics, download, update, status, validate
    before = _outside_snapshot(server)
    for method, template in routes:
        for name, value in HOSTILE_IDS.items():
            path = re.sub(r"\{[^}]+\}", value, template).removeprefix("/api/v1")
            files = {"model_file": ("m.safetensors", b"x" * 64)} if method == "POST" else None
            data = {"metrics": "{}"} if method == "POST" else None
            resp = http.request(method, path, files=files, data=data)
            where = f"{method} {template} with {name}"
            assert resp.status_code in (400, 404), f"{where}: {resp.status_code} {resp.text[:200]}"
            error = resp.json()["error"]
            assert error["code"] in ("INVALID_REQUEST", "NOT_FOUND"), f"{where}: {error}"
            assert error["message"] and error["timestamp"], where
    assert _outside_snapshot(server) == before, "a file outside the data dir was created or changed"
    assert http.get("/health").status_code == 200


def test_upload_over_the_limit_is_refused_without_reading_it_all(server: LiveServer) -> None:
    """A body that claims 300 MB gets 413 long before 300 MB arrive, and the API's memory stays flat."""
    api_pid = server.child_pid("api")
    rss_before = memory_bytes(api_pid)
    boundary = "hostileboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model_file"; filename="big.safetensors"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    claimed = 300_000_000
    host, port = server.url.removeprefix("http://").split(":")
    request = (
        f"POST /api/v1/model/update/alpha HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {server.admin_key}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {claimed}\r\n\r\n"
    ).encode()
    chunk = b"\0" * (1 << 20)
    sent = 0
    answer = b""
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request + head)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
            assert sent < 64 * (1 << 20), "the server kept reading far past the limit"
        sock.settimeout(30)
        while b"\r\n\r\n" not in answer or not _complete(answer):
            part = sock.recv(65536)
            if not part:
                break
            answer += part
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 413 " in status_line, answer[:300]
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "INVALID_REQUEST" and str(LIMIT_MB) in json.dumps(body)
    assert memory_bytes(api_pid) - rss_before < 50 * (1 << 20)
    # Nothing of the refused upload stays in the data dir's spool.
    spool = server.data_dir / "tmp"
    assert not spool.exists() or not any(spool.iterdir())


def _complete(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    found = re.search(rb"content-length:\s*(\d+)", head, re.I)
    return found is None or len(body) >= int(found.group(1))


def test_malformed_multipart_bodies_are_clear_400s(http: httpx.Client) -> None:
    """Sent to the validate dry run, which reads the body of a registered client with no open round."""
    cases = {
        "no model_file part": {"data": {"metrics": "{}"}},
        "two model_file parts": {
            "content": b'--b\r\nContent-Disposition: form-data; name="model_file"; filename="m"\r\n\r\nabc\r\n' * 2
            + b"--b--\r\n",
            "headers": {"Content-Type": "multipart/form-data; boundary=b"},
        },
        "not multipart": {"content": b"raw bytes", "headers": {"Content-Type": "application/octet-stream"}},
        "no boundary": {"content": b"--x\r\n", "headers": {"Content-Type": "multipart/form-data"}},
        "cut short": {
            "content": b'--b\r\nContent-Disposition: form-data; name="model_file"; filename="m"\r\n\r\nabc',
            "headers": {"Content-Type": "multipart/form-data; boundary=b"},
        },
    }
    for name, kwargs in cases.items():
        resp = http.post("/model/validate/alpha", **kwargs)
        assert resp.status_code == 400, f"{name}: {resp.status_code} {resp.text[:200]}"
        assert resp.json()["error"]["code"] == "INVALID_REQUEST", name
    for raw in ("{oops", "[1, 2]"):
        body = http.post("/model/validate/alpha", files={"model_file": ("m", b"x")}, data={"metrics": raw}).json()
        failed = [c["name"] for c in body["checks"] if not c["passed"]]
        assert body["valid"] is False and "metrics" in failed, raw
    # An upload for a client with no open round is refused before its body is read.
    resp = http.post("/model/update/alpha", content=b"raw bytes", headers={"Content-Type": "text/plain"})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "EXPERIMENT_NOT_ACTIVE"


def test_keys_are_compared_in_constant_time(local_app, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Presented keys are hashed, and the admin key's hash is compared with hmac.compare_digest."""
    calls: list[tuple[str, str]] = []
    real = auth.hmac.compare_digest

    def spy(a, b):  # type: ignore[no-untyped-def]
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    client = local_app()
    assert client.get("/status").status_code == 200
    wrong = client.get("/status", headers={"Authorization": "Bearer fladmin_" + "y" * 43})
    assert wrong.status_code == 401
    assert len(calls) >= 2
    assert all(LOCAL_ADMIN_KEY not in (a, b) for a, b in calls), "a raw key was compared, not its hash"
