"""100 clients uploading in the same second are all accepted, counted once, and aggregated."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tests.api.test_training_api import register, start_body, wait_task
from tests.conftest import LiveServer

pytestmark = pytest.mark.e2e
CLIENTS = 100


async def _upload_all(live_server: LiveServer, keys: dict[str, str], blob: bytes) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=live_server.api, timeout=120) as http:

        async def one(cid: str) -> httpx.Response:
            return await http.post(
                f"/model/update/{cid}",
                headers={"Authorization": f"Bearer {keys[cid]}"},
                files={"model_file": ("m.safetensors", blob)},
                data={"metrics": '{"data_samples": 10}'},
            )

        return await asyncio.gather(*(one(cid) for cid in keys))


def test_hundred_simultaneous_uploads(live_server: LiveServer) -> None:
    http = httpx.Client(base_url=live_server.api, headers=live_server.headers(), timeout=60)
    keys = {f"u{i:03d}": register(http, f"u{i:03d}") for i in range(CLIENTS)}
    started = http.post("/training/start", json=start_body("many", rounds=1, min_clients=CLIENTS))
    assert started.status_code == 200, started.text
    task = wait_task(http, "u000")
    state = st_load(http.get(f"/model/download/{task['model_id']}").content)
    blob = st_save({k: v + 0.01 for k, v in state.items()})

    began = time.monotonic()
    responses = asyncio.run(_upload_all(live_server, keys, blob))
    elapsed = time.monotonic() - began
    failed = [(r.status_code, r.text[:200]) for r in responses if r.status_code != 200]
    assert not failed, failed
    assert len({r.json()["update_id"] for r in responses}) == CLIENTS
    print(f"{CLIENTS} concurrent uploads answered in {elapsed:.1f} s")

    deadline = time.monotonic() + 120
    while (status := http.get("/training/status").json())["status"] == "running":
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert status["status"] == "completed", status
    assert status["round_metrics"]["participating_clients"] == CLIENTS
