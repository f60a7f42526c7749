"""Hostile uploads against a live server: bodies for a client that may not upload, stalled and trickled
bodies, multipart floods, decompression and header bombs on the validate dry run, and stored update
blobs that are corrupted or deleted mid-round. Each is answered in the spec's error format (or
``valid: false``) within a second, with the API's memory flat, and the server keeps serving."""

from __future__ import annotations

import json
import os
import re
import select
import socket
import struct
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from sqlmodel import select as sql_select

from fedloom_core.storage.db import Event, make_engine
from fedloom_core.storage.repo import session_scope
from fedloom_tools.launch import memory_bytes
from tests.conftest import LiveServer, start_serve, stop_serve

# The answers are timed (within 1 s, the read timeout), so the module runs with the machine to itself.
pytestmark = [pytest.mark.e2e, pytest.mark.serial]

READ_TIMEOUT_S = 2
MIN_RATE_KBPS = 16
MB = 1 << 20
BOUNDARY = "hostileuploads"
CLIENTS = ("u1", "u2", "u3", "u4")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_serve(
        tmp_path_factory.mktemp("uploads") / "data",
        {"FEDLOOM_UPLOAD_READ_TIMEOUT_S": str(READ_TIMEOUT_S), "FEDLOOM_UPLOAD_MIN_RATE_KBPS": str(MIN_RATE_KBPS)},
    )
    yield live
    stop_serve(live)


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.api, headers=server.headers(), timeout=60) as client:
        for cid in CLIENTS:
            resp = client.post("/clients/register", json={"client_id": cid})
            assert resp.status_code == 200, resp.text
        yield client


def _part_head(name: str, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()


def _request_head(server: LiveServer, path: str, length: int | None) -> bytes:
    host = server.url.removeprefix("http://")
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST /api/v1{path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {server.admin_key}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n{framing}\r\n\r\n"
    ).encode()


def _read_answer(sock: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of the one response on ``sock``."""
    sock.settimeout(10)
    answer = b""
    while True:
        head, sep, body = answer.partition(b"\r\n\r\n")
        length = re.search(rb"content-length:\s*(\d+)", head, re.I)
        if sep and length and len(body) >= int(length.group(1)):
            break
        part = sock.recv(65536)
        if not part:
            break
        answer += part
    status = int(answer.split(b" ", 2)[1])
    return status, json.loads(answer.partition(b"\r\n\r\n")[2])


def _assert_spec_error(status: int, body: dict, expected_status: int, code: str) -> None:
    assert status == expected_status, body
    err = body["error"]
    assert err["code"] == code and err["message"] and err["details"] and err["timestamp"].endswith("Z"), err


def _spool(server: LiveServer) -> list[Path]:
    spool = server.data_dir / "tmp"
    return sorted(spool.iterdir()) if spool.exists() else []


def _stream_until_answered(server: LiveServer, path: str, head: bytes, pieces: Iterator[bytes], cap: int):
    """Send ``head`` then ``pieces`` until the server answers; (status, body, bytes sent, seconds)."""
    started = time.monotonic()
    sent = 0
    with socket.create_connection(tuple(server.url.removeprefix("http://").split(":")), timeout=30) as sock:  # type: ignore[arg-type]
        sock.sendall(_request_head(server, path, cap) + head)
        for piece in pieces:
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        status, body = _read_answer(sock)
    return status, body, sent, time.monotonic() - started


def test_an_upload_that_may_not_land_is_refused_before_its_body(server: LiveServer, http: httpx.Client) -> None:
    """A 100 MB body sent slowly, for no experiment and for an unknown client: answered at once, nothing spooled."""
    api = server.child_pid("api")
    rss = memory_bytes(api)
    total = 100 * MB
    for client_id, status, code in (
        ("u1", 409, "EXPERIMENT_NOT_ACTIVE"),
        ("nobody", 404, "CLIENT_NOT_REGISTERED"),
    ):

        def slowly() -> Iterator[bytes]:
            for _ in range(total // (64 << 10)):
                time.sleep(0.05)
                yield b"\0" * (64 << 10)

        head = _part_head("model_file", "m.safetensors")
        got, body, sent, took = _stream_until_answered(server, f"/model/update/{client_id}", head, slowly(), total)
        _assert_spec_error(got, body, status, code)
        assert took < 1.0 and sent < 2 * MB, (took, sent)
        assert _spool(server) == []
    assert memory_bytes(api) - rss < 50 * MB
    assert http.get("/health").status_code == 200


def test_a_stalled_upload_is_dropped_with_408_and_its_spool_file_removed(
    server: LiveServer, http: httpx.Client
) -> None:
    head = _part_head("model_file", "m.safetensors")
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(_request_head(server, "/model/validate/u1", 10 * MB) + head + b"\0" * (256 << 10))
        # The read timeout runs from the last bytes the server took in, which it spools as it reads them.
        deadline = time.monotonic() + 10
        while not _spool(server):
            assert time.monotonic() < deadline, "the file part was never spooled"
            time.sleep(0.02)
        started = time.monotonic()
        assert len(_spool(server)) == 1
        status, body = _read_answer(sock)
        took = time.monotonic() - started
    _assert_spec_error(status, body, 408, "INVALID_REQUEST")
    assert "no part of the body arrived" in body["error"]["details"]
    assert READ_TIMEOUT_S - 0.5 < took < READ_TIMEOUT_S + 1.5
    assert _spool(server) == []


def test_a_stalled_initial_model_is_dropped_with_408_and_its_spool_file_removed(server: LiveServer) -> None:
    http = httpx.Client(base_url=server.api, headers=server.headers(), timeout=30)
    body = {
        "name": "stalled",
        "dataset_config": {"name": "site-data", "clients_count": 2},
        "model_config": {"architecture": "custom"},
    }
    created = http.post("/experiments", json=body)
    assert created.status_code == 200, created.text
    exp_id = created.json()["experiment_id"]
    host, port = server.url.removeprefix("http://").split(":")
    head = (
        f"PUT /api/v1/experiments/{exp_id}/initial_model HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {server.admin_key}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {10 * MB}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + b"\0" * (256 << 10))
        started = time.monotonic()
        time.sleep(0.5)
        assert len(_spool(server)) == 1, "the body was being spooled"
        status, body = _read_answer(sock)
        took = time.monotonic() - started
    _assert_spec_error(status, body, 408, "INVALID_REQUEST")
    assert "no part of the body arrived" in body["error"]["details"]
    assert READ_TIMEOUT_S - 0.5 < took < READ_TIMEOUT_S + 1.5
    assert _spool(server) == []
    assert http.get(f"/experiments/{exp_id}").json()["status"] == "created"


def test_a_trickled_upload_is_dropped_once_below_the_floor_rate(server: LiveServer, http: httpx.Client) -> None:
    """A byte every 0.2 s never stalls for the read timeout, but falls behind the minimum rate."""

    def trickle() -> Iterator[bytes]:
        for _ in range(200):
            time.sleep(0.2)
            yield b"\0"

    head = _part_head("model_file", "m.safetensors")
    status, body, sent, took = _stream_until_answered(server, "/model/validate/u1", head, trickle(), 10 * MB)
    _assert_spec_error(status, body, 408, "INVALID_REQUEST")
    assert f"slower than {MIN_RATE_KBPS:g} kB/s" in body["error"]["details"]
    assert took < READ_TIMEOUT_S + 1.5, took
    assert _spool(server) == []


def test_300_form_fields_of_1_mb_are_refused_early(server: LiveServer, http: httpx.Client) -> None:
    api = server.child_pid("api")
    rss = memory_bytes(api)

    def fields() -> Iterator[bytes]:
        for i in range(300):
            yield _part_head(f"field{i}") + b"x" * MB + b"\r\n"

    status, body, sent, took = _stream_until_answered(server, "/model/validate/u1", b"", fields(), 301 * MB)
    _assert_spec_error(status, body, 400, "INVALID_REQUEST")
    assert "exceed" in body["error"]["details"] or "parts" in body["error"]["details"]
    # What was sent includes what the kernel buffers on both sides of the socket.
    assert took < 1.0 and sent < 32 * MB, (took, sent)
    assert memory_bytes(api) - rss < 50 * MB
    assert http.get("/health").status_code == 200


def _validate(http: httpx.Client, client_id: str, data: bytes, metrics: str | None = None) -> dict:
    files = {"model_file": ("m", data)}
    resp = http.post(f"/model/validate/{client_id}", files=files, data={"metrics": metrics} if metrics else None)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _deflated_torch_bomb(tmp: Path, megabytes: int) -> bytes:
    """A torch.save file of one zero tensor of ``megabytes`` whose entries are re-packed deflated."""
    stored = tmp / "stored.pt"
    # torch.empty's pages are never touched before torch.save reads them as zeros, so this costs no memory.
    torch.save({"w": torch.empty(megabytes * MB // 4, dtype=torch.float32)}, stored)
    bomb = tmp / "bomb.pt"
    with zipfile.ZipFile(stored) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as dst:
        for info in src.infolist():
            with src.open(info) as fin, dst.open(info.filename, "w", force_zip64=True) as fout:
                while chunk := fin.read(8 * MB):
                    fout.write(chunk)
    stored.unlink()
    return bomb.read_bytes()


def _header_bomb(tensors: int, data_bytes: int) -> bytes:
    """A safetensors file whose header points ``tensors`` tensors at the same ``data_bytes``."""
    header = {
        f"t{i}": {"dtype": "F32", "shape": [data_bytes // 4], "data_offsets": [0, data_bytes]} for i in range(tensors)
    }
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * data_bytes


def test_model_file_bombs_are_answered_invalid_within_a_second(
    server: LiveServer, http: httpx.Client, tmp_path: Path
) -> None:
    api = server.child_pid("api")
    bombs = {
        "deflated torch.save": _deflated_torch_bomb(tmp_path, 256),
        "2,000-tensor header": _header_bomb(2000, 8 * MB),
    }
    for name, data in bombs.items():
        rss = memory_bytes(api)
        started = time.monotonic()
        body = _validate(http, "u1", data)
        took = time.monotonic() - started
        failed = [c for c in body["checks"] if not c["passed"]]
        assert body["valid"] is False and "format" in [c["name"] for c in failed], (name, body)
        assert took < 1.0, (name, took)
        assert memory_bytes(api) - rss < 50 * MB, name
    assert len(bombs["deflated torch.save"]) < 2 * MB
    assert http.get("/health").status_code == 200


def _wait(predicate, timeout: float = 60, what: str = "") -> object:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _train_tasks(http: httpx.Client, round: int, clients: tuple[str, ...] = CLIENTS) -> dict[str, dict]:
    """Once round ``round`` is open: the train task of each selected client."""

    def poll() -> dict[str, dict]:
        tasks = {cid: http.get(f"/clients/{cid}/task").json() for cid in clients}
        return {cid: t for cid, t in tasks.items() if t.get("status") == "train" and t.get("round") == round}

    return _wait(poll, what=f"round {round}")  # type: ignore[return-value]


def _upload(http: httpx.Client, client_id: str, state: dict[str, torch.Tensor]) -> str:
    resp = http.post(
        f"/model/update/{client_id}",
        files={"model_file": ("m.safetensors", st_save(state))},
        data={"metrics": '{"data_samples": 50}'},
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["update_id"]


def _blob(server: LiveServer, exp_id: str, round: int, client_id: str) -> Path:
    found = list((server.data_dir / "blobs" / "updates" / exp_id / str(round)).glob(f"{client_id}-*.safetensors"))
    assert len(found) == 1, found
    return found[0]


def test_a_corrupt_or_missing_update_blob_is_rejected_and_the_run_finishes(
    server: LiveServer, http: httpx.Client
) -> None:
    """Round 1: one stored update is overwritten and another breaks the norm bound; round 2: a blob is deleted.

    The validate dry run gives the norm reason the workflow gives; the broken blobs become rejected
    updates (UPDATE_UNREADABLE) and both rounds complete with the others.
    """
    exp_id = "exp-blobs"
    created = http.post(
        "/experiments",
        json={
            "experiment_id": exp_id,
            "name": exp_id,
            "dataset_config": {"name": "digits", "clients_count": 4},
            "model_config": {"architecture": "MLP", "input_shape": [8, 8, 1], "num_classes": 10},
            "training_config": {"rounds": 2},
            "policy_config": {"min_clients": 2, "max_update_norm": 10.0},
        },
    )
    assert created.status_code == 200, created.text
    start = {
        "experiment_config": {"experiment_id": exp_id, "min_clients": 2, "round_timeout_s": 120},
        "aggregation_config": {"min_updates": 1},
    }
    started = http.post("/training/start", json=start)
    assert started.status_code == 200, started.text

    tasks = _train_tasks(http, 1)
    assert set(tasks) == {"u1", "u2", "u3", "u4"}
    state = st_load(http.get(f"/model/download/{tasks['u1']['model_id']}").content)
    torch.manual_seed(0)
    direction = {k: torch.randn_like(v) for k, v in state.items()}

    def honest(scale: float) -> dict[str, torch.Tensor]:
        return {k: v + 0.001 * scale * direction[k] + 1e-5 * torch.randn_like(v) for k, v in state.items()}

    huge = {k: v + 1.0 for k, v in state.items()}
    assert sum(v.numel() for v in state.values()) > 400  # so the huge update's norm is above 10

    # A client registered after the selection is refused before its (slow) body is read.
    assert http.post("/clients/register", json={"client_id": "late"}).status_code == 200
    slow = (b"\0" * (64 << 10) for _ in range(1600) if time.sleep(0.05) is None)
    head = _part_head("model_file", "m.safetensors")
    got, body, sent, took = _stream_until_answered(server, "/model/update/late", head, slow, 100 * MB)
    _assert_spec_error(got, body, 409, "ROUND_NOT_ACTIVE")
    assert "not selected" in body["error"]["details"] and took < 1.0 and sent < 2 * MB
    assert _spool(server) == []

    # The dry run answers with the workflow's reason.
    dry = _validate(http, "u2", st_save(huge), '{"data_samples": 50}')
    failed = {c["name"]: c["details"] for c in dry["checks"] if not c["passed"]}
    assert dry["valid"] is False and set(failed) == {"policy"}, dry
    assert "exceeds max_update_norm 10" in failed["policy"]
    assert _validate(http, "u3", st_save(honest(1.0)), '{"data_samples": 50}')["valid"] is True

    ids = {
        "u1": _upload(http, "u1", honest(1.0)),
        "u2": _upload(http, "u2", huge),
        "u3": _upload(http, "u3", honest(1.1)),
    }
    blob = _blob(server, exp_id, 1, "u1")
    blob.write_bytes(os.urandom(blob.stat().st_size))
    ids["u4"] = _upload(http, "u4", honest(0.9))

    def settled(update_id: str) -> dict | None:
        body = http.get(f"/model/update/{update_id}").json()
        return body if body["validation_status"] != "pending" else None

    verdicts = {cid: _wait(lambda cid=cid: settled(ids[cid]), what=f"{cid}'s verdict") for cid in ids}
    assert verdicts["u1"]["validation_status"] == "rejected"  # type: ignore[index]
    assert verdicts["u1"]["reason"].startswith("UPDATE_UNREADABLE"), verdicts["u1"]  # type: ignore[index]
    assert verdicts["u2"]["validation_status"] == "rejected"  # type: ignore[index]
    assert verdicts["u2"]["reason"] == failed["policy"]  # type: ignore[index]
    assert {verdicts[c]["validation_status"] for c in ("u3", "u4")} == {"accepted"}  # type: ignore[index]

    # Round 2: the first selected client's stored update disappears before the round closes.
    tasks = _train_tasks(http, 2, (*CLIENTS, "late"))
    assert len(tasks) >= 2, tasks
    state = st_load(http.get(f"/model/download/{next(iter(tasks.values()))['model_id']}").content)
    order = sorted(tasks)
    ids = {order[0]: _upload(http, order[0], honest(1.0))}
    _blob(server, exp_id, 2, order[0]).unlink()
    for cid in order[1:]:
        ids[cid] = _upload(http, cid, honest(1.0))

    def finished() -> dict | None:
        status = http.get("/training/status").json()
        return status if status["status"] != "running" else None

    final = _wait(finished, timeout=90, what="the experiment to finish")
    assert final["status"] == "completed", final  # type: ignore[index]
    missing = http.get(f"/model/update/{ids[order[0]]}").json()
    assert missing["validation_status"] == "rejected" and missing["reason"].startswith("UPDATE_UNREADABLE"), missing
    assert all(http.get(f"/model/update/{ids[c]}").json()["validation_status"] == "accepted" for c in order[1:])
    # Each is announced like any other rejection, with its reason.
    with session_scope(make_engine(f"sqlite:///{server.data_dir / 'fedloom.db'}")) as s:
        events = s.exec(sql_select(Event).where(Event.type == "update_rejected", Event.experiment_id == exp_id)).all()
    unreadable = sorted((e.payload["round"], e.client_id) for e in events if "UPDATE_UNREADABLE" in e.payload["reason"])
    assert unreadable == [(1, "u1"), (2, order[0])], [(e.client_id, e.payload) for e in events]
    assert http.get("/health").status_code == 200
