"""A model download whose blob store is slow to open a read (as an S3 GET can be) does not hold up other requests."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedloom_core.storage.blobstore import LocalBlobStore
from fedloom_core.storage.db import GlobalModel
from fedloom_core.storage.repo import session_scope

DELAY_S = 3.0
# It times another request against the blob store's delay.
pytestmark = pytest.mark.serial


class SlowToOpen(LocalBlobStore):
    """The real local store, but each streamed read first waits as long as a slow S3 GET."""

    def iter_bytes(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        time.sleep(DELAY_S)
        return super().iter_bytes(key, chunk_size)


def test_a_slow_blob_read_does_not_block_the_event_loop(local_app, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    http = local_app()
    state = http.app.state
    state.blobs = SlowToOpen(tmp_path / "slow-blobs")
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(path))
    info = state.blobs.put_file("models/e/0.safetensors", path)
    with session_scope(state.engine) as s:
        s.add(
            GlobalModel(
                model_id="model_e_round_0",
                experiment_id="e",
                round=0,
                blob_key=info.key,
                sha256=info.sha256,
                size_bytes=info.size,
            )
        )
    with ThreadPoolExecutor(1) as pool:
        download = pool.submit(http.get, "/model/download/model_e_round_0")
        time.sleep(0.3)  # the download is now waiting on the blob store
        started = time.monotonic()
        meta = http.get("/model/global", params={"experiment_id": "e"})
        took = time.monotonic() - started
        assert not download.done(), "the download should still be waiting on the blob store"
        got = download.result(timeout=30)
    assert meta.status_code == 200 and meta.json()["model_id"] == "model_e_round_0"
    assert took < DELAY_S / 2, f"another request waited {took:.2f} s behind the blob read"
    assert got.status_code == 200 and got.content == path.read_bytes()
    assert got.headers["X-Model-SHA256"] == info.sha256
