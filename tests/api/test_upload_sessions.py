"""Resumable uploads against a live ``fedloom serve``: a connection dropped at ~90% resumes, bad chunks are refused."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tests.api.test_training_api import assert_error, register, start_body, wait_task
from tests.conftest import LiveServer, start_serve, stop_serve

pytestmark = pytest.mark.e2e
CHUNK = 4096


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_serve(
        tmp_path_factory.mktemp("sessions") / "data",
        {"FEDLOOM_UPLOAD_CHUNK_MB": str(CHUNK / 1e6), "FEDLOOM_MAX_UPLOAD_MB": "1"},
    )
    yield live
    stop_serve(live)


@pytest.fixture(scope="module")
def round_open(server: LiveServer) -> dict:
    """A one-round experiment over s1, s2 and s3 (s3 never uploads, so the round stays open); the keys and model."""
    with httpx.Client(base_url=server.api, headers=server.headers(), timeout=60) as http:
        keys = {cid: register(http, cid) for cid in ("s1", "s2", "s3")}
        body = start_body("exp-sessions", rounds=1, min_clients=3, round_timeout_s=3600)
        resp = http.post("/training/start", json=body)
        assert resp.status_code == 200, resp.text
        task = wait_task(http, "s1")
        keys["outsider"] = register(http, "outsider")  # registered after the round opened: not selected
        state = st_load(http.get(f"/model/download/{task['model_id']}").content)
    return {"keys": keys, "state": state}


def _as(server: LiveServer, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.api, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _update(state: dict, shift: float) -> bytes:
    return st_save({k: v + shift for k, v in state.items()})


def _put(http: httpx.Client, url: str, data: bytes, first: int, total: int) -> httpx.Response:
    last = first + len(data) - 1
    return http.put(url, content=data, headers={"Content-Range": f"bytes {first}-{last}/{total}"})


def _drop_mid_chunk(server: LiveServer, key: str, url: str, chunk: bytes, first: int, total: int, sent: int) -> None:
    """PUT ``chunk`` at ``first`` over a raw socket, send its first ``sent`` bytes, then close the connection."""
    parts = urlsplit(server.api)
    head = (
        f"PUT {parts.path}{url} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Range: bytes {first}-{first + len(chunk) - 1}/{total}\r\nContent-Length: {len(chunk)}\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(head + chunk[:sent])
        time.sleep(1.0)  # the server reads what was sent before it sees the connection close


def _blob_of(server: LiveServer, digest: str) -> Path:
    from fedloom_core.storage.keys import update_key

    return server.data_dir / "blobs" / update_key("exp-sessions", 1, "s1", digest)


def test_a_connection_dropped_at_90_percent_resumes_from_the_committed_offset(
    server: LiveServer, round_open: dict
) -> None:
    key = round_open["keys"]["s1"]
    data = _update(round_open["state"], 0.01)
    size = len(data)
    assert size > 4 * CHUNK
    with _as(server, key) as http:
        opened = http.post("/model/update/s1/sessions", json={"size": size, "metrics": {"data_samples": 40}})
        assert opened.status_code == 201, opened.text
        session = opened.json()
        assert session["offset"] == 0 and session["chunk_max_bytes"] == CHUNK and session["round"] == 1
        url = f"/model/update/s1/sessions/{session['upload_id']}"
        offset = 0
        drop_at = int(size * 0.9)
        while offset + CHUNK <= drop_at:
            resp = _put(http, url, data[offset : offset + CHUNK], offset, size)
            assert resp.status_code == 200, resp.text
            offset = resp.json()["offset"]
            assert resp.headers["Upload-Offset"] == str(offset)
        # The connection drops inside the chunk that crosses 90%.
        chunk = data[offset : offset + CHUNK]
        _drop_mid_chunk(server, key, url, chunk, offset, size, drop_at - offset)
        deadline = time.monotonic() + 10
        while (state := http.get(url).json())["offset"] != drop_at:
            assert time.monotonic() < deadline, state
            time.sleep(0.1)
        head = http.head(url)
        assert head.status_code == 200 and head.headers["Upload-Offset"] == str(drop_at)
        assert head.headers["Upload-Length"] == str(size)
        # Not done yet: finishing now is refused.
        assert_error(http.post(f"{url}/complete"), 409, "CONFLICT")
        # Resume: only the last ~10% goes again.
        offset = drop_at
        while offset < size:
            resp = _put(http, url, data[offset : offset + CHUNK], offset, size)
            assert resp.status_code == 200, resp.text
            offset = resp.json()["offset"]
        assert resp.json()["complete"] is True
        digest = hashlib.sha256(data).hexdigest()
        done = http.post(f"{url}/complete", json={"sha256": digest})
        assert done.status_code == 200, done.text
        update = done.json()
        assert update["client_id"] == "s1" and update["round"] == 1 and update["validation_status"] == "pending"
        # A repeated finish (its answer lost, say) gives the same update.
        assert http.post(f"{url}/complete").json()["update_id"] == update["update_id"]
    # The stored update is byte for byte the file.
    assert _blob_of(server, digest).read_bytes() == data
    assert not (server.data_dir / "tmp" / "sessions" / session["upload_id"] / "data").exists()


def test_sessions_belong_to_their_client_and_refuse_bad_chunks(server: LiveServer, round_open: dict) -> None:
    keys = round_open["keys"]
    data = _update(round_open["state"], 0.02)
    size = len(data)
    with _as(server, keys["s2"]) as http, _as(server, keys["s3"]) as other:
        # Before anything is accepted: the key, the client's round, the size.
        assert_error(
            httpx.post(f"{server.api}/model/update/s2/sessions", json={"size": size, "metrics": {"data_samples": 1}}),
            401,
            "UNAUTHORIZED",
        )
        assert_error(
            other.post("/model/update/s2/sessions", json={"size": 10, "metrics": {"data_samples": 1}}), 403, "FORBIDDEN"
        )
        with _as(server, keys["outsider"]) as outsider:
            resp = outsider.post("/model/update/outsider/sessions", json={"size": 10, "metrics": {"data_samples": 1}})
            assert_error(resp, 409, "ROUND_NOT_ACTIVE")
        assert_error(
            http.post("/model/update/s2/sessions", json={"size": 2_000_000, "metrics": {"data_samples": 1}}),
            413,
            "INVALID_REQUEST",
        )
        assert_error(http.post("/model/update/s2/sessions", json={"size": size, "metrics": {}}), 400, "INVALID_REQUEST")
        assert_error(
            http.post("/model/update/s2/sessions", json={"size": 0, "metrics": {"data_samples": 1}}),
            400,
            "INVALID_REQUEST",
        )

        session = http.post("/model/update/s2/sessions", json={"size": size, "metrics": {"data_samples": 30}}).json()
        url = f"/model/update/s2/sessions/{session['upload_id']}"
        # Another client's key cannot see or touch it, even through its own id in the path.
        assert_error(other.get(url), 403, "FORBIDDEN")
        assert_error(other.get(f"/model/update/s3/sessions/{session['upload_id']}"), 404, "NOT_FOUND")
        assert_error(
            _put(other, f"/model/update/s3/sessions/{session['upload_id']}", data[:10], 0, size), 404, "NOT_FOUND"
        )
        # Ids are checked before they reach a path.
        assert_error(http.get("/model/update/s2/sessions/upl_x!y"), 400, "INVALID_REQUEST")
        assert_error(http.get("/model/update/s2/sessions/..%2F..%2Fetc"), 404, "NOT_FOUND")
        assert_error(http.get("/model/update/s2/sessions/upl_nothere"), 404, "NOT_FOUND")

        assert _put(http, url, data[:CHUNK], 0, size).status_code == 200
        # A chunk that does not start at the committed offset, or reaches past the size.
        err = assert_error(_put(http, url, data[:CHUNK], 0, size), 409, "CONFLICT")
        assert str(CHUNK) in err["details"]
        assert_error(_put(http, url, data[2 * CHUNK : 3 * CHUNK], 2 * CHUNK, size), 409, "CONFLICT")
        assert_error(_put(http, url, data[CHUNK : 2 * CHUNK], CHUNK, size + 1), 400, "INVALID_REQUEST")
        assert_error(
            http.put(
                url, content=data[CHUNK : CHUNK + 10], headers={"Content-Range": f"bytes {size - 5}-{size + 4}/{size}"}
            ),
            400,
            "INVALID_REQUEST",
        )
        assert_error(http.put(url, content=b"x"), 400, "INVALID_REQUEST")
        # Overlong: a range over the chunk bound, and a body longer than its range (sent chunked).
        assert_error(_put(http, url, data[CHUNK : 3 * CHUNK], CHUNK, size), 413, "INVALID_REQUEST")
        resp = http.put(
            url,
            content=iter([data[CHUNK : 2 * CHUNK], b"extra"]),
            headers={"Content-Range": f"bytes {CHUNK}-{2 * CHUNK - 1}/{size}"},
        )
        assert_error(resp, 413, "INVALID_REQUEST")
        assert http.get(url).json()["offset"] == CHUNK  # the refused chunk left nothing behind

        # The rest, then a wrong declared digest: refused and the session is gone.
        offset = CHUNK
        while offset < size:
            offset = _put(http, url, data[offset : offset + CHUNK], offset, size).json()["offset"]
        assert_error(http.post(f"{url}/complete", json={"sha256": "0" * 64}), 400, "INVALID_REQUEST")
        assert_error(http.get(url), 404, "NOT_FOUND")

        # Aborted sessions go too.
        session = http.post("/model/update/s2/sessions", json={"size": size, "metrics": {"data_samples": 30}}).json()
        url = f"/model/update/s2/sessions/{session['upload_id']}"
        assert http.delete(url).status_code == 204
        assert_error(http.get(url), 404, "NOT_FOUND")


def test_an_invalid_file_is_refused_at_finish_like_a_single_upload(server: LiveServer, round_open: dict) -> None:
    with _as(server, round_open["keys"]["s2"]) as http:
        bad = b"not a model at all" * 50
        session = http.post("/model/update/s2/sessions", json={"size": len(bad), "metrics": {"data_samples": 3}}).json()
        url = f"/model/update/s2/sessions/{session['upload_id']}"
        assert _put(http, url, bad, 0, len(bad)).status_code == 200
        assert_error(http.post(f"{url}/complete"), 400, "MODEL_VALIDATION_FAILED")
        assert not (server.data_dir / "tmp" / "sessions" / session["upload_id"]).exists()


def test_expired_sessions_are_refused_and_their_files_removed(server: LiveServer, round_open: dict) -> None:
    with _as(server, round_open["keys"]["s2"]) as http:
        session = http.post("/model/update/s2/sessions", json={"size": 100, "metrics": {"data_samples": 3}}).json()
        url = f"/model/update/s2/sessions/{session['upload_id']}"
        assert _put(http, url, b"a" * 10, 0, 100).status_code == 200
        directory = server.data_dir / "tmp" / "sessions" / session["upload_id"]
        old = time.time() - 2 * 86400
        for path in (directory / "data", directory / "meta.json", directory):
            os.utime(path, (old, old))
        assert_error(http.get(url), 404, "NOT_FOUND")
        assert not directory.exists()
