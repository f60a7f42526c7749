"""The multipart receiver's bounds, driven directly with streamed bodies: parts, part headers, fields, the
file, the whole body, and bodies that stall or trickle. Every refusal leaves nothing in the spool directory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from api.body_limits import FORM_OVERHEAD
from api.multipart import MAX_PART_HEADER_BYTES, MAX_PARTS, receive_form
from fedloom_core.errors import FedloomError

pytestmark = pytest.mark.unit

B = "bnd"
CONTENT_TYPE = f"multipart/form-data; boundary={B}"


def part(name: str, data: bytes, filename: str | None = None, extra_header: str = "") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{B}\r\nContent-Disposition: {disposition}\r\n{extra_header}\r\n".encode() + data + b"\r\n"


def end() -> bytes:
    return f"--{B}--\r\n".encode()


async def stream(pieces: Iterable[bytes], pause: float = 0.0) -> AsyncIterator[bytes]:
    for piece in pieces:
        if pause:
            await asyncio.sleep(pause)
        yield piece


def receive(tmp_path: Path, pieces: Iterable[bytes], limit: int = 1 << 20, pause: float = 0.0, **kw: float):  # type: ignore[no-untyped-def]
    return asyncio.run(receive_form(stream(pieces, pause), CONTENT_TYPE, tmp_path / "spool", limit, **kw))


def refused(tmp_path: Path, pieces: Iterable[bytes], status: int, words: str, **kw: float) -> None:
    with pytest.raises(FedloomError) as caught:
        receive(tmp_path, pieces, **kw)
    assert caught.value.status == status and words in caught.value.details, caught.value.details
    spool = tmp_path / "spool"
    assert not spool.exists() or not any(spool.iterdir())


def test_a_form_within_bounds_is_received(tmp_path: Path) -> None:
    form = receive(tmp_path, [part("model_file", b"weights", "m"), part("metrics", b'{"data_samples": 1}'), end()])
    assert form.path is not None and form.path.read_bytes() == b"weights" and form.size == 7
    assert form.fields == {"metrics": '{"data_samples": 1}'}
    form.discard()


def test_each_bound_of_the_form_is_enforced(tmp_path: Path) -> None:
    many = [part(f"f{i}", b"x") for i in range(MAX_PARTS + 1)]
    refused(tmp_path, [*many, end()], 400, f"more than {MAX_PARTS} parts")
    # python-multipart bounds each header line (about 4 kB); the receiver bounds a part's headers together.
    fat_header = "".join(f"X-Pad{i}: {'p' * 4000}\r\n" for i in range(MAX_PART_HEADER_BYTES // 4000 + 1))
    refused(tmp_path, [part("metrics", b"{}", extra_header=fat_header), end()], 400, "headers exceed")
    twice = [part("model_file", b"a", "m"), part("model_file", b"b", "m"), end()]
    refused(tmp_path, twice, 400, "more than one 'model_file'")
    fields = [part("a", b"x" * (600 << 10)), part("b", b"x" * (600 << 10)), end()]
    refused(tmp_path, fields, 400, "fields other than 'model_file' exceed")
    refused(tmp_path, [part("model_file", b"x" * 2000, "m"), end()], 413, "exceeds 1000 bytes", limit=1000)
    # Bytes outside any part (here, before the first boundary) count toward the whole body's cap.
    preamble = [b"junk" * ((FORM_OVERHEAD + 2000) // 4), part("model_file", b"x", "m"), end()]
    refused(tmp_path, preamble, 413, "request body exceeds", limit=1000)


def test_a_stalled_body_is_dropped_with_408(tmp_path: Path) -> None:
    pieces = [part("model_file", b"x" * 100, "m"), part("metrics", b"{}"), end()]
    refused(tmp_path, pieces, 408, "no part of the body arrived for 0.1 s", pause=0.3, idle_s=0.1)


def test_a_body_behind_the_floor_rate_is_dropped_with_408(tmp_path: Path) -> None:
    # Never idle for 1 s, but 20 small pieces in 2 s is far below 100 kB/s once the 0.3 s grace is over.
    pieces = [part("model_file", b"", "m")] + [b"x"] * 20 + [end()]
    refused(tmp_path, pieces, 408, "slower than 100 kB/s", pause=0.1, idle_s=0.3, min_rate=100_000)


def test_every_streamed_upload_route_documents_its_408() -> None:
    from api.app import create_app

    paths = create_app().openapi()["paths"]
    streamed = [
        ("post", "/api/v1/model/update/{client_id}"),
        ("post", "/api/v1/model/validate/{client_id}"),
        ("put", "/api/v1/model/update/{client_id}/sessions/{upload_id}"),
        ("put", "/api/v1/experiments/{experiment_id}/initial_model"),
    ]
    for method, path in streamed:
        assert "408" in paths[path][method]["responses"], (method, path)
