"""The SDK's initial-model upload against a live ``fedloom serve``: a file over the resumable threshold
goes in chunks, a connection cut at 90% resumes, and the experiment starts from the file."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import fedloom._client
from fedloom import FLClient
from tests.api.test_initial_model_sessions import custom_weights, starts_from
from tests.api.test_initial_models import CUSTOM
from tests.conftest import LiveServer, start_serve, stop_serve
from tests.sdk.test_resumable_upload import CutOnce

pytestmark = pytest.mark.e2e
CHUNK = 4096


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_serve(tmp_path_factory.mktemp("sdk-initial") / "data", {"FEDLOOM_UPLOAD_CHUNK_MB": str(CHUNK / 1e6)})
    yield live
    stop_serve(live)


def test_initial_model_cut_at_90_percent_resumes_and_the_experiment_starts_from_it(
    server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = custom_weights(2)
    path = tmp_path / "initial.safetensors"
    path.write_bytes(data)
    size = len(data)
    cut_at = int(size * 0.9)
    # The file counts as large: the default path (resumable=None) must take the session.
    monkeypatch.setattr(fedloom._client, "RESUMABLE_THRESHOLD", size)
    transport = CutOnce(cut_at)
    with FLClient(server.url, server.admin_key, transport=transport) as client:
        exp_id = client.create_experiment({**CUSTOM, "name": "sdk-resumed", "training_config": {"rounds": 1}})[
            "experiment_id"
        ]
        stored = client.upload_initial_model(exp_id, path)
    assert transport.cut
    assert stored["model_id"] == f"model_{exp_id}_round_0" and stored["sha256"] == hashlib.sha256(data).hexdigest()
    # It went on from the server's offset, not from the start.
    firsts = [int(r.split()[1].split("-")[0]) for r in transport.ranges]
    cut_index = next(i for i, r in enumerate(transport.ranges) if int(r.split("-")[1].split("/")[0]) >= cut_at)
    assert firsts[cut_index + 1] >= cut_at - CHUNK and firsts[cut_index + 1] > 0.8 * size
    assert transport.sent < size + CHUNK
    with httpx.Client(base_url=server.api, headers=server.headers(), timeout=60) as http:
        starts_from(http, exp_id, stored["model_id"], data, "si")
        http.post("/training/stop", json={"experiment_id": exp_id, "reason": "test over"})


class Seen(httpx.HTTPTransport):
    """A real transport that notes each request's method and path."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.method, request.url.path))
        return super().handle_request(request)


def test_small_initial_models_go_in_one_request(server: LiveServer) -> None:
    transport = Seen()
    with FLClient(server.url, server.admin_key, transport=transport) as client:
        created = client.create_experiment({**CUSTOM, "name": "sdk-single"}, initial_model=custom_weights(3))
    exp_id = created["experiment_id"]
    single = ("PUT", f"/api/v1/experiments/{exp_id}/initial_model")
    assert transport.requests == [("POST", "/api/v1/experiments"), single]
