"""The blob store interface: keys, digests, errors and the abstract :class:`BlobStore`."""

from __future__ import annotations

import hashlib
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

CHUNK_SIZE = 1 << 20
MAX_KEY_LENGTH = 512
SIDECAR_SUFFIX = ".sha256"
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")


class BlobStoreError(Exception):
    """Base class of every error raised by the blob store."""


class BlobNotFoundError(BlobStoreError):
    """The requested key holds no blob."""


class BlobIntegrityError(BlobStoreError):
    """A blob's bytes do not match its stored sha256, or the digest is missing."""


class InvalidBlobKeyError(BlobStoreError, ValueError):
    """A key is not a safe relative ``a/b/c`` path."""


@dataclass(frozen=True)
class BlobInfo:
    """Size in bytes and hex sha256 of a stored blob."""

    key: str
    size: int
    sha256: str


def validate_key(key: str) -> str:
    """Return ``key`` unchanged if it is a safe blob key, else raise :class:`InvalidBlobKeyError`.

    Allowed: ``/``-separated segments of ``[A-Za-z0-9._-]``, no empty, ``.`` or ``..`` segments, at
    most 512 characters. The last segment may not end in ``.sha256``, reserved for digest sidecars.
    """
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidBlobKeyError(f"blob key must be a string of 1..{MAX_KEY_LENGTH} characters")
    segments = key.split("/")
    for segment in segments:
        if not _SEGMENT_RE.fullmatch(segment) or segment in (".", ".."):
            raise InvalidBlobKeyError(f"invalid blob key {key!r} (bad segment {segment!r})")
    if segments[-1].endswith(SIDECAR_SUFFIX):
        raise InvalidBlobKeyError(f"invalid blob key {key!r}: the {SIDECAR_SUFFIX} suffix is reserved")
    return key


def _copy_hashing(src: BinaryIO, dst: BinaryIO | None) -> tuple[int, str]:
    """Read ``src`` in chunks (copying them to ``dst`` if given); return byte count and hex sha256."""
    digest = hashlib.sha256()
    size = 0
    while chunk := src.read(CHUNK_SIZE):
        digest.update(chunk)
        if dst is not None:
            dst.write(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def _check_digest(key: str, expected: str, actual: str) -> None:
    """Raise :class:`BlobIntegrityError` if the two digests differ."""
    if expected != actual:
        raise BlobIntegrityError(f"sha256 mismatch for {key!r}: stored {expected}, content {actual}")


class BlobStore(ABC):
    """Abstract store of binary blobs under ``a/b/c`` keys, with sha256 integrity checks."""

    @abstractmethod
    def put_file(self, key: str, path: str | Path) -> BlobInfo:
        """Store the local file at ``path`` under ``key``, streaming it."""

    @abstractmethod
    def put_stream(self, key: str, stream: BinaryIO) -> BlobInfo:
        """Store everything readable from ``stream`` under ``key``, in chunks."""

    def adopt_file(self, key: str, path: str | Path, sha256: str | None = None) -> BlobInfo:
        """Store the local file at ``path`` under ``key``, taking the file itself where the backend can.

        ``path`` is gone afterwards. ``sha256``, if given, is the file's digest as its writer computed
        it, which saves reading the file again; a wrong one is caught by every later read.
        """
        info = self.put_file(key, path)
        Path(path).unlink(missing_ok=True)
        return info

    @abstractmethod
    def open_local(self, key: str, verify: bool = True) -> AbstractContextManager[Path]:
        """Yield a local path holding the blob's bytes, checked against the stored sha256."""

    @abstractmethod
    def iter_bytes(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Stream the blob's content; raises :class:`BlobIntegrityError` at the end on a mismatch."""

    @abstractmethod
    def info(self, key: str) -> BlobInfo:
        """Return the size and sha256 of the blob under ``key``."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Tell whether a blob is stored under ``key``."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the blob under ``key``; a missing key is not an error."""

    def list_keys(self, prefix: str) -> Iterator[tuple[str, float]]:
        """Every key under the folder ``prefix`` (``a/b``), with its last-modified time (epoch seconds)."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its keys")

    @abstractmethod
    def ping(self) -> None:
        """Raise :class:`BlobStoreError` if the backend is unreachable."""

    @contextmanager
    def read_once(self) -> Iterator[None]:
        """Within this block, on the calling thread, fetch and verify each blob at most once.

        One round reads each update several times (validation, aggregation, the evaluation's
        leave-one-out models), moments after its first read checked it. Inside the block later
        opens reuse that: the local backend does not re-hash a file whose identity (device, inode,
        size, timestamps) is unchanged since it was checked or written in the block, however recently
        it was written; S3 keeps the checked download until the block ends instead of fetching the
        object again. Blocks nest (the outermost one counts); other threads are not affected. The
        price: inside a block, a local file changed in place within the same tick of the kernel's
        coarse clock as its check would go unseen (the store itself only ever replaces files whole).
        """
        reads = self.__dict__.get("_reads") or self.__dict__.setdefault("_reads", threading.local())
        if getattr(reads, "seen", None) is not None:
            yield
            return
        reads.seen = {}
        try:
            yield
        finally:
            seen, reads.seen = reads.seen, None
            self._end_reads(seen)

    def _seen(self) -> dict[str, Any] | None:
        """What this thread's :meth:`read_once` block has checked so far, or None outside a block."""
        reads = self.__dict__.get("_reads")
        return getattr(reads, "seen", None) if reads is not None else None

    def _end_reads(self, seen: dict[str, Any]) -> None:  # noqa: B027 - most backends keep nothing
        """Release what a :meth:`read_once` block kept."""
