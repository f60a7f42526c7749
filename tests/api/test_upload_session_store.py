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
