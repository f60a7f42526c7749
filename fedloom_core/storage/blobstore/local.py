"""Blob store on a local directory: atomic writes, sha256 sidecar files, a cache of verified digests."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

# The hashing helpers are looked up on ``base`` when called, so a test can count them.
from fedloom_core.storage.blobstore import base
from fedloom_core.storage.blobstore.base import (
    CHUNK_SIZE,
    SIDECAR_SUFFIX,
    BlobInfo,
    BlobIntegrityError,
    BlobNotFoundError,
    BlobStore,
    BlobStoreError,
    InvalidBlobKeyError,
    validate_key,
)

# The errors its methods raise, with the store.
__all__ = ["BlobIntegrityError", "BlobNotFoundError", "BlobStoreError", "InvalidBlobKeyError", "LocalBlobStore"]

# A file changed this recently may change again without its timestamps moving (they tick
# coarsely), so its digest is not cached until it is older than this.
_SETTLED_NS = 2_000_000_000
_MAX_VERIFIED = 4096


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """What identifies one version of a file: any write or replacement changes at least one field."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


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
                result = base._copy_hashing(stream, tmp)
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
                size, sha256 = base._copy_hashing(fh, None)
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

    def list_keys(self, prefix: str) -> Iterator[tuple[str, float]]:
        """Keys of the files under ``prefix``: committed blobs, blobs missing their sidecar or data, and
        the ``.<name>.*.tmp`` files an interrupted write leaves (each removable with :meth:`delete`)."""
        top = self._path(prefix)
        if not top.is_dir():
            return
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                path = Path(dirpath) / name
                data = path.with_name(name.removesuffix(SIDECAR_SUFFIX))
                if name.endswith(SIDECAR_SUFFIX) and data.exists():
                    continue  # listed with its data file
                try:
                    mtime = path.stat().st_mtime
                except FileNotFoundError:
                    continue
                yield data.relative_to(self.root).as_posix(), mtime

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
                    base._check_digest(key, stored.sha256, base._copy_hashing(fh, None)[1])
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
                base._check_digest(key, stored.sha256, digest.hexdigest())
                self._remember(path, identity, stored.sha256)

        return chunks()

    def ping(self) -> None:
        """Check that the root is a writable directory."""
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise BlobStoreError(f"blob root {self.root} is not a writable directory")
