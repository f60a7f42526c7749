"""The SDK's resumable upload against a live ``fedloom serve``: a connection cut mid-chunk resumes."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedloom import FLClient
from fedloom_core.storage.keys import update_key
from tests.api.test_training_api import register, start_body, wait_task
from tests.conftest import LiveServer, start_serve, stop_serve

pytestmark = pytest.mark.e2e
CHUNK = 4096


class CutOnce(httpx.HTTPTransport):
    """A real transport whose first chunk upload crossing ``cut_at`` bytes of the file dies there, mid-chunk."""

    def __init__(self, cut_at: int) -> None:
        super().__init__()
        self.cut_at, self.cut = cut_at, False
        self.ranges: list[str] = []
        self.sent = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            self.ranges.append(request.headers["content-range"])
            first = int(request.headers["content-range"].split()[1].split("-")[0])
            request.stream = _Counted(self, request.stream, first)  # type: ignore[arg-type]
        return super().handle_request(request)


class _Counted(httpx.SyncByteStream):
    """A chunk's body as sent; the transport's first crossing of ``cut_at`` raises there."""

    def __init__(self, owner: CutOnce, stream: httpx.SyncByteStream, first: int) -> None:
        self.owner, self.stream, self.first = owner, stream, first

    def __iter__(self) -> Iterator[bytes]:
        self_, pos = self.owner, self.first
        for piece in self.stream:
            if not self_.cut and pos + len(piece) > self_.cut_at:
                keep = self_.cut_at - pos
                self_.cut = True
                self_.sent += keep
                yield bytes(piece[:keep])
                raise httpx.WriteError("connection dropped (test)")
            self_.sent += len(piece)
            pos += len(piece)
            yield piece


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_serve(tmp_path_factory.mktemp("sdk-resume") / "data", {"FEDLOOM_UPLOAD_CHUNK_MB": str(CHUNK / 1e6)})
    yield live
    stop_serve(live)


def test_upload_cut_at_90_percent_resumes_and_stores_the_file(server: LiveServer, tmp_path: Path) -> None:
    with httpx.Client(base_url=server.api, headers=server.headers(), timeout=60) as http:
        keys = {cid: register(http, cid) for cid in ("r1", "r2")}
        resp = http.post("/training/start", json=start_body("exp-sdk-resume", rounds=1, round_timeout_s=3600))
        assert resp.status_code == 200, resp.text
        task = wait_task(http, "r1")
        state = st_load(http.get(f"/model/download/{task['model_id']}").content)
    data = st_save({k: v + 0.03 for k, v in state.items()})
    path = tmp_path / "update.safetensors"
    path.write_bytes(data)
    size = len(data)
    cut_at = int(size * 0.9)
    transport = CutOnce(cut_at)
    with FLClient(server.url, keys["r1"], transport=transport) as client:
        update = client.upload_model_update("r1", path, {"data_samples": 25}, resumable=True)
    assert transport.cut
    assert update["client_id"] == "r1" and update["round"] == 1
    # It went on from the server's offset, not from the start: the chunk after the cut starts past 80%.
    firsts = [int(r.split()[1].split("-")[0]) for r in transport.ranges]
    cut_index = next(i for i, r in enumerate(transport.ranges) if int(r.split("-")[1].split("/")[0]) >= cut_at)
    assert firsts[cut_index + 1] >= cut_at - CHUNK and firsts[cut_index + 1] > 0.8 * size
    assert transport.sent < size + CHUNK
    digest = hashlib.sha256(data).hexdigest()
    stored = server.data_dir / "blobs" / update_key("exp-sdk-resume", 1, "r1", digest)
    assert stored.read_bytes() == data


def test_small_files_go_in_one_request_unless_asked(server: LiveServer, tmp_path: Path) -> None:
    with httpx.Client(base_url=server.api, headers=server.headers(), timeout=60) as http:
        key = http.post(f"/clients/{'r2'}/rotate-key").json()["api_key"]
        state = st_load(http.get(f"/model/download/{wait_task(http, 'r2')['model_id']}").content)
    transport = CutOnce(10**12)
    data = st_save({k: v - 0.03 for k, v in state.items()})
    with FLClient(server.url, key, transport=transport) as client:
        update = client.upload_model_update("r2", data, {"data_samples": 25})
    assert transport.ranges == [] and update["client_id"] == "r2"
