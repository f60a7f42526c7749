"""Contract tests for the blob store: every backend passes the same suite.

``BlobStoreContract`` holds the tests; each backend subclasses it with a ``store`` fixture (a fresh,
empty store) and the one thing only it knows, how to corrupt a stored blob. The backends are the local
directory and S3 (a real moto server over HTTP); tests of one backend's own behaviour sit in its class.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from moto.server import ThreadedMotoServer

from fedloom_core.storage.blobstore import (
    BlobInfo,
    BlobIntegrityError,
    BlobNotFoundError,
    BlobStore,
    InvalidBlobKeyError,
    LocalBlobStore,
    S3BlobStore,
    open_blob_store,
    validate_key,
)

KEY = "models/exp1/round-3.safetensors"
INVALID_KEYS = ["../x", "/abs", "a//b", "a/../b", "a\x00b", "", "a/./b", "a/", "a b", "a\\b", "x" * 513]


def _payload(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-looking test bytes."""
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32) + b"\x07" * (size % 32)


def _read_all(store: BlobStore, key: str) -> bytes:
    """Return the blob's bytes as materialised by open_local."""
    with store.open_local(key) as path:
        assert path.is_file()
        return path.read_bytes()


@pytest.mark.unit
def test_valid_keys_accepted() -> None:
    for key in [KEY, "updates/exp1/3/" + "ab" * 32 + ".safetensors", "a", "A-b_c.d/..e", "x" * 512]:
        assert validate_key(key) == key
    assert issubclass(InvalidBlobKeyError, ValueError)


@pytest.mark.unit
def test_factory_rejects_bad_urls() -> None:
    for url in ["", "http://x/y", "file://relative/path", "s3://"]:
        with pytest.raises(ValueError):
            open_blob_store(url)


def _count_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every digest check either backend makes (one per hash of a local file, one per S3 download)."""
    from fedloom_core.storage.blobstore import base as blobstore

    checked: list[str] = []
    real = blobstore._check_digest

    def counting(key: str, expected: str, actual: str) -> None:
        checked.append(key)
        real(key, expected, actual)

    monkeypatch.setattr(blobstore, "_check_digest", counting)
    return checked


class _FailingStream(io.RawIOBase):
    """A readable stream that yields some bytes and then raises, like a dropped upload."""

    def __init__(self, good_bytes: int) -> None:
        self._left = good_bytes

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            raise ConnectionResetError("client went away")
        n = min(self._left, size if size > 0 else self._left)
        self._left -= n
        return b"z" * n


class BlobStoreContract:
    """The behaviour every backend shares. A subclass provides the ``store`` fixture and ``corrupt``."""

    # Whether open_local yields a temporary copy, removed after the block, rather than the stored file.
    yields_a_copy: bool

    def corrupt(self, store: BlobStore, key: str, data: bytes) -> None:
        """Replace the stored bytes of ``key`` without updating its digest."""
        raise NotImplementedError

    def test_put_file_round_trip(self, store: BlobStore, tmp_path: Path) -> None:
        data = _payload(100_000)
        src = tmp_path / "src.bin"
        src.write_bytes(data)
        info = store.put_file(KEY, src)
        expected = BlobInfo(key=KEY, size=len(data), sha256=hashlib.sha256(data).hexdigest())
        assert info == expected
        assert store.info(KEY) == expected
        assert _read_all(store, KEY) == data
        assert src.read_bytes() == data  # source untouched

    def test_put_stream_round_trip(self, store: BlobStore) -> None:
        data = _payload(3 * (1 << 20) + 123, seed=1)  # several 1 MiB chunks plus a remainder
        info = store.put_stream(KEY, io.BytesIO(data))
        assert info.size == len(data)
        assert info.sha256 == hashlib.sha256(data).hexdigest()
        assert store.info(KEY) == info
        assert _read_all(store, KEY) == data
        assert b"".join(store.iter_bytes(KEY)) == data

    def test_empty_blob(self, store: BlobStore) -> None:
        info = store.put_stream("updates/exp1/3/empty.safetensors", io.BytesIO(b""))
        assert info.size == 0 and info.sha256 == hashlib.sha256(b"").hexdigest()
        assert _read_all(store, info.key) == b""

    def test_overwrite_replaces_content(self, store: BlobStore) -> None:
        store.put_stream(KEY, io.BytesIO(b"first version"))
        info = store.put_stream(KEY, io.BytesIO(b"second"))
        assert store.info(KEY) == info
        assert _read_all(store, KEY) == b"second"

    def test_iter_bytes_streams_in_chunks(self, store: BlobStore) -> None:
        data = _payload(3 * 1024 + 500, seed=2)
        store.put_stream(KEY, io.BytesIO(data))
        chunks = list(store.iter_bytes(KEY, chunk_size=1024))
        assert len(chunks) == 4
        assert all(len(c) <= 1024 for c in chunks)
        assert b"".join(chunks) == data

    def test_exists_and_delete(self, store: BlobStore) -> None:
        assert not store.exists(KEY)
        store.put_stream(KEY, io.BytesIO(b"abc"))
        assert store.exists(KEY)
        assert not store.exists("models/exp1/round-4.safetensors")
        store.delete(KEY)
        assert not store.exists(KEY)
        with pytest.raises(BlobNotFoundError):
            store.info(KEY)
        store.delete(KEY)  # deleting a missing key is fine

    def test_missing_key_raises_not_found(self, store: BlobStore) -> None:
        missing = "models/nope/round-1.safetensors"
        with pytest.raises(BlobNotFoundError):
            store.info(missing)
        with pytest.raises(BlobNotFoundError), store.open_local(missing):
            pass
        with pytest.raises(BlobNotFoundError):
            list(store.iter_bytes(missing))

    @pytest.mark.parametrize("bad_key", INVALID_KEYS)
    def test_invalid_keys_rejected(self, store: BlobStore, bad_key: str, tmp_path: Path) -> None:
        src = tmp_path / "src.bin"
        src.write_bytes(b"x")
        with pytest.raises(InvalidBlobKeyError):
            validate_key(bad_key)
        with pytest.raises(InvalidBlobKeyError):
            store.put_file(bad_key, src)
        with pytest.raises(InvalidBlobKeyError):
            store.put_stream(bad_key, io.BytesIO(b"x"))
        with pytest.raises(InvalidBlobKeyError):
            store.info(bad_key)
        with pytest.raises(InvalidBlobKeyError):
            store.exists(bad_key)
        with pytest.raises(InvalidBlobKeyError):
            store.delete(bad_key)
        with pytest.raises(InvalidBlobKeyError), store.open_local(bad_key):
            pass
        assert not (tmp_path / "x").exists() and not Path("/abs").exists()

    def test_corruption_detected(self, store: BlobStore) -> None:
        data = _payload(10_000, seed=3)
        store.put_stream(KEY, io.BytesIO(data))
        self.corrupt(store, KEY, b"tampered" + data[8:])
        with pytest.raises(BlobIntegrityError), store.open_local(KEY):
            pytest.fail("open_local must not yield corrupted content")
        with pytest.raises(BlobIntegrityError):
            list(store.iter_bytes(KEY))

    def test_five_mib_file(self, store: BlobStore, tmp_path: Path) -> None:
        src = tmp_path / "big.bin"
        data = os.urandom(5 * (1 << 20) + 17)
        src.write_bytes(data)
        info = store.put_file(KEY, src)
        assert info.size == len(data) and info.sha256 == hashlib.sha256(data).hexdigest()
        with store.open_local(KEY) as path:
            assert path.stat().st_size == len(data)
            assert hashlib.sha256(path.read_bytes()).hexdigest() == info.sha256

    def test_open_local_path_lifecycle(self, store: BlobStore) -> None:
        store.put_stream(KEY, io.BytesIO(b"payload"))
        with store.open_local(KEY) as path:
            assert path.read_bytes() == b"payload"
        if self.yields_a_copy:
            assert not path.exists() and not path.parent.exists()
        else:
            assert path.exists()  # the stored file itself

    def test_ping(self, store: BlobStore) -> None:
        store.ping()

    def test_read_once_checks_each_blob_once_in_the_block(
        self, store: BlobStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        store.put_stream(KEY, io.BytesIO(_payload(50_000, seed=1)))
        checked = _count_checks(monkeypatch)
        # Outside a block a blob written just now is checked on every open (fetched again from S3).
        for _ in range(2):
            assert _read_all(store, KEY) == _payload(50_000, seed=1)
        assert checked == [KEY, KEY]
        checked.clear()
        with store.read_once():
            paths = []
            for _ in range(3):
                with store.open_local(KEY) as path:
                    assert path.read_bytes() == _payload(50_000, seed=1)
                    paths.append(path)
            assert checked == [KEY]
            # Another thread is not in the block: it checks for itself.
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(1) as pool:
                assert pool.submit(_read_all, store, KEY).result() == _payload(50_000, seed=1)
            assert checked == [KEY, KEY]
            # A blob replaced inside the block is read anew, never the copy checked before.
            store.put_stream(KEY, io.BytesIO(_payload(40_000, seed=2)))
            assert _read_all(store, KEY) == _payload(40_000, seed=2)
        if self.yields_a_copy:
            assert not any(p.parent.exists() for p in paths)  # kept copies go when the block ends
        checked.clear()
        assert _read_all(store, KEY) == _payload(40_000, seed=2)
        assert checked == [KEY]  # after the block, checked again


@pytest.mark.unit
class TestLocalBlobStore(BlobStoreContract):
    yields_a_copy = False

    @pytest.fixture
    def store(self, tmp_path: Path) -> LocalBlobStore:
        store = open_blob_store(f"file://{tmp_path / 'blobs'}")
        assert isinstance(store, LocalBlobStore)
        return store

    def corrupt(self, store: BlobStore, key: str, data: bytes) -> None:
        assert isinstance(store, LocalBlobStore)
        (store.root / key).write_bytes(data)

    def test_interrupted_write_leaves_nothing(self, store: LocalBlobStore) -> None:
        with pytest.raises(ConnectionResetError):
            store.put_stream(KEY, _FailingStream(3 * (1 << 20)))  # type: ignore[arg-type]
        assert not store.exists(KEY)
        with pytest.raises(BlobNotFoundError):
            store.info(KEY)
        leftovers = [p for p in store.root.rglob("*") if p.is_file()]
        assert leftovers == []

    def test_interrupted_overwrite_keeps_previous_version(self, store: LocalBlobStore) -> None:
        old = store.put_stream(KEY, io.BytesIO(b"previous model"))
        with pytest.raises(ConnectionResetError):
            store.put_stream(KEY, _FailingStream(10))  # type: ignore[arg-type]
        assert store.info(KEY) == old
        assert _read_all(store, KEY) == b"previous model"

    def test_layout_and_root_confinement(self, store: LocalBlobStore, tmp_path: Path) -> None:
        root = store.root
        info = store.put_stream(KEY, io.BytesIO(b"abc"))
        assert (root / KEY).read_bytes() == b"abc"
        assert (root / (KEY + ".sha256")).read_text().strip() == info.sha256
        outside = tmp_path / "outside"
        outside.mkdir()
        (root / "models" / "link").symlink_to(outside)
        with pytest.raises(InvalidBlobKeyError):
            store.put_stream("models/link/escape.bin", io.BytesIO(b"x"))
        assert list(outside.iterdir()) == []

    def test_read_once_still_catches_a_file_changed_in_the_block(self, store: LocalBlobStore) -> None:
        store.put_stream(KEY, io.BytesIO(b"a" * 5000))
        with store.read_once():
            with store.open_local(KEY) as path:
                pass
            # Same size, in place: the timestamps move once the kernel's coarse clock has ticked (a write in
            # the same tick as the check would go unseen, the price of not re-hashing within a block).
            time.sleep(0.05)
            path.write_bytes(b"b" * 5000)
            with pytest.raises(BlobIntegrityError), store.open_local(KEY):
                pytest.fail("open_local must not yield modified content")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """Run a real moto S3 HTTP server on a free local port for the whole session."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


class TestS3BlobStore(BlobStoreContract):
    yields_a_copy = True

    @pytest.fixture
    def store(self, moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> S3BlobStore:
        """A unique bucket on the moto server, reached with test credentials only."""
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CA_BUNDLE"):
            monkeypatch.delenv(name, raising=False)
        bucket = f"fedloom-test-{uuid.uuid4().hex[:16]}"
        store = open_blob_store(f"s3://{bucket}/blobs", s3_endpoint_url=moto_endpoint)
        assert isinstance(store, S3BlobStore)
        return store

    def corrupt(self, store: BlobStore, key: str, data: bytes) -> None:
        assert isinstance(store, S3BlobStore)
        store.client.put_object(
            Bucket=store.bucket, Key=f"{store.prefix}/{key}", Body=data, Metadata={"sha256": "0" * 64}
        )
