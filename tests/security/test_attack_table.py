"""The remaining rows of the hostile-input table against a live server: a huge unauthenticated JSON
body, integers past any column, and oversized WebSocket messages. Each is answered 4xx (or closed)
within a second, the API's memory stays flat, and the server keeps serving. The other rows are in
test_uploads.py (bombs, multipart floods, slow bodies) and test_auth.py (key floods)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from fedloom_tools.launch import memory_bytes
from fedloom_tools.serve import WS_MAX_MESSAGE_BYTES
from tests.conftest import LiveServer, start_serve, stop_serve

# Answers are timed against 1 s, so the module runs with the machine to itself.
pytestmark = [pytest.mark.e2e, pytest.mark.serial]

MB = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_serve(tmp_path_factory.mktemp("attacks") / "data")
    yield live
    stop_serve(live)


def _still_serving(server: LiveServer) -> None:
    assert httpx.get(f"{server.api}/health", timeout=10).status_code == 200
    resp = httpx.get(f"{server.api}/clients", headers=server.headers(), timeout=10)
    assert resp.status_code == 200, resp.text


def _host_port(server: LiveServer) -> tuple[str, int]:
    host, _, port = server.url.removeprefix("http://").partition(":")
    return host, int(port)


def _send_body(server: LiveServer, head: bytes, total: int, chunked: bool = False) -> tuple[int, bytes, int, float]:
    """Send ``head`` then up to ``total`` bytes of JSON-ish filler (in 1 MB chunks of the chunked
    transfer coding when ``chunked``); stop when the server answers."""
    started = time.monotonic()
    sent = 0
    with socket.create_connection(_host_port(server), timeout=10) as sock:
        sock.sendall(head)
        piece = b"[" + b"1," * (MB // 2 - 1)
        if chunked:  # a well-formed chunk, so the refusal is about the body's size, not its framing
            piece = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        sock.setblocking(False)
        answer = b""
        while sent < total:
            try:
                answer += sock.recv(65536)
                if answer:
                    break
            except BlockingIOError:
                pass
            try:
                sent += sock.send(piece)
            except BlockingIOError:
                time.sleep(0.001)
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.setblocking(True)
        sock.settimeout(10)
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1") else 0
    return status, answer, sent, time.monotonic() - started


@pytest.mark.parametrize("framing", ["declared", "chunked"])
def test_a_huge_unauthenticated_json_body_is_refused_before_it_is_read(server: LiveServer, framing: str) -> None:
    """The table's 300 MB JSON to POST /clients/register without a key: 401/413 at once, not read."""
    api = server.child_pid("api")
    rss = memory_bytes(api)
    total = 300 * MB
    length = f"Content-Length: {total}" if framing == "declared" else "Transfer-Encoding: chunked"
    head = (
        f"POST /api/v1/clients/register HTTP/1.1\r\nHost: {server.url.removeprefix('http://')}\r\n"
        f"Content-Type: application/json\r\n{length}\r\n\r\n"
    ).encode()
    status, answer, sent, took = _send_body(server, head, total, chunked=framing == "chunked")
    assert status in (401, 413), answer[:500]
    assert b'"error"' in answer or b"\r\n\r\n" in answer
    assert took < 1.0, f"answered after {took:.2f} s"
    assert sent < 100 * MB, f"{sent / MB:.0f} MB went out before the answer"
    assert memory_bytes(api) - rss < 50 * MB
    _still_serving(server)


@pytest.mark.parametrize(
    "path",
    [
        "/experiments?offset=100000000000000000000",
        "/experiments?limit=100000000000000000000",
        "/model/global?round=1234567890123456789012345678901234567&experiment_id=exp-1",
        "/metrics/training?from_round=99999999999999999999999&to_round=1",
        "/clients?round=100000000000000000000",
        "/clients/select?round=-1",
    ],
)
def test_integers_past_any_column_are_400_or_422(server: LiveServer, path: str) -> None:
    started = time.monotonic()
    resp = httpx.get(f"{server.api}{path}", headers=server.headers(), timeout=10)
    assert time.monotonic() - started < 1.0
    assert resp.status_code in (400, 422), resp.text
    assert set(resp.json()["error"]) >= {"code", "message"}
    _still_serving(server)


def test_an_oversized_websocket_message_closes_the_stream_unbuffered(server: LiveServer) -> None:
    api = server.child_pid("api")
    rss = memory_bytes(api)

    async def attack() -> int | None:
        url = server.url.replace("http://", "ws://") + "/ws/events?since=0"
        for _ in range(20):
            async with connect(url, additional_headers=server.headers(), max_size=None) as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.send(b"x" * (4 * MB))
                    await asyncio.wait_for(ws.recv(), 5)
                    while True:
                        await asyncio.wait_for(ws.recv(), 5)
        return closed.value.rcvd.code if closed.value.rcvd else None

    started = time.monotonic()
    code = asyncio.run(attack())
    assert code == 1009, f"closed with {code}, expected 1009 (message too big) for > {WS_MAX_MESSAGE_BYTES} bytes"
    assert (time.monotonic() - started) / 20 < 1.0
    assert memory_bytes(api) - rss < 50 * MB
    _still_serving(server)
