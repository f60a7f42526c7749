"""Model blob store: sha256-verified storage of model and update files on a local directory or S3.

Every blob's sha256 is computed in the same streaming pass that writes it and stored with the blob:
the local backend keeps it in a sidecar file ``<file>.sha256`` written after the data, which also acts
as the commit marker (a blob exists only once its sidecar does); the S3 backend keeps it in the object
metadata ``sha256``. :meth:`BlobStore.open_local` checks the digest and raises
:class:`BlobIntegrityError` on a mismatch; :meth:`BlobStore.iter_bytes` checks it at the end of the
stream.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import shutil
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

import boto3
from botocore.exceptions import BotoCoreError, ClientError

CHUNK_SIZE = 1 << 20
MAX_KEY_LENGTH = 512
SIDECAR_SUFFIX = ".sha256"
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
# A file changed this recently may change again without its timestamps moving (they tick
# coarsely), so its digest is not cached until it is older than this.
_SETTLED_NS = 2_000_000_000
_MAX_VERIFIED = 4096


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


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """What identifies one version of a file: any write or replacement changes at least one field."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _check_digest(key: str, expected: str, actual: str) -> None:
    """Raise :class:`BlobIntegrityError` if the two digests differ."""
    if expected != actual:
        raise BlobIntegrityError(f"sha256 mismatch for {key!r}: stored {expected}, content {actual}")


def _verified(key: str, chunks: Iterator[bytes], expected: str) -> Iterator[bytes]:
    """Yield ``chunks`` while hashing them, and check the digest once they are exhausted."""
    digest = hashlib.sha256()
    try:
        for chunk in chunks:
            digest.update(chunk)
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    _check_digest(key, expected, digest.hexdigest())


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


class LocalBlobStore(BlobStore):
    """Blob store on a local directory, with atomic writes and sha256 sidecar files."""

    def __init__(self, root: str | Path) -> None:
        """Use the directory ``root``, creating it if needed."""
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        # Digests this process has verified, by path: ((dev, inode, size, mtime_ns, ctime_ns), sha256).
        self._verified: dict[str, tuple[tuple[int, ...], str]] = {}

    def _path(self, key: str) -> Path:
        """Map a validated key to its data path, refusing anything that resolves outside the root."""
        path = self.root / validate_key(key)
        if not path.resolve().is_relative_to(self.root):
            raise InvalidBlobKeyError(f"blob key {key!r} resolves outside the store root")
        return path

    @staticmethod
    def _sidecar(path: Path) -> Path:
        """Return the digest sidecar path of a data path."""
        return path.with_name(path.name + SIDECAR_SUFFIX)

    @staticmethod
    def _write_atomic(path: Path, stream: BinaryIO, before_replace: Callable[[], None]) -> tuple[int, str]:
        """Write ``stream`` to a temp file next to ``path``, fsync it and ``os.replace`` it into place."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise BlobStoreError(f"cannot create the directory of {path}: a file is in the way") from exc
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as tmp:
                result = _copy_hashing(stream, tmp)
                tmp.flush()
                os.fsync(tmp.fileno())
            before_replace()
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return result

    def put_stream(self, key: str, stream: BinaryIO) -> BlobInfo:
        """Store ``stream`` atomically: the data first, then the sidecar that makes it visible."""
        path = self._path(key)
        sidecar = self._sidecar(path)
        # Un-commit any previous version right before its data is replaced, so a reader never pairs
        # new data with an old digest; a crash in between leaves the key absent, never half-written.
        size, sha = self._write_atomic(path, stream, lambda: sidecar.unlink(missing_ok=True))
        self._write_atomic(sidecar, io.BytesIO(f"{sha}\n".encode("ascii")), lambda: None)
        self._fsync_dir(path.parent)
        self._written(path, sha)
        return BlobInfo(key=key, size=size, sha256=sha)

    def _written(self, path: Path, sha256: str) -> None:
        """In a :meth:`read_once` block, a file this block wrote (hashing it) counts as checked."""
        seen = self._seen()
        if seen is not None:
            seen[str(path)] = (_identity(os.stat(path)), sha256)

    def put_file(self, key: str, path: str | Path) -> BlobInfo:
        """Copy the file at ``path`` into the store under ``key``."""
        with open(path, "rb") as src:
            return self.put_stream(key, src)

    def adopt_file(self, key: str, path: str | Path, sha256: str | None = None) -> BlobInfo:
        """Rename the file at ``path`` into the store (no copy), after an fsync; copy across filesystems.

        The same commit order as ``put_stream``: the old sidecar goes, the data is renamed into
        place, then the new sidecar is written; a crash in between leaves the key absent.
        """
        target = self._path(key)
        source = Path(path)
        with open(source, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if sha256 is None:
                size, sha256 = _copy_hashing(fh, None)
            os.fsync(fh.fileno())
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise BlobStoreError(f"cannot create the directory of {target}: a file is in the way") from exc
        sidecar = self._sidecar(target)
        sidecar.unlink(missing_ok=True)
        try:
            os.replace(source, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            return super().adopt_file(key, source)
        self._write_atomic(sidecar, io.BytesIO(f"{sha256}\n".encode("ascii")), lambda: None)
        self._fsync_dir(target.parent)
        return BlobInfo(key=key, size=size, sha256=sha256)

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        """Make a rename in ``directory`` durable (best effort: not every platform can open a directory)."""
        with suppress(OSError):
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def info(self, key: str) -> BlobInfo:
        """Read the stored digest and the data size of ``key``."""
        path = self._path(key)
        try:
            sha = self._sidecar(path).read_text(encoding="ascii").strip()
            size = path.stat().st_size
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise BlobNotFoundError(f"no blob under {key!r}") from exc
        return BlobInfo(key=key, size=size, sha256=sha)

    def exists(self, key: str) -> bool:
        """Tell whether both the data and its sidecar are present."""
        path = self._path(key)
        return path.is_file() and self._sidecar(path).is_file()

    def delete(self, key: str) -> None:
        """Remove the sidecar first (un-committing the blob), then the data."""
        path = self._path(key)
        self._sidecar(path).unlink(missing_ok=True)
        path.unlink(missing_ok=True)

    @contextmanager
    def open_local(self, key: str, verify: bool = True) -> Iterator[Path]:
        """Yield the stored file itself, after re-hashing it unless ``verify`` is false.

        A round reads each update several times (validation, then aggregation) and re-hashing
        a large file costs more than aggregating it, so a digest this process has verified is
        remembered with the file's identity (device, inode, size, mtime and ctime in ns) and
        trusted while none of them changes. Any write or replacement changes the ctime (which
        user space cannot set), and files modified within the last two seconds, whose coarse
        timestamps could still repeat, are always re-hashed.
        """
        stored = self.info(key)
        path = self._path(key)
        if verify:
            with open(path, "rb") as fh:
                known = (_identity(os.fstat(fh.fileno())), stored.sha256)
                seen = self._seen()
                if self._verified.get(str(path)) != known and (seen is None or seen.get(str(path)) != known):
                    _check_digest(key, stored.sha256, _copy_hashing(fh, None)[1])
                    self._remember(path, *known)
                    if seen is not None:
                        seen[str(path)] = known
        yield path

    def _remember(self, path: Path, identity: tuple[int, ...], sha256: str) -> None:
        """Cache a verified digest, unless the file changed too recently to be told apart from a later write."""
        if time.time_ns() - max(identity[-2:]) < _SETTLED_NS:
            return
        if len(self._verified) >= _MAX_VERIFIED:
            self._verified.clear()
        self._verified[str(path)] = (identity, sha256)

    def iter_bytes(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Stream the file in ``chunk_size`` pieces, verifying the digest at the end.

        As in ``open_local``, a digest this process already verified for this very file is not
        computed again (a global model is downloaded by every client of a round).
        """
        stored = self.info(key)
        path = self._path(key)

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as fh:
                identity = _identity(os.fstat(fh.fileno()))
                if self._verified.get(str(path)) == (identity, stored.sha256):
                    while chunk := fh.read(chunk_size):
                        yield chunk
                    return
                digest = hashlib.sha256()
                while chunk := fh.read(chunk_size):
                    digest.update(chunk)
                    yield chunk
                _check_digest(key, stored.sha256, digest.hexdigest())
                self._remember(path, identity, stored.sha256)

        return chunks()

    def ping(self) -> None:
        """Check that the root is a writable directory."""
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise BlobStoreError(f"blob root {self.root} is not a writable directory")


class S3BlobStore(BlobStore):
    """Blob store on an S3 (or MinIO) bucket, with the sha256 kept in object metadata."""

    def __init__(
        self, bucket: str, prefix: str = "", endpoint_url: str | None = None, create_bucket: bool = False
    ) -> None:
        """Use ``bucket`` under ``prefix``; create the bucket if missing only when ``create_bucket``."""
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = boto3.client("s3", endpoint_url=endpoint_url)
        if create_bucket:
            try:
                self.ping()
            except BlobNotFoundError:
                region = self.client.meta.region_name
                kwargs: dict[str, Any] = {"Bucket": bucket}
                if region and region != "us-east-1":
                    kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
                with self._errors(""):
                    self.client.create_bucket(**kwargs)

    def _object_key(self, key: str) -> str:
        """Map a validated blob key to its S3 object key."""
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """Translate botocore errors into :class:`BlobStoreError` subclasses."""
        try:
            yield
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in _NOT_FOUND_CODES:
                raise BlobNotFoundError(f"no blob under {key!r} in s3://{self.bucket}") from exc
            raise BlobStoreError(f"S3 error for {key!r}: {exc}") from exc
        except BotoCoreError as exc:
            raise BlobStoreError(f"S3 error for {key!r}: {exc}") from exc

    def put_file(self, key: str, path: str | Path) -> BlobInfo:
        """Hash the file in one streaming pass, then upload it with the digest as metadata."""
        object_key = self._object_key(key)
        self._forget(key)
        with open(path, "rb") as fh:
            size, sha = _copy_hashing(fh, None)
        with self._errors(key):
            self.client.upload_file(str(path), self.bucket, object_key, ExtraArgs={"Metadata": {"sha256": sha}})
        return BlobInfo(key=key, size=size, sha256=sha)

    def put_stream(self, key: str, stream: BinaryIO) -> BlobInfo:
        """Spool ``stream`` to a temp file while hashing it, then upload the spool."""
        object_key = self._object_key(key)
        self._forget(key)
        with tempfile.TemporaryFile() as spool:
            size, sha = _copy_hashing(stream, spool)  # type: ignore[arg-type]
            spool.seek(0)
            with self._errors(key):
                self.client.upload_fileobj(spool, self.bucket, object_key, ExtraArgs={"Metadata": {"sha256": sha}})
        return BlobInfo(key=key, size=size, sha256=sha)

    def info(self, key: str) -> BlobInfo:
        """Read size and digest from the object's headers."""
        object_key = self._object_key(key)
        with self._errors(key):
            head = self.client.head_object(Bucket=self.bucket, Key=object_key)
        sha = head.get("Metadata", {}).get("sha256")
        if not sha:
            raise BlobIntegrityError(f"blob {key!r} has no sha256 metadata")
        return BlobInfo(key=key, size=int(head["ContentLength"]), sha256=sha)

    def exists(self, key: str) -> bool:
        """Tell whether the object exists (a HEAD request)."""
        object_key = self._object_key(key)
        try:
            with self._errors(key):
                self.client.head_object(Bucket=self.bucket, Key=object_key)
        except BlobNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        """Delete the object; a missing key is not an error."""
        object_key = self._object_key(key)
        self._forget(key)
        with self._errors(key):
            self.client.delete_object(Bucket=self.bucket, Key=object_key)

    def _get(self, key: str) -> tuple[Any, str]:
        """Start a GET and return the streaming body and the stored digest of that same object."""
        object_key = self._object_key(key)
        with self._errors(key):
            response = self.client.get_object(Bucket=self.bucket, Key=object_key)
        sha = response.get("Metadata", {}).get("sha256")
        if not sha:
            response["Body"].close()
            raise BlobIntegrityError(f"blob {key!r} has no sha256 metadata")
        return response["Body"], sha

    @contextmanager
    def open_local(self, key: str, verify: bool = True) -> Iterator[Path]:
        """Download into a private temp dir while hashing, yield the file, then delete it.

        In a :meth:`read_once` block a checked download is kept (and yielded again) until the block ends.
        """
        seen = self._seen()
        if seen is not None and key in seen:
            yield seen[key]
            return
        body, sha = self._get(key)
        tmp_dir = Path(tempfile.mkdtemp(prefix="fedloom-blob-"))
        kept = False
        try:
            target = tmp_dir / key.rsplit("/", 1)[-1]
            digest = hashlib.sha256()
            try:
                with open(target, "wb") as out, self._errors(key):
                    for chunk in body.iter_chunks(CHUNK_SIZE):
                        digest.update(chunk)
                        out.write(chunk)
            finally:
                body.close()
            if verify:
                _check_digest(key, sha, digest.hexdigest())
                if seen is not None:
                    seen[key], kept = target, True
            yield target
        finally:
            if not kept:
                shutil.rmtree(tmp_dir, ignore_errors=True)

    def _forget(self, key: str) -> None:
        """Drop this thread's kept download of ``key`` (it is being replaced or deleted)."""
        seen = self._seen()
        if seen is not None and key in seen:
            shutil.rmtree(seen.pop(key).parent, ignore_errors=True)

    def _end_reads(self, seen: dict[str, Any]) -> None:
        for path in seen.values():
            shutil.rmtree(path.parent, ignore_errors=True)

    def iter_bytes(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Stream the object body in ``chunk_size`` pieces, verifying the digest at the end."""
        body, sha = self._get(key)

        def chunks() -> Iterator[bytes]:
            try:
                with self._errors(key):
                    yield from body.iter_chunks(chunk_size)
            finally:
                body.close()

        return _verified(key, chunks(), sha)

    def ping(self) -> None:
        """Check that the bucket is reachable (HEAD bucket)."""
        with self._errors(""):
            self.client.head_bucket(Bucket=self.bucket)


def open_blob_store(blob_url: str, s3_endpoint_url: str | None = None) -> BlobStore:
    """Open the store named by ``file:///abs/path`` or ``s3://bucket/prefix``."""
    parsed = urlparse(blob_url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise ValueError(f"blob URL must be file:///absolute/path, got {blob_url!r}")
        return LocalBlobStore(parsed.path)
    if parsed.scheme == "s3" and parsed.netloc:
        return S3BlobStore(parsed.netloc, parsed.path, endpoint_url=s3_endpoint_url, create_bucket=True)
    raise ValueError(f"blob URL must be file:///abs/path or s3://bucket[/prefix], got {blob_url!r}")
