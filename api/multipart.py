"""Receiving an upload's multipart/form-data body: the model file spooled to disk as it streams in.

Nothing in the body is held beyond a stated bound: the number of parts, each part's headers, the
other fields together, the file, and the body's total size. A body that stalls, or arrives slower
than a floor rate, is dropped (408) and its spool file removed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from api.body_limits import FORM_OVERHEAD
from fedloom_core.errors import FedloomError, InvalidRequest, PayloadTooLarge

# Largest non-file form field we keep (the metrics JSON is a few hundred bytes).
MAX_FIELD_BYTES = 1 << 20
# All non-file fields together.
MAX_FIELDS_BYTES = 1 << 20
# Parts in one form: the model file, the metrics and room for a few a client may add.
MAX_PARTS = 16
# Header names and values of one part together.
MAX_PART_HEADER_BYTES = 16 << 10
FILE_FIELD = "model_file"


def _malformed(details: str) -> InvalidRequest:
    return InvalidRequest("Malformed request body or parameters", details)


def _timed_out(details: str) -> FedloomError:
    return FedloomError("Upload timed out", details, code="INVALID_REQUEST", status=408)


@dataclass
class ReceivedForm:
    """An upload's form: the model file spooled to disk with its digest, and the other fields."""

    path: Path | None = None
    sha256: str | None = None
    size: int = 0
    fields: dict[str, str] = field(default_factory=dict)

    def require(self, *names: str) -> None:
        """Raise INVALID_REQUEST naming every required form field that is missing."""
        present = set(self.fields) | ({FILE_FIELD} if self.path is not None else set())
        missing = [name for name in names if name not in present]
        if missing:
            raise _malformed("; ".join(f"{name}: Field required" for name in missing))

    def discard(self) -> None:
        """Remove the spooled model file, if it is still there."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class _FormReceiver:
    """python-multipart callbacks that write the ``model_file`` part straight to a spool file.

    Each piece of the body is written and hashed as it arrives, so the file is never held in memory
    and is written to disk once.
    """

    def __init__(self, directory: Path, limit: int) -> None:
        self.directory, self.limit = directory, limit
        self.form = ReceivedForm()
        self._headers: dict[bytes, bytes] = {}
        self._field, self._value = bytearray(), bytearray()
        self._header_bytes = 0
        self._parts = 0
        self._fields_bytes = 0
        self._name: str | None = None
        self._file = None
        self._digest = hashlib.sha256()
        self._buffer = bytearray()

    @property
    def in_file(self) -> bool:
        """Whether the body so far ended inside the file part."""
        return self._file is not None

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._extend(self._field, data, start, end),
            "on_header_value": lambda data, start, end: self._extend(self._value, data, start, end),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _extend(self, target: bytearray, data: bytes, start: int, end: int) -> None:
        self._header_bytes += end - start
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise _malformed(f"a part's headers exceed {MAX_PART_HEADER_BYTES} bytes")
        target += data[start:end]

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise _malformed(f"the form has more than {MAX_PARTS} parts")
        self._headers, self._name = {}, None
        self._header_bytes = 0
        self._buffer = bytearray()

    def _header_end(self) -> None:
        self._headers[bytes(self._field).lower()] = bytes(self._value)
        self._field, self._value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        _kind, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self._name = name
        if name == FILE_FIELD:
            if self.form.path is not None:
                raise _malformed(f"the form has more than one {FILE_FIELD!r} part")
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, spool = tempfile.mkstemp(prefix="upload-", dir=self.directory)
            self.form.path = Path(spool)
            self._file = os.fdopen(fd, "wb")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        piece = memoryview(data)[start:end]
        if self._file is not None and self._name == FILE_FIELD:
            self.form.size += len(piece)
            if self.form.size > self.limit:
                raise PayloadTooLarge("Model file too large", f"the upload exceeds {self.limit} bytes")
            self._file.write(piece)
            self._digest.update(piece)
            return
        if len(self._buffer) + len(piece) > MAX_FIELD_BYTES:
            raise _malformed(f"form field {self._name!r} is too large")
        self._fields_bytes += len(piece)
        if self._fields_bytes > MAX_FIELDS_BYTES:
            raise _malformed(f"the form's fields other than {FILE_FIELD!r} exceed {MAX_FIELDS_BYTES} bytes")
        self._buffer += piece

    def _part_end(self) -> None:
        if self._file is not None and self._name == FILE_FIELD:
            self._file.close()
            self._file = None
            self.form.sha256 = self._digest.hexdigest()
        elif self._name and self._name not in self.form.fields:
            try:
                self.form.fields[self._name] = self._buffer.decode("utf-8")
            except UnicodeDecodeError:
                raise _malformed(f"form field {self._name!r} is not UTF-8 text") from None
        self._buffer = bytearray()

    def abort(self) -> None:
        """Close and remove the spool file: the body was refused."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.form.discard()


async def paced(chunks: AsyncIterator[bytes], idle_s: float, min_rate: float) -> AsyncIterator[bytes]:
    """``chunks`` as they come, or 408 once none arrives for ``idle_s`` seconds.

    With ``min_rate`` (bytes/s, 0 for none) the body must also keep up with that rate after a grace
    of ``idle_s``: n bytes may take at most ``idle_s + n / min_rate`` seconds, so a client cannot
    hold a spool file open by sending a byte now and then.
    """
    started = time.monotonic()
    received = 0
    stream = aiter(chunks)
    while True:
        wait, why = idle_s, f"no part of the body arrived for {idle_s:g} s"
        if min_rate > 0:
            behind = started + idle_s + received / min_rate - time.monotonic()
            if behind < wait:
                wait, why = behind, f"the body arrived slower than {min_rate / 1000:g} kB/s"
        try:
            with anyio.fail_after(max(wait, 0.0)):
                chunk = await anext(stream)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise _timed_out(why) from None
        received += len(chunk)
        yield chunk


async def receive_form(
    chunks: AsyncIterator[bytes],
    content_type: str | None,
    directory: Path,
    limit: int,
    *,
    idle_s: float = 30.0,
    min_rate: float = 0.0,
) -> ReceivedForm:
    """Read a multipart/form-data body, spooling its ``model_file`` part to ``directory`` as it arrives.

    Bad bodies raise INVALID_REQUEST, a file over ``limit`` bytes (or a body over it plus the form's
    room) PAYLOAD_TOO_LARGE, a stalled or too slow body a 408 (see ``paced``); on any error nothing is
    left on disk. The caller discards the form when done with it.
    """
    kind, options = parse_options_header(content_type or "")
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise _malformed("the body must be multipart/form-data with a boundary")
    receiver = _FormReceiver(directory, limit)
    total, cap = 0, limit + FORM_OVERHEAD
    try:
        parser = MultipartParser(boundary, receiver.callbacks())
        async for chunk in paced(chunks, idle_s, min_rate):
            total += len(chunk)
            if total > cap:
                raise PayloadTooLarge("Request body too large", f"the request body exceeds {cap} bytes")
            parser.write(chunk)
        parser.finalize()
        if receiver.in_file:
            raise _malformed("the multipart body is cut short")
    except MultipartParseError as exc:
        receiver.abort()
        raise _malformed(f"multipart body: {exc}") from None
    except BaseException:
        receiver.abort()
        raise
    return receiver.form
