"""What the control-plane benchmarks share: a real ``fedloom serve``, fast asyncio clients, round timings.

The clients speak the same HTTP protocol as ``fedloom client`` (register, long-poll the task, download
the round's global model, upload) but do no training: each uploads an update computed once before the
experiment starts, after an optional fixed sleep that stands for local training. So every second the
experiment takes beyond those sleeps is the server's (and the protocol's) own cost.

Round timings come from two places: the database (when each round opened, when each update was
accepted) and the workflow's Temporal history (when each activity was scheduled and completed, also
for local activities, whose markers carry their schedule and completion times).
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fedloom_tools.launch import ServeProcess, memory_bytes, start_serve  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LONG_POLL_S = 10.0


# The benchmarks' name for a running ``fedloom serve``; started with rate limits far above any
# rate a benchmark's clients reach.
Server = ServeProcess


def start_server(data_dir: Path, env_extra: dict[str, str] | None = None, timeout: float = 300) -> Server:
    """Start ``fedloom serve --separate-worker`` in ``data_dir`` (log in ``<data_dir>/serve.log``) and wait
    until it is healthy: the benchmarks measure the API and the worker apart, in the layout for heavy work."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return start_serve(data_dir, env_extra, log_path=data_dir / "serve.log", timeout=timeout, separate_worker=True)


def precomputed_update(architecture: str, dataset: str, seed: int) -> bytes:
    """A safetensors update matching the experiment's model tensor for tensor: a seeded model's weights."""
    from safetensors.torch import save

    from fedloom_core.learning.datasets import dataset_info
    from fedloom_core.learning.zoo import build_model

    info = dataset_info(dataset)
    model = build_model(architecture, info.input_shape, info.num_classes, seed=seed)
    return save({k: v.contiguous() for k, v in model.state_dict().items()})


@dataclass
class ClientLog:
    """What one fast client saw: per round, when it learnt of the round and when its upload was accepted,
    and how long its download and upload requests took (seconds)."""

    client_id: str
    told: dict[int, float] = field(default_factory=dict)
    uploaded: dict[int, float] = field(default_factory=dict)
    trained: dict[int, float] = field(default_factory=dict)
    download_s: dict[int, float] = field(default_factory=dict)
    upload_s: dict[int, float] = field(default_factory=dict)


async def fast_client(
    http: httpx.AsyncClient, admin_key: str, client_id: str, update: bytes, train_s: float, log: ClientLog
) -> None:
    """Register, then for each round: learn of it, download the model, sleep ``train_s``, upload ``update``."""
    reg = await http.post(
        "/api/v1/clients/register",
        json={"client_id": client_id, "client_config": {}, "capabilities": {"compute_power": "cpu"}},
        headers={"Authorization": f"Bearer {admin_key}"},
    )
    if reg.status_code == 409:  # registered by an earlier experiment on this server: act with the admin key
        auth = {"Authorization": f"Bearer {admin_key}"}
    else:
        reg.raise_for_status()
        auth = {"Authorization": f"Bearer {reg.json()['api_key']}"}
    seen_running = False
    metrics = json.dumps({"data_samples": 100, "local_accuracy": 0.5, "training_time": train_s})
    while True:
        resp = await http.get(f"/api/v1/clients/{client_id}/task", params={"wait": LONG_POLL_S}, headers=auth)
        resp.raise_for_status()
        task = resp.json()
        seen_running = seen_running or task.get("experiment_status") == "running"
        if task["status"] == "done" and seen_running:
            return
        if task["status"] != "train":
            continue
        rnd = int(task["round"])
        log.told[rnd] = time.time()
        started = time.perf_counter()
        got = await http.get(f"/api/v1/model/download/{task['model_id']}", headers=auth)
        got.raise_for_status()
        log.download_s[rnd] = time.perf_counter() - started
        started = time.perf_counter()
        if train_s > 0:
            await asyncio.sleep(train_s)
        log.trained[rnd] = time.perf_counter() - started
        started = time.perf_counter()
        up = await http.post(
            f"/api/v1/model/update/{client_id}",
            files={"model_file": ("update.safetensors", io.BytesIO(update))},
            data={"metrics": metrics},
            headers=auth,
        )
        if up.status_code == 409:  # the round closed while we slept: the next poll says what to do
            continue
        up.raise_for_status()
        log.upload_s[rnd] = time.perf_counter() - started
        log.uploaded[rnd] = time.time()


async def register_and_wait(server: Server, clients: list[str]) -> None:
    """Block until the server counts every client as registered."""
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        while True:
            status = await http.get("/api/v1/status", headers={"Authorization": f"Bearer {server.admin_key}"})
            if status.json().get("registered_clients", 0) >= len(clients):
                return
            await asyncio.sleep(0.1)


@dataclass
class RunResult:
    experiment_id: str
    status: str
    started: float  # time.time() just before POST /training/start
    finished: float  # time.time() when the experiment was seen ended
    logs: list[ClientLog]
    final: dict[str, Any]


async def run_experiment(
    server: Server,
    body: dict[str, Any],
    n_clients: int,
    *,
    train_s: float = 0.0,
    architecture: str = "MLP",
    dataset: str = "digits",
    timeout: float = 600,
    on_progress: Any = None,
) -> RunResult:
    """Start ``n_clients`` fast clients, start the experiment, and follow it to its end."""
    ids = [f"bench-{i:03d}" for i in range(1, n_clients + 1)]
    updates = [precomputed_update(architecture, dataset, seed=i) for i in range(n_clients)]
    logs = [ClientLog(cid) for cid in ids]
    limits = httpx.Limits(max_connections=4 * n_clients + 10, max_keepalive_connections=4 * n_clients + 10)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
        tasks = [
            asyncio.create_task(fast_client(http, server.admin_key, cid, upd, train_s, log))
            for cid, upd, log in zip(ids, updates, logs, strict=True)
        ]
        await register_and_wait(server, ids)
        admin = {"Authorization": f"Bearer {server.admin_key}"}
        started = time.time()
        resp = await http.post("/api/v1/training/start", json=body, headers=admin)
        if resp.status_code >= 400:
            raise RuntimeError(f"training/start: {resp.status_code} {resp.text}")
        exp_id = resp.json()["experiment_id"]
        deadline = time.monotonic() + timeout
        while True:
            status = (await http.get("/api/v1/training/status", headers=admin)).json()
            if status["status"] != "running" and status.get("experiment_id") == exp_id:
                break
            if any(t.done() and t.exception() for t in tasks):
                raise next(t.exception() for t in tasks if t.done() and t.exception())  # type: ignore[misc]
            if time.monotonic() > deadline:
                raise TimeoutError(f"experiment {exp_id} still {status['status']} after {timeout:.0f}s")
            if on_progress is not None:
                on_progress(status)
            await asyncio.sleep(0.25)
        finished = time.time()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=LONG_POLL_S + 20)
    return RunResult(exp_id, status["status"], started, finished, logs, status)


# -- round timings -------------------------------------------------------------------------


def _epoch(value: datetime | str) -> float:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:  # SQLite hands back naive UTC
        from datetime import UTC

        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def db_rows(data_dir: Path, sql: str, *params: object) -> list[tuple]:
    """The rows of one query on the server's SQLite database, opened read-only."""
    import sqlite3

    con = sqlite3.connect(f"file:{data_dir / 'fedloom.db'}?mode=ro", uri=True)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def db_round_times(data_dir: Path, experiment_id: str) -> dict[int, dict[str, float]]:
    """Per round, from the database: ``opened`` (open_round's commit), ``last_upload`` and ``completed``."""
    rounds = db_rows(
        data_dir,
        "SELECT round, started_at, completed_at FROM round WHERE experiment_id = ? ORDER BY round",
        experiment_id,
    )
    last = dict(
        db_rows(
            data_dir,
            'SELECT round, MAX(received_at) FROM "update" WHERE experiment_id = ? GROUP BY round',
            experiment_id,
        )
    )
    out: dict[int, dict[str, float]] = {}
    for rnd, opened, completed in rounds:
        out[rnd] = {"opened": _epoch(opened)}
        if rnd in last:
            out[rnd]["last_upload"] = _epoch(last[rnd])
        if completed:
            out[rnd]["completed"] = _epoch(completed)
    return out


def overheads(times: dict[int, dict[str, float]]) -> dict[int, dict[str, float]]:
    """Per round r with a next round: the round's span (open to next open), the clients' part and the rest."""
    out = {}
    for rnd in sorted(times):
        nxt = times.get(rnd + 1)
        if nxt is None or "last_upload" not in times[rnd]:
            continue
        span = nxt["opened"] - times[rnd]["opened"]
        clients = times[rnd]["last_upload"] - times[rnd]["opened"]
        out[rnd] = {"span_s": span, "clients_s": clients, "overhead_s": span - clients}
    return out


async def _histories(address: str, workflow_id: str) -> list[Any]:
    """Every run's history of a workflow id, oldest first (continue-as-new makes several)."""
    from temporalio.client import Client
    from temporalio.contrib.pydantic import pydantic_data_converter

    client = await Client.connect(address, data_converter=pydantic_data_converter)
    runs = []
    async for wf in client.list_workflows(f'WorkflowId = "{workflow_id}"'):
        runs.append((wf.start_time, wf.run_id))
    histories = []
    for _, run_id in sorted(runs):
        histories.append(await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history())
    return histories


def _activity_spans(history: Any) -> list[tuple[str, float, float | None, float | None]]:
    """(activity type, scheduled, started, completed) in epoch seconds, normal and local activities, in order.

    A local activity's marker carries its wall-clock schedule time but no start or completion time
    on that clock (both are ``None``): local activities are timed by the step scheduled after them.
    """
    spans: list[list[Any]] = []
    index: dict[int, int] = {}
    for ev in history.events:
        t = ev.event_time.seconds + ev.event_time.nanos / 1e9
        if ev.HasField("activity_task_scheduled_event_attributes"):
            index[ev.event_id] = len(spans)
            spans.append([ev.activity_task_scheduled_event_attributes.activity_type.name, t, None, None])
        elif ev.HasField("activity_task_started_event_attributes"):
            spans[index[ev.activity_task_started_event_attributes.scheduled_event_id]][2] = t
        elif ev.HasField("activity_task_completed_event_attributes"):
            spans[index[ev.activity_task_completed_event_attributes.scheduled_event_id]][3] = t
        elif ev.HasField("marker_recorded_event_attributes"):
            details = ev.marker_recorded_event_attributes.details
            if "data" not in details or not details["data"].payloads:
                continue
            data = json.loads(details["data"].payloads[0].data)
            name = data.get("activity_type")
            scheduled = data.get("original_schedule_time")
            if name and scheduled:
                spans.append([name, int(scheduled["seconds"]) + int(scheduled.get("nanos", 0)) / 1e9, None, None])
    return [tuple(s) for s in sorted(spans, key=lambda s: s[1])]  # type: ignore[misc]


# The steps of a round in the workflow's order; each phase lasts from its step's schedule time to the next's.
# New runs do a round's heavy work in one activity (process_round); older ones in three.
_HEAVY_STEPS = ("process_round", "validate_updates", "aggregate_round", "evaluate_model")
_STEPS = ("select_clients", "open_round", "close_round", *_HEAVY_STEPS, "complete_round")
# Runs with the bounded-round-v1 patch close a round with close_round_bounded, the same step.
_SAME_STEP = {"close_round_bounded": "close_round"}
_PHASE_OF = {
    "select_clients": "selection",
    "open_round": "open",
    "close_round": "close",
    "process_round": "processing",
    "validate_updates": "validation",
    "aggregate_round": "aggregation",
    "evaluate_model": "evaluation",
    "complete_round": "persistence",
}
# Which phases make up the overhead of round r: its own from the wake-up on, and the next round's start.
# A run has either "processing" or the three phases after it, never both.
OVERHEAD_PHASES = ("wake", "close", "processing", "validation", "aggregation", "evaluation", "persistence")
OVERHEAD_PHASES += ("selection", "open")
HEAVY_PHASES = ("processing", "validation", "aggregation", "evaluation")


def history_phases(
    address: str, workflow_id: str, db_times: dict[int, dict[str, float]]
) -> dict[int, dict[str, float]]:
    """Per round r, seconds of each phase of its overhead (``OVERHEAD_PHASES``), which add up to it.

    From the workflow history, each step is timed from its schedule time to the next step's (so it
    includes the workflow task between them); the database gives when round r opened and its last
    update was accepted. ``wake`` is last upload to close_round scheduled; ``selection`` and ``open``
    are those of round r+1 (they stand between round r's end and round r+1's opening).
    ``<phase>_exec`` is the part inside the activity, known for normal (not local) activities.
    """
    spans = [s for h in asyncio.run(_histories(address, workflow_id)) for s in _activity_spans(h)]
    steps: dict[int, dict[str, tuple[float, float | None, float | None]]] = defaultdict(dict)
    rnd = 0
    for name, t0, t_run, t1 in spans:
        name = _SAME_STEP.get(name, name)
        # A round starts with its selection; a waiting selection after a quick local one is the same round.
        if name == "select_clients" and (rnd == 0 or "open_round" in steps[rnd]):
            rnd += 1
        if name in _STEPS:
            steps[rnd].setdefault(name, (t0, t_run, t1))
    out: dict[int, dict[str, float]] = {}
    for r, st in steps.items():
        if r + 1 not in steps or r not in db_times or "last_upload" not in db_times[r] or r + 1 not in db_times:
            continue
        row: dict[str, float] = {}
        nxt = steps[r + 1]
        row["selection"] = nxt["open_round"][0] - nxt["select_clients"][0]
        row["open"] = db_times[r + 1]["opened"] - nxt["open_round"][0]
        row["wake"] = st["close_round"][0] - db_times[r]["last_upload"]
        heavy = [h for h in _HEAVY_STEPS if h in st]
        order = ["close_round", *heavy, "complete_round"]
        bounds = [st[s][0] for s in order] + [nxt["select_clients"][0]]
        for i, s in enumerate(order):
            row[_PHASE_OF[s]] = bounds[i + 1] - bounds[i]
            _, t_run, t1 = st[s]
            if t_run is not None and t1 is not None:
                row[f"{_PHASE_OF[s]}_exec"] = t1 - t_run
        out[r] = row
    return out


class RssSampler(threading.Thread):
    """Samples the RSS (bytes) of the processes ``pids()`` names, role -> pid, every ``every`` seconds.

    ``samples`` holds ``(seconds since start, {role: rss})``; a process that is gone is left out.
    """

    def __init__(self, pids: Callable[[], dict[str, int]], every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pids, self.every = pids, every
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        started = time.perf_counter()
        while not self._halt.is_set():
            sample = {role: rss for role, pid in self.pids().items() if (rss := memory_bytes(pid)) is not None}
            self.samples.append((time.perf_counter() - started, sample))
            self._halt.wait(self.every)

    def stop(self) -> list[tuple[float, dict[str, int]]]:
        self._halt.set()
        self.join()
        return self.samples


def rss_mb(pid: int) -> float:
    rss = memory_bytes(pid)
    if rss is None:
        raise LookupError(f"no VmRSS for {pid}")
    return rss / 2**20


# -- profiles ------------------------------------------------------------------------------


def start_profiler(pid: int, out: Path, rate: int = 200) -> subprocess.Popen:
    """py-spy sampling ``pid`` (with native-free Python stacks) into a raw collapsed-stack file."""
    exe = Path(sys.executable).parent / "py-spy"
    cmd = [str(exe), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--output", str(out)]
    return subprocess.Popen([*cmd, "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiler(proc: subprocess.Popen) -> None:
    """Stop py-spy with SIGINT, which makes it write its file."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def profile_top(
    path: Path, top: int = 15, ours: tuple[str, ...] = ("activities/", "fedloom_core/", "api/")
) -> list[tuple[str, float]]:
    """Share of all samples spent inside each of the project's functions (inclusive), largest first."""
    if not path.exists():
        return []
    inclusive: dict[str, int] = defaultdict(int)
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        seen = set()
        for frame in stack.split(";"):
            name = frame.split(" (")[0]
            where = frame.rsplit("(", 1)[-1]
            if any(o in where for o in ours):
                key = f"{name} ({where.split(':')[0].rstrip(')')})"
                if key not in seen:
                    seen.add(key)
                    inclusive[key] += n
    if not total:
        return []
    ranked = sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]
    return [(k, v / total) for k, v in ranked]
