"""The resumable-upload session store on disk: ids, owners, digests across a restart, and expiry at start-up."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from fedloom_core.errors import Conflict, NotFound
from fedloom_core.storage import retention
from fedloom_core.storage import upload_sessions as sessions

pytestmark = pytest.mark.unit


def _open(spool: Path, size: int = 10) -> sessions.Session:
    return sessions.create(
        spool, client_id="c1", experiment_id="e", round=1, size=size, metrics={"data_samples": 1}, sha256=None
    )


def test_owner_pattern_and_one_writer_at_a_time(tmp_path: Path) -> None:
    sess = _open(tmp_path)
    assert sessions.load(tmp_path, sess.upload_id, "c1", 60).size == 10
    for upload_id, client in ((sess.upload_id, "c2"), ("upl_" + "0" * 32, "c1"), ("../../etc", "c1")):
        with pytest.raises(NotFound):
            sessions.load(tmp_path, upload_id, client, 60)
    writer = sessions.Writer(sess)
    with pytest.raises(Conflict):
        sessions.Writer(sess)
    writer.write(b"abc")
    assert writer.close() == 3 and sess.offset() == 3


def test_digest_is_right_after_a_rollback_and_in_a_new_process(tmp_path: Path) -> None:
    sess = _open(tmp_path, 8)
    w = sessions.Writer(sess)
    w.write(b"abcd")
    w.close()
    w = sessions.Writer(sess)
    w.write(b"zz")
    w.rollback()
    w.close()
    w = sessions.Writer(sess)
    w.write(b"efgh")
    w.close()
    assert sessions.digest(sess) == hashlib.sha256(b"abcdefgh").hexdigest()
    sessions._DIGESTS.clear()  # as after a restart: the file is hashed instead
    assert sessions.digest(sess) == hashlib.sha256(b"abcdefgh").hexdigest()


def test_start_up_cleaning_keeps_live_sessions_and_expires_old_ones(tmp_path: Path) -> None:
    live, old = _open(tmp_path), _open(tmp_path)
    stray = tmp_path / "upload-stray"
    stray.write_bytes(b"x")
    long_ago = time.time() - 7200
    for path in (old.data, old.directory / "meta.json", old.directory, stray):
        os.utime(path, (long_ago, long_ago))
    removed = retention.clean_spool(tmp_path, time.time(), session_ttl_s=3600)
    assert sorted(removed) == sorted([old.upload_id, "upload-stray"])
    assert live.directory.exists() and not old.directory.exists()
    with pytest.raises(NotFound):
        sessions.load(tmp_path, old.upload_id, "c1", 3600)


def test_a_chunk_of_many_batches_lands_whole_and_in_order(tmp_path: Path) -> None:
    """Pieces go to disk in WRITE_BYTES batches on a pool thread: every byte, in order, and the digest."""
    data = os.urandom(3 * sessions.WRITE_BYTES + 12345)
    sess = _open(tmp_path, len(data) + 10)
    w = sessions.Writer(sess)
    w.write(b"head")
    for i in range(4, len(data), 65536):
        w.write(memoryview(data)[i : i + 65536])
    assert w.close() == len(data) == sess.offset()
    assert sess.data.read_bytes() == b"head" + data[4:]
    assert sessions.digest(sess) == hashlib.sha256(b"head" + data[4:]).hexdigest()


def test_a_rollback_after_batches_went_to_disk_restores_the_offset(tmp_path: Path) -> None:
    first, second = os.urandom(1000), os.urandom(2 * sessions.WRITE_BYTES + 5)
    sess = _open(tmp_path, len(first) + len(second))
    w = sessions.Writer(sess)
    w.write(first)
    assert w.close() == len(first)
    w = sessions.Writer(sess)
    for i in range(0, len(second), 1 << 16):
        w.write(second[i : i + (1 << 16)])
    w.rollback()
    assert w.close() == len(first) and sess.data.read_bytes() == first
    assert sessions.digest(sess) == hashlib.sha256(first).hexdigest()


def test_a_failed_batch_write_is_raised_and_the_file_closed(tmp_path: Path) -> None:
    sess = _open(tmp_path, 4 * sessions.WRITE_BYTES)
    w = sessions.Writer(sess)
    real = w._fh

    class Full:
        def write(self, _piece: bytes) -> int:
            raise OSError(28, "No space left on device")

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(real, name)

    w._fh = Full()  # type: ignore[assignment]
    w.write(b"x" * sessions.WRITE_BYTES)  # handed to the pool; its failure shows at the next settle
    with pytest.raises(OSError, match="No space left"):
        w.close()
    assert real.closed
    sessions.Writer(sess).close()  # the lock went with the file: the session takes a writer again


def test_after_a_failed_batch_nothing_more_is_appended(tmp_path: Path) -> None:
    """A batch fails mid-chunk: the error reaches write(); close() then appends nothing after it, so the
    data stays an in-order prefix, the offset is the file's size and the digest is taken from the file."""
    sess = _open(tmp_path, 4 * sessions.WRITE_BYTES)
    w = sessions.Writer(sess)
    real, calls = w._fh, []

    class FailsOnce:
        def write(self, piece: bytes) -> int:
            calls.append(len(piece))
            if len(calls) == 2:
                raise OSError(5, "I/O error")
            return real.write(piece)

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(real, name)

    w._fh = FailsOnce()  # type: ignore[assignment]
    piece = os.urandom(sessions.WRITE_BYTES // 2)
    with pytest.raises(OSError, match="I/O error"):
        for _ in range(8):
            w.write(piece)
    assert w.close() == len(piece) == sess.offset()
    assert sess.data.read_bytes() == piece
    assert sessions.digest(sess) == hashlib.sha256(piece).hexdigest()
