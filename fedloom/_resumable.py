"""Resumable model uploads: open a session, send ranged chunks, resume from the server's offset after a drop.

The protocol (docs/api.md#resumable-uploads): ``POST /model/update/{client_id}/sessions`` with the size
and metrics, ``PUT .../sessions/{upload_id}`` with ``Content-Range: bytes a-b/total`` for each chunk,
``GET`` of the session for the committed offset, ``POST .../complete`` to store the file. An
experiment's initial model goes the same way under ``/experiments/{experiment_id}/initial_model/sessions``.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx

# Files at least this large go through a resumable session by default.
RESUMABLE_THRESHOLD = 64 << 20
# Pieces a chunk is streamed in.
PIECE = 1 << 20
# Attempts in a row that move the offset no further before giving up.
MAX_STALLED = 6
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class _Source:
    """The bytes being uploaded: a file (read by position) or a buffer."""

    def __init__(self, data: str | Path | bytes | bytearray | memoryview | BinaryIO) -> None:
        self._buf: memoryview | None = None
        self._fh: BinaryIO | None = None
        self._owned = False
        if isinstance(data, (str, Path)):
            self._fh, self._owned = open(data, "rb"), True  # noqa: SIM115 - closed by close()
        elif isinstance(data, (bytes, bytearray, memoryview)):
            self._buf = memoryview(data).cast("B")
        else:
            self._fh = data
        if self._buf is not None:
            self.size = len(self._buf)
        else:
            assert self._fh is not None
            self.size = os.fstat(self._fh.fileno()).st_size

    def pieces(self, start: int, end: int) -> Iterator[bytes | memoryview]:
        """Bytes ``start`` to ``end`` (exclusive), ``PIECE`` at a time."""
        pos = start
        while pos < end:
            n = min(PIECE, end - pos)
            if self._buf is not None:
                yield self._buf[pos : pos + n]
            else:
                assert self._fh is not None
                piece = os.pread(self._fh.fileno(), n, pos)
                if not piece:
                    raise OSError(f"the file ended at {pos} bytes, before its size of {self.size}")
                yield piece
                n = len(piece)
            pos += n

    def close(self) -> None:
        if self._owned and self._fh is not None:
            self._fh.close()


def _sha256(source: _Source) -> str:
    h = hashlib.sha256()
    for piece in source.pieces(0, source.size):
        h.update(piece)
    return h.hexdigest()


def upload_resumable(
    client: Any,
    client_id: str,
    data: str | Path | bytes | bytearray | memoryview | BinaryIO,
    metrics: dict[str, Any],
    *,
    chunk_size: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
    experiment_id: str | None = None,
) -> dict[str, Any]:
    """Upload ``data`` through a resumable session; a dropped connection resumes from the server's offset.

    ``client`` is an ``FLClient``. Returns the update record, as ``POST /model/update/{client_id}`` does.
    Gives up with the transport error once ``MAX_STALLED`` attempts in a row move the offset no further.
    """
    opening = {"metrics": metrics, **({"experiment_id": experiment_id} if experiment_id else {})}
    return _upload(client, f"/model/update/{client_id}/sessions", opening, data, chunk_size, sleep)


def upload_initial_resumable(
    client: Any,
    experiment_id: str,
    data: str | Path | bytes | bytearray | memoryview | BinaryIO,
    *,
    chunk_size: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Upload an experiment's round-0 weights through a resumable session, as ``upload_resumable`` does
    an update. Returns what ``PUT /experiments/{experiment_id}/initial_model`` answers."""
    return _upload(client, f"/experiments/{experiment_id}/initial_model/sessions", {}, data, chunk_size, sleep)


def _upload(
    client: Any,
    base: str,
    opening: dict[str, Any],
    data: str | Path | bytes | bytearray | memoryview | BinaryIO,
    chunk_size: int | None,
    sleep: Callable[[float], None],
) -> dict[str, Any]:
    """Open a session at ``base`` with ``opening`` (and the size), send the chunks, resume after a failure,
    finish."""
    from fedloom._client import FLAPIError

    source = _Source(data)
    try:
        opened = client._json("POST", base, json={"size": source.size, **opening})
        url = f"{base}/{opened['upload_id']}"
        chunk = min(chunk_size or opened["chunk_max_bytes"], opened["chunk_max_bytes"])
        offset, stalled, last_error, resumed = 0, 0, None, False
        while offset < source.size:
            end = min(offset + chunk, source.size)
            headers = {
                "Content-Range": f"bytes {offset}-{end - 1}/{source.size}",
                "Content-Length": str(end - offset),
                "Content-Type": "application/octet-stream",
            }
            try:
                answer = client._json("PUT", url, content=source.pieces(offset, end), headers=headers)
                new = int(answer["offset"])
            except (httpx.TransportError, FLAPIError) as exc:
                if isinstance(exc, FLAPIError) and exc.status not in RETRY_STATUSES and exc.code != "CONFLICT":
                    raise
                last_error, resumed = exc, True
                new = _offset_after_failure(client, url, sleep, stalled, exc)
            stalled = stalled + 1 if new <= offset else 0
            if stalled >= MAX_STALLED:
                raise last_error or RuntimeError(f"the upload made no progress at {offset} bytes")
            offset = new
        # After a resume the server checks that the pieces it joined are this file (TCP covers the rest).
        finish = {"sha256": _sha256(source)} if resumed else {}
        return client._json("POST", f"{url}/complete", json=finish)
    finally:
        source.close()


def _offset_after_failure(client: Any, url: str, sleep: Callable[[float], None], stalled: int, exc: Any) -> int:
    """The server's committed offset after a failed chunk (asked again while the server is unreachable)."""
    wait = getattr(exc, "retry_after", None) or min(0.5 * 2**stalled, 30.0)
    for attempt in range(MAX_STALLED):
        sleep(wait)
        try:
            return int(client._json("GET", url)["offset"])
        except httpx.TransportError:
            wait = min(0.5 * 2 ** (stalled + attempt + 1), 30.0)
    raise exc
