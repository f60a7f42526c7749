"""Load and listeners on a live server: 200 requests a second on GET /training/status for 60 s
with no error, while a real experiment runs and 50 WebSocket listeners follow it to the end, each
receiving every event."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import httpx
import pytest
import websockets

from fedloom_tools.loadtest import LoadReport
from tests.conftest import LiveServer, small_run_body, spawn_clients, start_serve, stop_serve, wait_registered

pytestmark = [pytest.mark.e2e, pytest.mark.serial]
RATE, DURATION, LISTENERS, CLIENTS, ROUNDS = 200, 60, 50, 3, 6


async def _listen(url: str, done: asyncio.Event, out: list[dict]) -> None:
    """Follow the event log from the start until the experiment's end event, then a moment more."""
    async with websockets.connect(url, open_timeout=30, ping_interval=None) as ws:
        while True:
            try:
                message = await asyncio.wait_for(ws.recv(), timeout=1.0)
            except TimeoutError:
                if done.is_set():
                    return
                continue
            out.append(json.loads(message))


async def _replay(url: str) -> list[dict]:
    """The whole stored log, read once at the end: what every listener should have seen."""
    events: list[dict] = []
    async with websockets.connect(url, open_timeout=30) as ws:
        while True:
            try:
                events.append(json.loads(await asyncio.wait_for(ws.recv(), timeout=2.0)))
            except TimeoutError:
                return events


async def _scenario(server: LiveServer, http: httpx.Client) -> tuple[LoadReport, list[list[dict]], list[dict]]:
    ws_url = server.url.replace("http", "ws") + f"/ws/events?api_key={server.admin_key}&since=0"
    done = asyncio.Event()
    seen: list[list[dict]] = [[] for _ in range(LISTENERS)]
    listeners = [asyncio.create_task(_listen(ws_url, done, seen[i])) for i in range(LISTENERS)]
    await asyncio.sleep(2)  # every listener connected before the experiment starts
    assert not any(t.done() for t in listeners), [t.exception() for t in listeners if t.done()]

    # The load comes from its own process (the `fedloom loadtest` script), not from this one, which
    # is busy with the 50 listeners.
    load = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fedloom_tools.loadtest",
        "--server",
        server.url,
        "--rate",
        str(RATE),
        "--duration",
        str(DURATION),
        "--concurrency",
        "32",
        "--json",
        env={**os.environ, "FEDLOOM_API_KEY": server.admin_key},
        stdout=asyncio.subprocess.PIPE,
    )
    started = await asyncio.to_thread(http.post, "/training/start", json=small_run_body("load", ROUNDS, CLIENTS))
    assert started.status_code == 200, started.text
    deadline = time.monotonic() + 240
    while (await asyncio.to_thread(http.get, "/training/status")).json()["status"] == "running":
        assert time.monotonic() < deadline, "the experiment did not finish"
        assert not any(t.done() for t in listeners), "a listener was disconnected mid-run"
        await asyncio.sleep(1)
    out, _ = await load.communicate()
    report = LoadReport(**json.loads(out.decode().strip().splitlines()[-1]))
    await asyncio.sleep(2)  # the hub polls the log every 0.2 s: let the last events reach everyone
    done.set()
    await asyncio.gather(*listeners)
    return report, seen, await _replay(ws_url)


@pytest.mark.timeout(600)
def test_status_holds_200_rps_while_50_listeners_follow_a_run(tmp_path: Path) -> None:
    server = start_serve(tmp_path / "data")
    procs = spawn_clients(server, CLIENTS, tmp_path)
    try:
        http = httpx.Client(base_url=server.api, headers=server.headers(), timeout=60)
        wait_registered(http, CLIENTS, procs)
        report, seen, log = asyncio.run(_scenario(server, http))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        stop_serve(server)

    print(f"\nload: {report.line()}")
    (tmp_path / "load.json").write_text(json.dumps(report.__dict__))
    assert report.sent == RATE * DURATION, report.error_kinds
    assert report.errors == 0 and report.ok == report.sent, report.error_kinds
    # Held the rate: every request answered within the run plus a short drain.
    assert report.elapsed_s < DURATION + 5, report.line()

    types = [e["type"] for e in log]
    assert types.count("round_completed") == ROUNDS and "training_completed" in types, types
    ids = [e["event_id"] for e in log]
    for i, events in enumerate(seen):
        assert [e["event_id"] for e in events] == ids, f"listener {i} missed or repeated events"
