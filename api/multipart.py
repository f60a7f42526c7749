"""Receiving an upload's multipart/form-data body: the model file spooled to disk as it streams in."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from fedloom_core.errors import InvalidRequest, PayloadTooLarge

# Largest non-file form field we keep (the metrics JSON is a few hundred bytes).
MAX_FIELD_BYTES = 1 << 20
FILE_FIELD = "model_file"


def _malformed(details: str) -> InvalidRequest:
    return InvalidRequest("Malformed request body or parameters", details)


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
        self._field, self._value = b"", b""
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
            "on_header_field": lambda data, start, end: self._extend("_field", data[start:end]),
            "on_header_value": lambda data, start, end: self._extend("_value", data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _extend(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)

    def _part_begin(self) -> None:
        self._headers, self._name = {}, None
        self._buffer = bytearray()

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        _kind, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self._name = name
        if name == FILE_FIELD and self.form.path is None and self._file is None:
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
        elif len(self._buffer) + len(piece) <= MAX_FIELD_BYTES:
            self._buffer += piece
        else:
            raise _malformed(f"form field {self._name!r} is too large")

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

    def abort(self) -> None:
        """Close and remove the spool file: the body was refused."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.form.discard()


async def receive_form(
    chunks: AsyncIterator[bytes], content_type: str | None, directory: Path, limit: int
) -> ReceivedForm:
    """Read a multipart/form-data body, spooling its ``model_file`` part to ``directory`` as it arrives.

    Bad bodies raise INVALID_REQUEST, a file over ``limit`` bytes PAYLOAD_TOO_LARGE; on any error
    nothing is left on disk. The caller discards the form when done with it.
    """
    kind, options = parse_options_header(content_type or "")
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise _malformed("the body must be multipart/form-data with a boundary")
    receiver = _FormReceiver(directory, limit)
    try:
        parser = MultipartParser(boundary, receiver.callbacks())
        async for chunk in chunks:
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
