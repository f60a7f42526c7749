"""Resumable uploads: a session's bytes and record on disk, in ``<data dir>/tmp/sessions/<upload_id>/``.

A session's ``kind`` says what the bytes become: a client's update (``"update"``, owned by its client)
or an experiment's round-0 weights (``"initial_model"``, owned by the experiment, admin only).
A session holds ``meta.json`` (who opened it, for which round, the declared size and metrics) and
``data``, the bytes received so far. The committed offset is ``data``'s size, so whatever part of a
chunk arrived before a dropped connection counts. The sha256 of ``data`` is kept in memory while the
bytes arrive in order; a process that did not see them all (a restart) hashes the file once at the end.
A session untouched for its time to live is removed, by the next request that looks at it, by the
periodic sweep and by the API's start-up spool cleaning (``retention.clean_spool``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedloom_core.errors import Conflict, NotFound

SESSIONS_DIR = "sessions"
_ID_RE = re.compile(r"upl_[0-9a-f]{32}")
# In-memory digests of sessions whose bytes this process received in order, by upload id.
_DIGESTS: OrderedDict[str, tuple[int, Any]] = OrderedDict()
_DIGESTS_MAX = 256
KIND_UPDATE = "update"
KIND_INITIAL_MODEL = "initial_model"
# A chunk's bytes go to disk in batches of this size, on these threads (see Writer).
WRITE_BYTES = 1 << 20
_WRITE_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="upload-write")


@dataclass
class Session:
    """One resumable upload: its owner, target round, declared size, and (once finished) its result.

    An update session's result is ``update_id``; an initial-model session's is ``result``, the answer
    its finish gave (so a repeated finish answers the same).
    """

    upload_id: str
    client_id: str
    experiment_id: str
    round: int
    size: int
    metrics: dict[str, Any]
    created: float
    sha256: str | None = None
    update_id: str | None = None
    kind: str = KIND_UPDATE
    result: dict[str, Any] | None = None
    directory: Path = field(default=Path("."), repr=False, compare=False)

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def owner(self) -> str:
        """Who may use the session: the client of an update, the experiment of an initial model."""
        return self.experiment_id if self.kind == KIND_INITIAL_MODEL else self.client_id

    @property
    def finished(self) -> bool:
        return self.update_id is not None or self.result is not None

    def offset(self) -> int:
        """The bytes committed so far."""
        try:
            return self.data.stat().st_size
        except FileNotFoundError:
            return self.size if self.finished else 0

    def expires_at(self, ttl_s: float) -> float:
        return _newest_mtime(self.directory) + ttl_s


def sessions_root(spool: Path) -> Path:
    return spool / SESSIONS_DIR


def is_upload_id(value: str) -> bool:
    return _ID_RE.fullmatch(value) is not None


def create(
    spool: Path,
    *,
    client_id: str,
    experiment_id: str,
    round: int,
    size: int,
    metrics: dict,
    sha256: str | None,
    kind: str = KIND_UPDATE,
) -> Session:
    """A new, empty session."""
    upload_id = f"upl_{secrets.token_hex(16)}"
    directory = sessions_root(spool) / upload_id
    directory.mkdir(parents=True)
    sess = Session(
        upload_id, client_id, experiment_id, round, size, metrics, time.time(), sha256, kind=kind, directory=directory
    )
    sess.data.touch()
    _write_meta(sess)
    _DIGESTS[upload_id] = (0, hashlib.sha256())
    _trim_digests()
    return sess


def _write_meta(sess: Session) -> None:
    record = {k: v for k, v in asdict(sess).items() if k != "directory"}
    tmp = sess.directory / "meta.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, sess.directory / "meta.json")


def load(
    spool: Path, upload_id: str, owner: str, ttl_s: float, now: float | None = None, *, kind: str = KIND_UPDATE
) -> Session:
    """The session ``upload_id`` of ``owner`` (a client id, or an experiment id for an initial model);
    NOT_FOUND when unknown, of another kind, someone else's or expired.

    An id is checked against its pattern before it becomes part of a path. Another owner's session is
    answered like a missing one, so ids cannot be probed.
    """
    gone = NotFound("Upload session not found", f"upload session '{upload_id}' does not exist or has expired")
    if not is_upload_id(upload_id):
        raise gone
    directory = sessions_root(spool) / upload_id
    try:
        record = json.loads((directory / "meta.json").read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        raise gone from None
    sess = Session(**record, directory=directory)
    if sess.kind != kind or sess.owner != owner:
        raise gone
    if sess.expires_at(ttl_s) < (time.time() if now is None else now):
        remove(sess)
        raise gone
    return sess


def remove(sess: Session) -> None:
    _DIGESTS.pop(sess.upload_id, None)
    shutil.rmtree(sess.directory, ignore_errors=True)


def mark_finished(sess: Session, update_id: str | None, result: dict[str, Any] | None = None) -> None:
    """Record the stored update or result (so a repeated finish answers the same) and drop the bytes."""
    sess.update_id, sess.result = update_id, result
    _write_meta(sess)
    sess.data.unlink(missing_ok=True)
    _DIGESTS.pop(sess.upload_id, None)


class Writer:
    """Appends one chunk to a session's data, under an exclusive lock; its digest follows along.

    Pieces are gathered into ``WRITE_BYTES`` batches, each written and hashed on a pool thread while the
    caller (the API's event loop) receives the next: a large chunk then costs the longer of receiving
    and writing, not their sum. At most one batch is in flight and one gathering per writer.
    """

    def __init__(self, sess: Session) -> None:
        self.sess = sess
        self._fh = open(sess.data, "ab")  # noqa: SIM115 - closed by close()
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            raise Conflict("Upload session busy", "another request is writing to this upload session") from None
        self.start = self._fh.seek(0, os.SEEK_END)
        known = _DIGESTS.get(sess.upload_id)
        self._digest = known[1].copy() if known is not None and known[0] == self.start else None
        self.written = 0
        self._batch: list[bytes] = []
        self._batched = 0
        self._in_flight: Future[None] | None = None
        self._broken = False

    def write(self, piece: bytes | memoryview) -> None:
        self._batch.append(bytes(piece))
        self._batched += len(piece)
        self.written += len(piece)
        if self._batched >= WRITE_BYTES:
            self._settle()  # the previous batch is on disk (or its error is raised) before the next goes
            batch, self._batch, self._batched = self._batch, [], 0
            self._in_flight = _WRITE_POOL.submit(self._write_out, batch)

    def _write_out(self, batch: list[bytes]) -> None:
        for piece in batch:
            self._fh.write(piece)
            if self._digest is not None:
                self._digest.update(piece)

    def _settle(self) -> None:
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            try:
                in_flight.result()
            except BaseException:
                self._broken = True  # nothing more is appended: the file keeps an in-order prefix
                raise

    def rollback(self) -> None:
        """Forget this chunk: the data goes back to where the chunk started."""
        self._settle()
        self._batch, self._batched = [], 0
        self._fh.flush()
        self._fh.truncate(self.start)
        self._fh.seek(self.start)
        self.written = 0
        self._digest = None
        _DIGESTS.pop(self.sess.upload_id, None)

    def close(self) -> int:
        """Keep what was written (all of it, or what arrived before a drop); return the new offset."""
        try:
            self._settle()
            if not self._broken:
                batch, self._batch, self._batched = self._batch, [], 0
                self._write_out(batch)
            self._fh.flush()
            end = self._fh.tell()
        finally:
            self._fh.close()
        if self._broken:  # a batch failed (its error went to write()): the digest may hold bytes not on disk
            self._digest = None
            _DIGESTS.pop(self.sess.upload_id, None)
        if self._digest is not None:
            _DIGESTS[self.sess.upload_id] = (end, self._digest)
            _DIGESTS.move_to_end(self.sess.upload_id)
            _trim_digests()
        os.utime(self.sess.directory)
        return end


def digest(sess: Session) -> str:
    """The sha256 of the session's data: from memory if this process saw every byte, else read once."""
    size = sess.data.stat().st_size
    known = _DIGESTS.get(sess.upload_id)
    if known is not None and known[0] == size:
        return str(known[1].hexdigest())
    h = hashlib.sha256()
    with open(sess.data, "rb") as fh:
        while chunk := fh.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def _trim_digests() -> None:
    while len(_DIGESTS) > _DIGESTS_MAX:
        _DIGESTS.popitem(last=False)


def expire(spool: Path, ttl_s: float, now: float | None = None) -> list[str]:
    """Remove sessions untouched for ``ttl_s`` (and anything in the sessions directory not a session)."""
    root = sessions_root(spool)
    removed: list[str] = []
    if not root.is_dir():
        return removed
    cutoff = (time.time() if now is None else now) - ttl_s
    for entry in root.iterdir():
        try:
            if is_upload_id(entry.name) and entry.is_dir() and _newest_mtime(entry) >= cutoff:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:
            continue
        _DIGESTS.pop(entry.name, None)
        removed.append(entry.name)
    return removed


def _newest_mtime(directory: Path) -> float:
    newest = 0.0
    for path in (directory, directory / "data", directory / "meta.json"):
        try:
            newest = max(newest, path.stat().st_mtime)
        except FileNotFoundError:
            continue
    return newest
