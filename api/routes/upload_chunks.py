"""What every kind of resumable upload session shares on the HTTP side: limits, the session's state
answer, the periodic sweep, ranged chunks and the finish step's byte and digest checks.

The routes are in ``upload_sessions`` (client updates) and ``lifecycle`` (an experiment's initial
model); the sessions themselves in ``fedloom_core.storage.upload_sessions``.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api.multipart import paced
from fedloom_core.errors import Conflict, InvalidRequest, PayloadTooLarge
from fedloom_core.settings import Settings
from fedloom_core.storage import upload_sessions as sessions

_RANGE = re.compile(r"bytes (\d{1,15})-(\d{1,15})/(\d{1,15})")
SWEEP_EVERY_S = 60.0
_last_sweep = 0.0


def limits(settings: Settings) -> tuple[int, int]:
    """The upload limit and the largest chunk, in bytes."""
    return int(settings.max_upload_mb * 1e6), int(settings.upload_chunk_mb * 1e6)


def check_size(size: int, settings: Settings) -> None:
    """413 for a session whose declared size passes the upload limit."""
    limit, _ = limits(settings)
    if size > limit:
        raise PayloadTooLarge("Model file too large", f"size {size} exceeds the upload limit of {limit} bytes")


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def state(
    sess: sessions.Session, settings: Settings, fields: dict[str, Any], url: str, tail: dict[str, Any]
) -> JSONResponse:
    """The session's state: ``fields`` (the kind's own), size, offset, limits, expiry, URL, then ``tail``
    (the kind's result); the offset and size also as the headers ``Upload-Offset`` and ``Upload-Length``."""
    offset = sess.offset()
    body = {
        **fields,
        "size": sess.size,
        "offset": offset,
        "complete": offset == sess.size,
        "chunk_max_bytes": limits(settings)[1],
        "expires_at": iso(sess.expires_at(settings.upload_session_ttl_s)),
        "upload_url": url,
        **tail,
    }
    headers = {"Upload-Offset": str(offset), "Upload-Length": str(sess.size), "Cache-Control": "no-store"}
    return JSONResponse(body, headers=headers)


async def sweep(settings: Settings) -> None:
    """Remove expired sessions now and then (the start-up spool cleaning removes them too)."""
    global _last_sweep
    now = time.monotonic()
    if now - _last_sweep >= SWEEP_EVERY_S:
        _last_sweep = now
        await run_in_threadpool(sessions.expire, settings.data_dir / "tmp", settings.upload_session_ttl_s)


async def load(settings: Settings, upload_id: str, owner: str, kind: str) -> sessions.Session:
    """The session, after the sweep; the caller has checked the ids of the URL and the caller's rights."""
    await sweep(settings)
    spool = settings.data_dir / "tmp"
    return await run_in_threadpool(
        lambda: sessions.load(spool, upload_id, owner, settings.upload_session_ttl_s, kind=kind)
    )


def content_range(raw: str | None, sess: sessions.Session, chunk_max: int) -> tuple[int, int]:
    """The chunk's first byte and length from ``Content-Range: bytes a-b/total``, checked against the session."""
    match = _RANGE.fullmatch((raw or "").strip())
    if match is None:
        raise InvalidRequest("Invalid Content-Range", "a chunk needs the header 'Content-Range: bytes a-b/total'")
    first, last, total = (int(g) for g in match.groups())
    if total != sess.size:
        raise InvalidRequest("Invalid Content-Range", f"total {total} is not the session's size {sess.size}")
    if last < first or last >= total:
        raise InvalidRequest("Invalid Content-Range", f"bytes {first}-{last} are not within 0-{total - 1}")
    if last - first + 1 > chunk_max:
        raise PayloadTooLarge("Chunk too large", f"a chunk may carry at most {chunk_max} bytes")
    return first, last - first + 1


async def receive_chunk(
    request: Request, body: AsyncIterator[bytes], sess: sessions.Session, settings: Settings
) -> None:
    """Append the bytes ``Content-Range`` names; they must start at the committed offset.

    A chunk cut short (a dropped connection, a timeout) keeps what arrived; one that sends more than
    its range says is rolled back.
    """
    first, length = content_range(request.headers.get("content-range"), sess, limits(settings)[1])
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) != length:
        raise InvalidRequest("Invalid Content-Length", f"Content-Length {declared}, Content-Range {length} bytes")
    writer = await run_in_threadpool(sessions.Writer, sess)
    try:
        if first != writer.start:
            raise Conflict(
                "Chunk does not start at the committed offset",
                f"the session's offset is {writer.start}; the chunk starts at {first} (GET the session to resume)",
            )
        async for piece in paced(body, settings.upload_read_timeout_s, settings.upload_min_rate_kbps * 1000):
            if writer.written + len(piece) > length:
                writer.rollback()
                raise PayloadTooLarge("Chunk too large", f"the body carries more than the {length} bytes of its range")
            writer.write(piece)
    finally:
        end = writer.close()
    if writer.written < length:
        raise InvalidRequest(
            "Chunk cut short", f"the body ended after {writer.written} of {length} bytes; the session's offset is {end}"
        )


async def received_digest(sess: sessions.Session, sha256: str | None) -> str:
    """The finish step's checks: every byte there (else 409), and the digests declared at the opening
    and the finish (if any) those of the file (else 400, and the session is gone). Returns the digest."""
    offset = sess.offset()
    if offset != sess.size:
        raise Conflict("Upload incomplete", f"{offset} of {sess.size} bytes received; send the rest first")
    digest = await run_in_threadpool(sessions.digest, sess)
    declared = {d for d in (sess.sha256, sha256) if d}
    if declared - {digest}:
        await run_in_threadpool(sessions.remove, sess)
        raise InvalidRequest("Upload digest mismatch", f"the received file's sha256 is {digest}, not {min(declared)}")
    return digest
