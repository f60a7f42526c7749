"""Scale: 10,000 registered clients, 1,000 selected per round, 5 rounds, on SQLite and on PostgreSQL, against a
real ``fedloom serve``.

    .venv/bin/python benchmarks/bench_scale.py [--quick] [--out DIR] [--clients N --selected K --rounds R]

The server is ``fedloom serve`` (embedded Temporal dev server, worker, API) in a temporary data dir,
with rate limits raised so that they do not throttle the benchmark. The clients are light: a few
processes of this script (``--client-worker``), each running hundreds of asyncio clients on one
``httpx.AsyncClient``. Each client registers with the admin key, long-polls for its task, and when
selected downloads the global model and uploads it plus a precomputed perturbation (no training),
so the rounds measure the server alone. Every request's latency is measured client-side, per
endpoint; the server's processes' RSS is sampled from /proc; the round breakdown comes from the
server's own timestamps in its database (read after the run).
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    base_parser,
    machine,
    machine_line,
    median,
    percentile,
    publish,
    pyplot,
    save_figure,
    table,
    write_result,
)
from _control_plane import RssSampler as _Sampler  # noqa: E402
from _control_plane import Server, start_server  # noqa: E402

from fedloom_tools.launch import memory_bytes  # noqa: E402

NAME = "scale"
FULL = {"clients": 10_000, "selected": 1000, "rounds": 5, "procs": 4}
QUICK = {"clients": 40, "selected": 10, "rounds": 2, "procs": 2}
# How long the server holds a task request while there is nothing to do (the runtime's own value).
LONG_POLL_S = 10.0
# Registrations in flight per client process.
REGISTER_CONCURRENCY = 8
ROUND_TIMEOUT_S = 120
# A round of 1,000 takes its uploads over minutes on this machine; the deadline only bounds a failure.
ROUND_TIMEOUT_LARGE_S = 900
MIB = 2**20
EXPERIMENT_ID = "scale"
# The PostgreSQL server the scratch database is created on (trust auth), as the tests use it.
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
_T0 = time.perf_counter()


def say(message: str) -> None:
    """Progress on stderr, with the seconds since the script started."""
    print(f"[bench_scale {time.perf_counter() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


# -- the server ----------------------------------------------------------------------------------


class RssSampler(_Sampler):
    """Samples the RSS of the server's processes (api, worker, temporal) every ``every`` seconds."""

    def __init__(self, server: Server, every: float = 0.5) -> None:
        super().__init__(server.children, every)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per role: RSS at the first sample, the peak, and at the last sample, in MiB."""
        out: dict[str, dict[str, float]] = {}
        for role in ("api", "worker", "temporal"):
            values = [s[role] for _, s in self.samples if role in s]
            if values:
                out[role] = {
                    "start_mib": round(values[0] / MIB, 1),
                    "peak_mib": round(max(values) / MIB, 1),
                    "end_mib": round(values[-1] / MIB, 1),
                }
        return out


# -- the clients (run in --client-worker processes) -------------------------------------------------


@dataclass
class ClientLog:
    """What one client process observed: request latencies and when each client learned of its round."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    # (client_id, round, wall time the 'train' task arrived, wall time the upload was answered)
    rounds: list[tuple[str, int, float, float]] = field(default_factory=list)
    trained: int = 0


async def _timed(log: ClientLog, endpoint: str, request: Awaitable[Any]) -> Any:
    """Await one request and record its latency under ``endpoint``; non-2xx answers are recorded as errors."""
    t0 = time.perf_counter()
    try:
        response = await request
    except Exception as exc:  # noqa: BLE001 - a benchmark records every failure and carries on
        log.errors[endpoint].append(type(exc).__name__)
        return None
    log.latencies[endpoint].append(time.perf_counter() - t0)
    if response.status_code >= 400:
        log.errors[endpoint].append(f"{response.status_code} {response.text[:120]}")
        return None
    return response


def _perturbed(model_bytes: bytes, delta: dict[str, Any], scale: float) -> bytes:
    """The downloaded model plus a precomputed perturbation: a valid update that costs no training."""
    from safetensors.numpy import load, save

    state = load(model_bytes)
    return save({name: (t + scale * delta[name]).astype(t.dtype) for name, t in state.items()})


async def _register(http, log: ClientLog, api: str, admin: str, cid: str, gate: asyncio.Semaphore) -> str | None:  # type: ignore[no-untyped-def]
    body = {"client_id": cid, "client_config": {}, "capabilities": {"compute_power": "cpu"}}
    async with gate:
        r = await _timed(log, "register", http.post(f"{api}/clients/register", json=body, headers=_auth(admin)))
    return r.json()["api_key"] if r is not None else None


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _participate(http, log: ClientLog, api: str, cid: str, key: str, deltas: dict, deadline: float) -> None:  # type: ignore[no-untyped-def]
    """The client protocol: long-poll for a task, and when selected download, perturb and upload."""
    samples = 50 + random.Random(cid).randrange(150)
    scale = 1.0 + random.Random(cid).random()
    while time.monotonic() < deadline:
        r = await _timed(
            log,
            "task (long-poll)",
            http.get(f"{api}/clients/{cid}/task", params={"wait": LONG_POLL_S}, headers=_auth(key)),
        )
        if r is None:
            await asyncio.sleep(1.0)
            continue
        task = r.json()
        # The benchmark's own experiment ended. (Waiting to have seen it running first, as the client
        # runtime does, can wait forever: a short experiment may start and end within one hold.)
        if task["status"] == "done" and task.get("experiment_id") == EXPERIMENT_ID:
            return
        if task["status"] != "train":
            continue
        got_task = time.time()
        dl = await _timed(log, "download", http.get(f"{api}/model/download/{task['model_id']}", headers=_auth(key)))
        if dl is None:
            continue
        if "delta" not in deltas:
            deltas["delta"] = _delta_for(dl.content)
        body = _perturbed(dl.content, deltas["delta"], scale)
        metrics = json.dumps({"data_samples": samples, "local_accuracy": 0.5, "training_time": 0.0})
        up = await _timed(
            log,
            "upload",
            http.post(
                f"{api}/model/update/{cid}",
                files={"model_file": ("model.safetensors", body)},
                data={"metrics": metrics},
                headers=_auth(key),
            ),
        )
        if up is not None:
            log.rounds.append((cid, int(task["round"]), got_task, time.time()))
            log.trained += 1


async def _own_connection(  # type: ignore[no-untyped-def]
    log: ClientLog, api: str, cid: str, key: str, deltas: dict, deadline: float, limits, tls
) -> None:
    """One client on its own ``httpx.AsyncClient``, as a real client process has.

    Hundreds of concurrent long-polls through one shared pool queue inside httpx: measured here,
    250 clients holding 3-s polls through one pool saw a 10.6 s median, through a pool each 3.7 s.
    The clients of a process share one TLS context (``tls``): building one per client (httpx's
    default, loading the CA bundle) took 21 ms each, so a process's 250 clients spent about 5 s of
    CPU starting, and round 1's clients learnt of their round 13 s late while their polls queued.
    """
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits, verify=tls) as http:
        await _participate(http, log, api, cid, key, deltas, deadline)


def _delta_for(model_bytes: bytes) -> dict[str, Any]:
    """A small seeded perturbation with the model's tensor names and shapes, computed once per process."""
    import numpy as np
    from safetensors.numpy import load

    rng = np.random.default_rng(0)
    return {name: (rng.standard_normal(t.shape) * 0.01).astype(t.dtype) for name, t in load(model_bytes).items()}


async def _client_process(args) -> dict:  # type: ignore[no-untyped-def]
    import httpx

    ids = [f"scale-{i:05d}" for i in range(args.first, args.first + args.count)]
    api = f"{args.server}/api/v1"
    log = ClientLog()
    # The server closes idle keep-alive connections after 5 s; reusing one at that moment fails the
    # request, so connections are dropped sooner here.
    limits = httpx.Limits(max_connections=REGISTER_CONCURRENCY + 2, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as http:
        gate = asyncio.Semaphore(REGISTER_CONCURRENCY)
        keys = await asyncio.gather(*(_register(http, log, api, args.admin_key, cid, gate) for cid in ids))
        print(f"registered {sum(k is not None for k in keys)}", flush=True)
        # Wait for "go": the parent measures the idle reference first.
        await asyncio.to_thread(sys.stdin.readline)
        deadline = time.monotonic() + args.max_seconds
        deltas: dict = {}
        joined = [(cid, key) for cid, key in zip(ids, keys, strict=True) if key]
        tls = ssl.create_default_context()
        everyone = asyncio.gather(
            *(_own_connection(log, api, cid, key, deltas, deadline, limits, tls) for cid, key in joined)
        )
        # SIGTERM from the parent (the experiment ended and a client missed it) stops the clients but
        # still reports what they measured.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, everyone.cancel)
        try:
            await everyone
        except asyncio.CancelledError:
            pass
    return {
        "latencies": dict(log.latencies),
        "errors": dict(log.errors),
        "rounds": log.rounds,
        "trained": log.trained,
    }


def client_worker_main(args) -> int:  # type: ignore[no-untyped-def]
    result = asyncio.run(_client_process(args))
    Path(args.result).write_text(json.dumps(result))
    return 0


# -- the run --------------------------------------------------------------------------------------


def spawn_client_processes(server: Server, clients: int, procs: int, work: Path, max_s: float) -> list[tuple]:
    """``procs`` client processes sharing ``clients`` ids; returns (process, result path) pairs."""
    per = -(-clients // procs)
    spawned = []
    for p in range(procs):
        first, count = p * per, min(per, clients - p * per)
        if count <= 0:
            break
        result = work / f"clients-{p}.json"
        cmd = [sys.executable, __file__, "--client-worker", "--server", server.url, "--admin-key", server.admin_key]
        cmd += ["--first", str(first), "--count", str(count), "--result", str(result), "--max-seconds", str(max_s)]
        log = open(work / f"clients-{p}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        spawned.append((proc, result))
    return spawned


def wait_registered(spawned: list[tuple], timeout: float) -> int:
    """Block until every client process has registered its clients; the number registered."""
    total = 0
    deadline = time.monotonic() + timeout
    for proc, _ in spawned:
        line = proc.stdout.readline()
        if not line.startswith("registered") or time.monotonic() > deadline:
            raise RuntimeError(f"a client process failed to register (exit {proc.poll()}): {line!r}")
        total += int(line.split()[1])
    return total


def start_body(clients: int, selected: int, rounds: int, round_timeout: float = ROUND_TIMEOUT_S) -> dict:
    """An MLP experiment on digits sampling ``selected`` of ``clients`` each round, waiting for all of them."""
    return {
        "experiment_config": {
            "experiment_id": EXPERIMENT_ID,
            "rounds": rounds,
            "min_clients": selected,
            "client_fraction": selected / clients,
            "dataset": "digits",
            "model_architecture": "MLP",
            "seed": 0,
            "round_timeout_s": round_timeout,
        },
        "training_config": {"local_epochs": 1, "batch_size": 32, "learning_rate": 0.05},
        "aggregation_config": {"strategy": "FedAvg", "min_updates": selected},
    }


class Probe(threading.Thread):
    """The reference request: an admin ``GET /clients/{id}/task`` without a hold, timed one at a time.

    Measured first with every client registered and idle (the in-run reference), then every
    ``every`` seconds during the experiment, so the ratio shows what the load costs one request.
    """

    def __init__(self, server: Server, client_id: str, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.url = f"{server.url}/api/v1/clients/{client_id}/task"
        self.headers = _auth(server.admin_key)
        self.every = every
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._halt = threading.Event()

    def once(self, http) -> float | None:  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            r = http.get(self.url, headers=self.headers)
        except Exception as exc:  # noqa: BLE001
            self.errors.append(type(exc).__name__)
            return None
        elapsed = time.perf_counter() - t0
        if r.status_code != 200:
            self.errors.append(str(r.status_code))
            return None
        return elapsed

    def reference(self, count: int = 40) -> list[float]:
        import httpx

        with httpx.Client(timeout=60) as http:
            values = [self.once(http) for _ in range(count)]
        return [v for v in values if v is not None]

    def run(self) -> None:
        import httpx

        with httpx.Client(timeout=60) as http:
            while not self._halt.wait(self.every):
                if (elapsed := self.once(http)) is not None:
                    self.latencies.append(elapsed)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def run_experiment(server: Server, body: dict, timeout: float) -> tuple[dict, list[float], float]:
    """Start the experiment and poll its status until it ends; (final status, status latencies, wall seconds)."""
    import httpx

    api, headers = f"{server.url}/api/v1", _auth(server.admin_key)
    latencies: list[float] = []
    with httpx.Client(timeout=60) as http:
        t0 = time.perf_counter()
        r = http.post(f"{api}/training/start", json=body, headers=headers)
        r.raise_for_status()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(1.0)
            s0 = time.perf_counter()
            try:
                status = http.get(f"{api}/training/status", headers=headers).json()
            except httpx.HTTPError as exc:  # a loaded server may miss one poll: the next one tells
                say(f"training/status: {type(exc).__name__}")
                continue
            latencies.append(time.perf_counter() - s0)
            if status.get("status") in ("completed", "failed", "stopped"):
                record = http.get(f"{api}/experiments/{EXPERIMENT_ID}", headers=headers).json()
                status["error"] = record.get("error") or record.get("error_code")
                return status, latencies, time.perf_counter() - t0
    raise RuntimeError(f"the experiment did not end in {timeout:.0f} s")


def _ts(value: str | datetime | None) -> float | None:
    """A naive-UTC timestamp (SQLite hands back text, PostgreSQL a datetime) as Unix seconds."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC).timestamp() if value.tzinfo is None else value.timestamp()


# -- the database (SQLite in the data dir, or a scratch PostgreSQL database) ----------------------


def create_scratch_database(admin_url: str) -> tuple[str, str]:
    """A new empty database on the PostgreSQL server of ``admin_url``; (its name, its SQLAlchemy URL)."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(admin_url)
    name = f"fedloom_bench_scale_{int(time.time())}_{random.randrange(10**6)}"
    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, url.set(database=name).render_as_string(hide_password=False)


def drop_scratch_database(admin_url: str, name: str) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    with psycopg.connect(_libpq(make_url(admin_url)), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _libpq(url) -> str:  # type: ignore[no-untyped-def]
    """A libpq connection string for a SQLAlchemy URL (psycopg's own URL has no driver suffix)."""
    parts = {"host": url.host, "port": url.port, "user": url.username, "password": url.password}
    parts["dbname"] = url.database
    return " ".join(f"{k}={v}" for k, v in parts.items() if v is not None)


class Database:
    """Read-only views of the server's database after (or during) the run, on either backend."""

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        self.url = url
        self.sqlite = url.startswith("sqlite")
        self.engine = create_engine(url, poolclass=NullPool)

    def rows(self, sql: str, **params: Any) -> list[tuple]:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params)]

    def size_bytes(self) -> int:
        """The database's size: SQLite's pages in use (WAL included, as a reader sees them), or
        ``pg_database_size``."""
        if self.sqlite:
            return int(self.rows("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()")[0][0])
        return int(self.rows("SELECT pg_database_size(current_database())")[0][0])

    def table_rows(self) -> dict[str, int]:
        """Rows per table of the tables that grow with clients and rounds."""
        names = ("client", "api_key", "event", "update", "experiment_client", "client_round_score", "client_metrics")
        return {n: int(self.rows(f'SELECT COUNT(*) FROM "{n}"')[0][0]) for n in names}

    def events_between(self, start: float, end: float) -> int:
        """Rows of the event log written between two Unix times."""
        rows = self.rows("SELECT created_at FROM event")
        return sum(1 for (t,) in rows if start <= (_ts(t) or 0.0) <= end)

    def dispose(self) -> None:
        self.engine.dispose()


def server_rounds(db: Database, experiment_id: str) -> list[dict]:
    """Per round, from the server's database: timestamps, update counts, aggregation and evaluation time."""
    rows = db.rows(
        "SELECT r.round, r.status, r.started_at, r.closed_at, r.completed_at, r.selected_clients, "
        "m.round_duration, m.aggregation_time, m.evaluation_time, m.participating_clients "
        "FROM round r LEFT JOIN round_metrics m ON m.experiment_id = r.experiment_id AND m.round = r.round "
        "WHERE r.experiment_id = :e ORDER BY r.round",
        e=experiment_id,
    )
    uploads = defaultdict(list)
    for rnd, received in db.rows(
        "SELECT round, received_at FROM \"update\" WHERE experiment_id = :e AND validation_status = 'accepted'",
        e=experiment_id,
    ):
        uploads[rnd].append(_ts(received))
    started_exp = _ts(db.rows("SELECT started_at FROM experiment WHERE experiment_id = :e", e=experiment_id)[0][0])
    out = []
    for rnd, status, started, closed, completed, selected, duration, agg, ev, participating in rows:
        out.append(
            {
                "round": rnd,
                "status": status,
                "selected": len(json.loads(selected) if isinstance(selected, str) else selected),
                "accepted_updates": participating or 0,
                "opened": _ts(started),
                "closed": _ts(closed),
                "completed": _ts(completed),
                "last_upload": max(uploads[rnd]) if uploads[rnd] else None,
                "round_duration_s": duration,
                "aggregation_s": agg,
                "evaluation_s": ev,
            }
        )
    previous_end = started_exp
    for r in out:
        r["before_open_s"] = r["opened"] - previous_end if previous_end and r["opened"] else None
        previous_end = r["completed"]
    return out


def tree_bytes(path: Path) -> int:
    """Bytes in the files under ``path`` (the blob store)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def breakdown(rounds: list[dict], dispatch: dict[int, list[float]]) -> list[dict]:
    """Where each round's time went, from the server's timestamps (and the clients' receipt of their task)."""
    out = []
    for r in rounds:
        if r["completed"] is None:
            continue
        got = dispatch.get(r["round"], [])
        closed_to_completed = r["completed"] - r["closed"]
        out.append(
            {
                "round": r["round"],
                "select_and_open_s": r["before_open_s"],
                "dispatch_p50_s": median(got) - r["opened"] if got else None,
                "dispatch_max_s": max(got) - r["opened"] if got else None,
                "uploads_s": r["last_upload"] - r["opened"],
                "close_s": r["closed"] - r["last_upload"],
                "validate_aggregate_evaluate_persist_s": closed_to_completed,
                "aggregation_s": r["aggregation_s"],
                "evaluation_s": r["evaluation_s"],
                "total_s": r["completed"] - r["opened"] + (r["before_open_s"] or 0.0),
            }
        )
    return out


def latency_table(latencies: dict[str, list[float]], errors: dict[str, list[str]]) -> dict[str, dict]:
    out = {}
    for endpoint in sorted(set(latencies) | set(errors)):
        values = latencies.get(endpoint, [])
        out[endpoint] = {
            "count": len(values),
            "errors": len(errors.get(endpoint, [])),
            "p50_ms": round(percentile(values, 50) * 1000, 1) if values else None,
            "p99_ms": round(percentile(values, 99) * 1000, 1) if values else None,
            "max_ms": round(max(values) * 1000, 1) if values else None,
            "error_samples": sorted(set(errors.get(endpoint, [])))[:5],
        }
    return out


def run(clients: int, selected: int, rounds: int, procs: int, work: Path, database_url: str | None = None) -> dict:
    """One full benchmark run in ``work`` (on ``database_url``, else SQLite in the data dir)."""
    data = work / "data"
    url = database_url or f"sqlite:///{data / 'fedloom.db'}"
    server = start_server(data, {"FEDLOOM_DATABASE_URL": database_url} if database_url else None)
    say(f"serve is healthy at {server.url} ({url.split(':', 1)[0]})")
    db = Database(url)
    sampler = RssSampler(server)
    sampler.start()
    spawned: list[tuple] = []
    round_timeout = ROUND_TIMEOUT_S if selected <= 100 else ROUND_TIMEOUT_LARGE_S
    try:
        size_empty = db.size_bytes()
        max_s = 60 + rounds * (round_timeout + 60)
        t_reg = time.perf_counter()
        spawned = spawn_client_processes(server, clients, procs, work, max_s)
        registered = wait_registered(spawned, timeout=1800)
        registration_s = time.perf_counter() - t_reg
        say(f"{registered} clients registered in {registration_s:.1f} s")
        size_registered = db.size_bytes()
        probe = Probe(server, "scale-00000")
        reference = probe.reference()
        say(f"idle reference: task (no hold) p50 {median(reference) * 1000:.1f} ms")
        for proc, _ in spawned:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        probe.start()
        rss_registered = {role: memory_bytes(pid) for role, pid in server.children().items()}
        started = time.time()
        try:
            body = start_body(clients, selected, rounds, round_timeout)
            status, status_lat, wall = run_experiment(server, body, max_s)
        finally:
            probe.stop()
        ended = time.time()
        say(f"experiment {status.get('status')} after {wall:.1f} s {status.get('error') or ''}")
        results = []
        for proc, path in spawned:
            try:
                proc.wait(timeout=LONG_POLL_S * 3 + 30)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait(timeout=30)
            results.append(json.loads(path.read_text()))
    finally:
        try:
            for proc, _ in spawned:
                if proc.poll() is None:
                    proc.kill()
            sampler.stop()
        finally:
            server.stop()
            say("serve stopped")
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, list[str]] = defaultdict(list)
    dispatch: dict[int, list[float]] = defaultdict(list)
    for res in results:
        for endpoint, values in res["latencies"].items():
            latencies[endpoint] += values
        for endpoint, values in res["errors"].items():
            errors[endpoint] += values
        for _cid, rnd, got, _done in res["rounds"]:
            dispatch[rnd].append(got)
    # Every client request made while the experiment ran (registrations came before it).
    requests = sum(len(v) for k, v in latencies.items() if k != "register")
    latencies["training/status (admin)"] = status_lat
    latencies["task, no hold (admin probe)"] = probe.latencies
    errors["task, no hold (admin probe)"] = probe.errors
    try:
        per_round = server_rounds(db, EXPERIMENT_ID)
        storage = {
            "db_empty_bytes": size_empty,
            "db_registered_bytes": size_registered,
            "db_end_bytes": db.size_bytes(),
            "blob_bytes": tree_bytes(data / "blobs"),
            # What the clients' updates took in the blob store before retention removed them.
            "update_bytes": int(db.rows('SELECT COALESCE(SUM(size_bytes), 0) FROM "update"')[0][0]),
            "rows": db.table_rows(),
        }
        events = db.events_between(started, ended)
    finally:
        db.dispose()
    return {
        "backend": "sqlite" if url.startswith("sqlite") else "postgresql",
        "workload": {"clients": clients, "selected": selected, "rounds": rounds, "client_processes": procs},
        "round_timeout_s": round_timeout,
        "registered": registered,
        "registration_s": round(registration_s, 2),
        "experiment_status": status.get("status"),
        "experiment_error": status.get("error"),
        "wall_s": round(wall, 2),
        "rounds_completed": sum(1 for r in per_round if r["status"] == "completed"),
        "updates_per_round": [r["accepted_updates"] for r in per_round],
        "all_rounds_complete": len(per_round) == rounds
        and all(r["status"] == "completed" and r["accepted_updates"] == selected for r in per_round),
        "round_time_s": [round(b["total_s"], 3) for b in breakdown(per_round, dispatch)],
        "breakdown": breakdown(per_round, dispatch),
        "latency": latency_table(latencies, errors),
        "storage": storage,
        "events": events,
        "events_per_s": round(events / wall, 2) if wall else None,
        "requests_per_s": round(requests / wall, 1) if wall else None,
        "reference": {
            "request": "GET /clients/{id}/task without a hold (admin), one at a time",
            "idle_p50_ms": round(median(reference) * 1000, 2),
            "idle_p99_ms": round(percentile(reference, 99) * 1000, 2),
            "loaded_p50_ms": round(median(probe.latencies) * 1000, 2) if probe.latencies else None,
            "loaded_p99_ms": round(percentile(probe.latencies, 99) * 1000, 2) if probe.latencies else None,
        },
        "rss": sampler.summary(),
        "rss_after_registration_mib": {k: round(v / MIB, 1) for k, v in rss_registered.items() if v},
        "rss_series": [(round(t, 2), {k: round(v / MIB, 1) for k, v in s.items()}) for t, s in sampler.samples],
    }


# -- report ---------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


PHASES = {
    "select_and_open_s": "selection and opening (from the previous round's end)",
    "uploads_s": "telling the clients and taking their downloads and uploads",
    "close_s": "closing after the last upload",
    "validate_aggregate_evaluate_persist_s": "validation, aggregation, evaluation and persistence",
}

CHANGES = """What the profiles showed at 10,000 clients, and what was changed (py-spy on the API during
runs of this benchmark):

1. **Every task poll looked its key up in the database.** Resolved keys were trusted for 5 s, and a
   client polls every 10 s, so each poll was a lookup (about 1,000 a second at this size; 15-21% of
   the API's samples in `resolve_key`). Keys past the 5 s are now re-checked all at once, one
   indexed query per 500 cached keys shared by every request waiting on it (`api/deps.py`); a key
   revoked elsewhere still stops working within the 5 s.
2. **last_seen was a write transaction per client.** Written at most once a minute per client,
   that is still about 170 write transactions a second at 10,000 clients; a run at this size
   before the change had all 40 API threads waiting for SQLite's writer in `_mark_seen`, and round 1 had no
   upload after 8 minutes. The marks are now queued and written together once a second, one
   `UPDATE` per 500 clients (`api/taskboard.py`).
3. **Every client's first poll ran the whole task query** (25-41% of the API's samples in
   `read_task` while the round was open; with the two changes above, round 1 had 540 of its 1,000
   uploads 3.5 minutes after opening). A client polling with its own key is registered, so when the
   shared round state says it is not selected and not inactive, its first poll is answered from that
   state without a query and its last_seen is queued.
4. **Selection loaded every registered client as an ORM object**: 0.6-1.0 s for 10,000 here, now
   only the columns it uses as rows, 0.24 s (`fedloom_core/storage/candidates.py`).
5. **Every held long-poll woke every 0.25 s** to compare its answer with the shared round state,
   though the state's reader already wakes every waiter when the state changes: 10,000 held
   requests made 40,000 wake-ups a second on the API's event loop. A held request now sleeps until
   a change or the end of its hold (`api/taskboard.py`).
6. **Key re-checks queued behind the requests**: the re-check's query waited for one of the API's
   40 threads, behind the queued requests; when it took longer than the 5-s TTL every key was stale
   again and each request went back to a lookup of its own (`resolve_key` was still 11% of the API's
   samples in round 4). It now runs on asyncio's own executor, starts in the background once the
   last one is half a TTL old, and requests that waited for one do not run another.
7. **The shared round state went stale at the start of a round.** Its read waited for one of the
   API's threads behind the first polls' task queries; a stale state cannot answer a poll, so every
   poll went to the database, which kept the state stale (`read_task` was 56% of the API's samples
   in round 1 on PostgreSQL). It is now read on asyncio's own executor.

What is left in the way at this size: the API is one Python process, and with 10,000 clients
holding 10-s polls it is CPU-bound (see the long-poll and download latencies above: requests queue
for tens of seconds, and some kept-alive connections are dropped under that load, which the clients
retry). The round's time is that queue, not the database or the workflow.

Earlier changes, at 1,000 clients:

1. **The task long-poll re-ran its whole query for every held request every 0.25 s.** With 1,000
   clients holding requests, most of the API's samples were in that query, and about a third in
   decoding the open round's `policy_results` and `exclusions` JSON (an entry per registered
   client) that a task never needs; the first run at this size failed (round 1 closed at its
   deadline without all its updates). Now one light read of the round state per interval serves
   every held request of an API process (`TaskBoard` in `api/taskboard.py`), a held request
   re-runs its own query only when that state changed in a way that concerns it (a change such as
   an experiment starting would otherwise send every waiter to the database at once), and the
   task, upload and training-status queries leave the two per-client JSON columns unloaded
   (`fedloom_core/storage/repo.py`).
2. **Every poll was a SQLite write**: `last_seen` was refreshed every 5 s, i.e. on every 10-s poll
   (about 100 write transactions a second at this size, each an ORM load and flush). It is now a
   two-column read and a conditional `UPDATE` at most once a minute (nothing reads `last_seen`
   more finely), and a long-poll that the shared state can answer (client known, not inactive, not
   selected) starts without a database session at all.
3. **Every request looked its API key up in the database** in a worker thread; resolved keys are
   now kept for 10 s per API process (`api/deps.py`; unknown keys are still refused at once).
4. **SQLite's pool was smaller than the API's thread pool** (15 connections for 40 threads), so
   threads queued for a connection while WAL readers could have run: the pool now matches
   (`fedloom_core/storage/db.py`).
5. **Evaluation in the worker was slowed by OpenMP spin-waiting** on cores shared with the API and
   Temporal: the leave-one-out contribution scores (one evaluation per update, 100 a round) took
   tens of seconds a round on the busy machine; `fedloom serve` now starts its children with
   `OMP_WAIT_POLICY=PASSIVE` (unless set), which made one small evaluation about 15x faster there.
6. **Round 1 was the benchmark's own start-up.** Its selected clients learnt of it a median 12.9 s
   late while later rounds took 0.2 s. py-spy on the API during round 1 showed it mostly idle; the
   clients were still starting: httpx builds a TLS context (loading the CA bundle) for every
   `AsyncClient`, 21 ms each, so a process's 250 clients spent about 5 s of CPU before their first
   poll. The clients of a process now share one context (each still has its own connection pool),
   and round 1's median fell to 2.3 s in the first run after the change: what is left is 1,000
   first polls reaching the API in the same second as the experiment's start.
7. **Concurrent writes waited in SQLite's busy handler**, which sleeps 1, 2, 5, 10 ms... between
   tries, so with hundreds of registrations or uploads at once a few writers lost many rounds of
   that backoff. The write transactions of one process now take turns on a lock per database file
   (`fedloom_core/storage/db.py`); in one run each before and after, registration p99 went from 983 to
   269 ms and upload p99 from 3.2 to 2.3 s."""


def _largest_phase(result: dict) -> tuple[str, float, float]:
    """The phase with the largest median share of the round time: (name, median seconds, share)."""
    shares = {}
    for key in PHASES:
        values = [b[key] for b in result["breakdown"] if b[key] is not None]
        if values:
            shares[key] = median(values)
    total = median([b["total_s"] for b in result["breakdown"]])
    key = max(shares, key=lambda k: shares[k])
    return PHASES[key], shares[key], shares[key] / total if total else 0.0


def _summary(runs: list[dict]) -> str:
    """One column per backend: the figures the issue asks for."""

    def lat(r: dict, ep: str, q: str) -> str:
        return _fmt(r["latency"].get(ep, {}).get(q), 1)

    def rss(r: dict, role: str) -> str:
        return _fmt(r["rss"].get(role, {}).get("peak_mib"), 0)

    def mib(n: float) -> str:
        return f"{n / MIB:,.1f}"

    rows: list[list[str]] = []

    def add(label: str, fn) -> None:  # type: ignore[no-untyped-def]
        rows.append([label, *(fn(r) for r in runs)])

    add("every round complete (all updates aggregated)", lambda r: "yes" if r["all_rounds_complete"] else "**NO**")
    add("accepted updates per round", lambda r: ", ".join(str(n) for n in r["updates_per_round"]) or "-")
    add("registration of all clients, s", lambda r: f"{r['registration_s']:.1f}")
    add("registrations per s", lambda r: f"{r['registered'] / r['registration_s']:.0f}")
    add("registration p50 / p99 ms", lambda r: f"{lat(r, 'register', 'p50_ms')} / {lat(r, 'register', 'p99_ms')}")
    add("upload p50 / p99 ms", lambda r: f"{lat(r, 'upload', 'p50_ms')} / {lat(r, 'upload', 'p99_ms')}")
    add("download p50 / p99 ms", lambda r: f"{lat(r, 'download', 'p50_ms')} / {lat(r, 'download', 'p99_ms')}")
    add("round time median (min-max) s", _round_times)
    add("selection + opening median s", lambda r: _fmt(_phase(r, "select_and_open_s"), 1))
    add("API RSS peak MiB", lambda r: rss(r, "api"))
    add("worker RSS peak MiB", lambda r: rss(r, "worker"))
    add("Temporal RSS peak MiB", lambda r: rss(r, "temporal"))
    add(
        "database empty / registered / end MiB",
        lambda r: " / ".join(mib(r["storage"][k]) for k in ("db_empty_bytes", "db_registered_bytes", "db_end_bytes")),
    )
    add(
        "updates stored / blob store at end MiB",
        lambda r: f"{mib(r['storage']['update_bytes'])} / {mib(r['storage']['blob_bytes'])}",
    )
    add("events logged per s (experiment)", lambda r: _fmt(r["events_per_s"], 1))
    add("client requests per s (experiment)", lambda r: _fmt(r["requests_per_s"], 0))
    add("experiment wall time s", lambda r: f"{r['wall_s']:.0f}")
    return table(["", *(r["backend"] for r in runs)], rows)


def _round_times(r: dict) -> str:
    t = r["round_time_s"]
    return f"{median(t):.1f} ({min(t):.1f}-{max(t):.1f})" if t else "-"


def _phase(r: dict, key: str) -> float | None:
    values = [b[key] for b in r["breakdown"] if b[key] is not None]
    return median(values) if values else None


def per_client_costs(r: dict) -> dict[str, float]:
    """What one client, one round and one update cost on this backend, from the measurements."""
    st, w = r["storage"], r["workload"]
    updates = max(1, sum(r["updates_per_round"]))
    return {
        "registration_ms": r["registration_s"] / max(1, r["registered"]) * 1000,
        "db_bytes_per_client": (st["db_registered_bytes"] - st["db_empty_bytes"]) / max(1, r["registered"]),
        "db_bytes_per_update": (st["db_end_bytes"] - st["db_registered_bytes"]) / updates,
        "blob_bytes_per_update": st["update_bytes"] / updates,
        "selection_ms_per_client": (_phase(r, "select_and_open_s") or 0.0) / w["clients"] * 1000,
        "upload_window_ms_per_update": (_phase(r, "uploads_s") or 0.0) / w["selected"] * 1000,
    }


def projection(runs: list[dict], target: int = 100_000, selected: int = 10_000) -> str:
    """Linear projection of each backend's measured per-client costs to ``target`` clients."""
    rows = []
    for r in runs:
        c = per_client_costs(r)
        rows.append(
            [
                r["backend"],
                f"{c['registration_ms']:.1f} ms → {c['registration_ms'] * target / 1000 / 60:.0f} min",
                f"{c['db_bytes_per_client'] / 1024:.1f} KiB → {c['db_bytes_per_client'] * target / MIB:,.0f} MiB",
                f"{c['db_bytes_per_update'] / 1024:.1f} KiB → {c['db_bytes_per_update'] * selected / MIB:,.0f} MiB",
                f"{c['blob_bytes_per_update'] / 1024:.1f} KiB → {c['blob_bytes_per_update'] * selected / MIB:,.0f} MiB",
                f"{c['selection_ms_per_client'] * 1000:.0f} µs → {c['selection_ms_per_client'] * target / 1000:.1f} s",
                f"{(up := c['upload_window_ms_per_update']):.0f} ms → {up * selected / 1000:,.0f} s",
                f"{target / LONG_POLL_S:,.0f}",
            ]
        )
    headers = [
        "backend",
        "registration per client → all",
        "database per client → all",
        f"database per update → per round of {selected:,}",
        f"blobs per update → per round of {selected:,}",
        "selection+opening per registered client → per round",
        f"upload window per update → {selected:,}",
        f"task polls per s at {LONG_POLL_S:g} s holds",
    ]
    return table(headers, rows)


def limits(runs: list[dict], target: int = 100_000, selected: int = 10_000) -> str:
    """What the measurements say about 100,000 clients: the request load against what one API process
    served, and the write load against what each backend's writers took (its registration rate)."""
    by = {r["backend"]: r for r in runs}
    polls = target / LONG_POLL_S
    lines = []
    for name, r in by.items():
        served = r["requests_per_s"] or 0.0
        writes = r["registered"] / r["registration_s"]
        need = polls / served if served else float("inf")
        lines.append(
            f"- **{name}**: one API process served {served:,.0f} client requests a second during the run, "
            f"while {r['workload']['clients']:,} clients at {LONG_POLL_S:g}-s holds ask for up to "
            f"{r['workload']['clients'] / LONG_POLL_S:,.0f}; {target:,} clients would ask for {polls:,.0f}, "
            f"about {need:,.0f} such processes. Registrations (three rows each, one transaction) ran at "
            f"{writes:,.0f} a second: {target:,} take {target / writes / 60:,.0f} min, and a round's "
            f"{selected:,} upload transactions at that rate take {selected / writes:,.0f} s of writing."
        )
    return "\n".join(lines)


def where_sqlite_stops(runs: list[dict], target: int = 100_000, selected: int = 10_000) -> str:
    """The reasoning on the two backends, with this run's numbers."""
    by = {r["backend"]: r for r in runs}
    sizes = ", ".join(
        f"{n}: {per_client_costs(r)['db_bytes_per_client'] * target / MIB:,.0f} MiB for {target:,} clients and "
        f"{per_client_costs(r)['db_bytes_per_update'] * selected / MIB:,.0f} MiB of rows per round of {selected:,}"
        for n, r in by.items()
    )
    rates = ", ".join(f"{n} {r['registered'] / r['registration_s']:,.0f} a second" for n, r in by.items())
    served = max((r["requests_per_s"] or 0.0) for r in runs)
    per_process = served * LONG_POLL_S
    upload_bound = [n for n, r in by.items() if r["breakdown"] and _largest_phase(r)[0] == PHASES["uploads_s"]]
    bound = (
        f"In these runs the API was the bottleneck on {' and '.join(upload_bound)}: the selected clients' "
        'downloads and uploads queued behind the polls, so a round\'s time is its "all uploads in" column, '
        "not the database."
        if upload_bound
        else "In these runs the uploads were not the largest part of a round."
    )
    first = runs[0]
    carried = (
        f"SQLite carries the {first['workload']['clients']:,} clients measured here with one API process"
        if by.get("sqlite", {}).get("all_rounds_complete")
        else "SQLite did not carry every round here"
    )
    return f"""### Where the embedded SQLite stops and PostgreSQL takes over

The database's size is not the limit on either backend ({sizes}). Two things are:

1. **Requests.** Every registered client long-polls whether or not it is selected, so the request
   rate grows with the registered clients ({LONG_POLL_S:g}-s holds: one request per client per
   {LONG_POLL_S:g} s). {bound} At the pace measured here (at most {served:,.0f} client requests a
   second) one API process serves about {per_process:,.0f} clients without queueing their polls;
   more clients need more API processes. SQLite is one file on one host: API processes on that host can share it
   (WAL lets readers run side by side, and the rate limiter and key cache already work across
   processes through the database), but API replicas on other hosts cannot. So SQLite stops where one
   host's API processes no longer serve the polls; past that it is PostgreSQL, with API replicas on
   several hosts.
2. **Writes.** SQLite takes one writer at a time across every process. Registrations ran at
   {rates} here (one API process each, so this is the API's pace as much as the database's). A
   round's uploads, the batched last_seen writes and the round's records all go through SQLite's one
   writer; PostgreSQL takes them side by side, so several API processes add write capacity there and
   not on SQLite.

On this machine, then: {carried}; {target:,} clients need the request capacity of several API
processes, and once those no longer fit on one host, PostgreSQL."""


def _detail(r: dict) -> str:
    """One backend's round breakdown, latencies and RSS."""
    rows = [
        [
            b["round"],
            _fmt(b["total_s"]),
            _fmt(b["select_and_open_s"]),
            _fmt(b["dispatch_p50_s"]),
            _fmt(b["dispatch_max_s"]),
            _fmt(b["uploads_s"]),
            _fmt(b["close_s"]),
            _fmt(b["validate_aggregate_evaluate_persist_s"]),
            _fmt(b["aggregation_s"]),
            _fmt(b["evaluation_s"]),
        ]
        for b in r["breakdown"]
    ]
    headers = ["round", "round s", "select+open s", "told p50 s", "told max s", "all uploads in s"]
    headers += ["last upload→closed s", "closed→completed s", "of which aggregation s", "evaluation s"]
    lat_rows = [
        [ep, v["count"], v["errors"], _fmt(v["p50_ms"], 1), _fmt(v["p99_ms"], 1), _fmt(v["max_ms"], 1)]
        for ep, v in r["latency"].items()
    ]
    rss_rows = [
        [
            role,
            _fmt(v["start_mib"], 1),
            _fmt(r["rss_after_registration_mib"].get(role), 1),
            _fmt(v["peak_mib"], 1),
            _fmt(v["end_mib"], 1),
        ]
        for role, v in r["rss"].items()
    ]
    ref = r["reference"]
    outcome = "" if not r.get("experiment_error") else f" The experiment failed: {r['experiment_error']}."
    largest = ""
    if r["breakdown"]:
        phase, seconds, share = _largest_phase(r)
        largest = f" The largest part of a round is {phase}: median {seconds:.1f} s, {share:.0%} of the median round."
    rows_md = ", ".join(f"{k} {v:,}" for k, v in r["storage"]["rows"].items())
    return f"""### {r["backend"]}

Experiment `{r["experiment_status"]}` after {r["wall_s"]:.0f} s.{outcome}{largest} Per round, in seconds
("select+open" runs from the previous round's completion, or the start, to this round's opening; "told"
is when the selected clients received their `train` task, from the opening):

{table(headers, rows)}

Reference request (one admin `GET /clients/{{id}}/task` without a hold): idle p50 {ref["idle_p50_ms"]:.1f} ms,
during the run p50 {_fmt(ref["loaded_p50_ms"], 1)} ms, p99 {_fmt(ref["loaded_p99_ms"], 1)} ms. Rows at the end:
{rows_md}.

{table(["endpoint", "requests", "errors", "p50 ms", "p99 ms", "max ms"], lat_rows)}

{table(["process", "at start MiB", "after registration MiB", "peak MiB", "at end MiB"], rss_rows)}
"""


def _measured(res: dict) -> str:
    """Which code the numbers are from, and which of the changes below came after it, when recorded."""
    if not res.get("commit"):
        return ""
    later = f" {res['later']}" if res.get("later") else ""
    return f"Measured on commit `{res['commit']}`.{later}\n\n"


def section(res: dict, info: dict, image: str) -> str:
    """The Markdown section: workload, the two backends side by side, projection, details, changes."""
    runs = res["runs"]
    w = runs[0]["workload"]
    verdict = "met" if all(r["all_rounds_complete"] for r in runs) else "NOT met"
    measured = " and ".join(r["backend"] for r in runs) + ("" if len(runs) > 1 else " (the one backend measured)")
    return f"""## Scale: {w["clients"]:,} clients, {w["selected"]:,} selected per round

Workload: `fedloom serve` (embedded Temporal dev server, one worker, one API process, blobs in a
directory) in a fresh data dir, once on the embedded SQLite and once on PostgreSQL (a scratch
database created for the run on the local server and dropped after it). {w["clients"]:,} clients
register with the admin key, run as asyncio tasks, each on its own `httpx.AsyncClient`, in
{w["client_processes"]} client processes on the same machine. Each round selects {w["selected"]:,} of them
(`client_fraction` {w["selected"] / w["clients"]:g}, `min_updates` {w["selected"]:,}), for {w["rounds"]} rounds of
FedAvg on the digits MLP. A client long-polls `GET /clients/{{id}}/task?wait={LONG_POLL_S:g}` (the client
runtime's value); when selected it downloads the global model and uploads it plus a precomputed
perturbation (no training), so the rounds measure the server. Rate limits are raised for the run.
Latency is measured by the clients; RSS is sampled from `/proc` every 0.5 s (the PostgreSQL server's
own processes are not counted); the database size is SQLite's pages in use (its WAL included), or
`pg_database_size`; "events" are rows of the server's event log written while the experiment ran.
Retention is at its default, which deletes a round's updates once its model is committed, so the
blob store at the end holds the global models; "updates stored" is what the updates took before.

Machine: {machine_line(info)}. The machine is shared (2 cores, other jobs running), so every absolute
number here moves with the load of the moment.

{_measured(res)}**Target: every round completes with all {w["selected"]:,} updates, on {measured}: {verdict}.**

{_summary(runs)}

### Projection to 100,000 clients

Each backend's measured cost per registered client, per round and per update, multiplied out to
100,000 registered clients with 10,000 selected a round (linear: the selection reads every
registered client, a round's writes grow with its updates):

{projection(runs)}

{limits(runs)}

{where_sqlite_stops(runs)}

{"".join(_detail(r) + chr(10) for r in runs)}
{CHANGES}

![scale]({image})
"""


def plot(res: dict, path: Path) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in res["runs"]:
        xs = [b["round"] for b in r["breakdown"]]
        ax1.plot(xs, [b["total_s"] for b in r["breakdown"]], marker="o", label=r["backend"])
        for role in ("api", "worker"):
            series = [(t, s[role]) for t, s in r["rss_series"] if role in s]
            if series:
                ax2.plot([t for t, _ in series], [v for _, v in series], label=f"{r['backend']} {role}")
    ax1.set_xlabel("round")
    ax1.set_ylabel("seconds")
    ax1.set_title("round time")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("seconds since serve started")
    ax2.set_ylabel("RSS MiB")
    ax2.set_title("server RSS")
    ax2.legend(fontsize=7)
    save_figure(fig, path)


def run_backend(backend: str, sizes: dict, pg_url: str) -> dict:
    """One run on ``backend``; PostgreSQL gets a scratch database that is dropped afterwards."""
    say(f"--- {backend} ---")
    with tempfile.TemporaryDirectory(prefix="fedloom-bench-scale-") as tmp:
        args = (sizes["clients"], sizes["selected"], sizes["rounds"], sizes["procs"], Path(tmp))
        if backend == "sqlite":
            return run(*args)
        name, url = create_scratch_database(pg_url)
        try:
            return run(*args, database_url=url)
        finally:
            drop_scratch_database(pg_url, name)


def main() -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--clients", type=int)
    parser.add_argument("--selected", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--procs", type=int, help="client processes")
    parser.add_argument("--backends", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    parser.add_argument("--pg-url", default=PG_URL, help="a PostgreSQL server database to create the scratch one from")
    # Internal: run as one client process.
    parser.add_argument("--client-worker", action="store_true", help=argparse_hidden())
    parser.add_argument("--server", help=argparse_hidden())
    parser.add_argument("--admin-key", help=argparse_hidden())
    parser.add_argument("--first", type=int, help=argparse_hidden())
    parser.add_argument("--count", type=int, help=argparse_hidden())
    parser.add_argument("--result", help=argparse_hidden())
    parser.add_argument("--max-seconds", type=float, default=900.0, help=argparse_hidden())
    args = parser.parse_args()
    if args.client_worker:
        return client_worker_main(args)
    # SIGTERM unwinds like an error, so the server, its clients and a scratch database are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = dict(QUICK if args.quick else FULL)
    for key in sizes:
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    runs = []
    for backend in (b.strip() for b in args.backends.split(",") if b.strip()):
        runs.append(run_backend(backend, sizes, args.pg_url))
        write_result(args.out, f"{NAME}-{backend}", {"quick": args.quick, **runs[-1]})  # kept if a later one fails
    res = {"quick": args.quick, "commit": _commit(), "runs": runs}
    publish(args, NAME, res, plot, lambda info, image: section(res, info, image))
    print(section(res, machine(), f"img/bench_{NAME}.png"))
    return 0 if all(r["all_rounds_complete"] for r in runs) else 1


def _commit() -> str | None:
    """The checkout's commit (with ``+`` when it has local changes), or None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True)
    except OSError:
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
