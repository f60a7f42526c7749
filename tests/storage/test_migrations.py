"""Alembic migrations: the migrated schema is the models' schema, and a pre-migrations database upgrades.

The half-run fixtures were made by ``fixtures/make_half_run.py`` with the code of commit 17210a3, from
before migrations: a 4-round digits experiment stopped with round 2 completed and round 3 held by a
round_control rule until a fourth client registers. Each holds the data dir (database or its pg_dump,
blobs, Temporal's SQLite file, admin key).

PostgreSQL: ``FEDLOOM_TEST_POSTGRES_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``)
names the server; each test works in a scratch database of its own, dropped afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import NullPool
from sqlmodel import SQLModel, select

from fedloom_core.storage import migrations
from fedloom_core.storage.db import Experiment, GlobalModel, Round, RoundMetrics, create_schema, make_engine
from fedloom_core.storage.repo import session_scope
from tests.conftest import spawn_clients, start_serve, stop_serve

FIXTURES = Path(__file__).parent / "fixtures"
PG_URL_ENV = "FEDLOOM_TEST_POSTGRES_URL"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
EXPERIMENT_ID, ROUNDS = "half-run", 4
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def _pg_server() -> URL:
    """The test server's URL; skips (fails under CI) when it cannot be reached."""
    url = make_url(os.environ.get(PG_URL_ENV) or DEFAULT_PG_URL)
    probe = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
    try:
        with probe.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        message = f"PostgreSQL not reachable at {url.render_as_string()} ({type(exc).__name__}); set {PG_URL_ENV}"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    finally:
        probe.dispose()
    return url


def _admin(server: URL, statement: str) -> None:
    """Run a statement outside a transaction (CREATE/DROP DATABASE) on the server's own database."""
    admin = create_engine(server, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(statement))
    finally:
        admin.dispose()


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database: a SQLite file where serve keeps it, or a scratch PostgreSQL database."""
    if request.param == "sqlite":
        (tmp_path / "data").mkdir()
        yield f"sqlite:///{tmp_path / 'data' / 'fedloom.db'}"
        return
    server = _pg_server()
    name = f"fedloom_migrations_{uuid.uuid4().hex[:12]}"
    _admin(server, f'CREATE DATABASE "{name}"')
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        _admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _revision(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())


def _unpack(backend: str, tmp_path: Path) -> Path:
    with tarfile.open(FIXTURES / f"half_run_{backend}.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path / "data"


def _restore(dump: Path, url: str) -> None:
    """Load a pg_dump (plain SQL) into the database at ``url`` with psql."""
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed")
    target = make_url(url)
    args = [psql, "-q", "-v", "ON_ERROR_STOP=1", "-h", target.host or "127.0.0.1", "-p", str(target.port or 5432)]
    args += ["-U", target.username or "postgres", "-d", target.database or "", "-f", str(dump)]
    env = {**os.environ, **({"PGPASSWORD": target.password} if target.password else {})}
    subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL)


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_migrations_give_the_models_schema(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        create_schema(engine)
        create_schema(engine)  # a second start-up finds it at head
        assert _revision(engine) == [migrations.head()]
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diffs = compare_metadata(context, SQLModel.metadata)
        assert diffs == []
    finally:
        engine.dispose()


def test_pre_migration_database_is_stamped_then_upgraded(tmp_path: Path) -> None:
    data_dir = _unpack("sqlite", tmp_path)
    engine = make_engine(f"sqlite:///{data_dir / 'fedloom.db'}")
    try:
        assert "alembic_version" not in inspect(engine).get_table_names()
        create_schema(engine)
        assert _revision(engine) == [migrations.head()]
        with session_scope(engine) as s:
            exp = s.get(Experiment, EXPERIMENT_ID)
            rounds = s.exec(select(RoundMetrics.round).where(RoundMetrics.experiment_id == EXPERIMENT_ID)).all()
        assert exp is not None and exp.status == "running"
        assert sorted(rounds) == [1, 2]
    finally:
        engine.dispose()


@pytest.mark.e2e
@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_half_run_experiment_finishes_after_upgrade(database_url: str, tmp_path: Path) -> None:
    backend = make_url(database_url).get_backend_name()
    data_dir = _unpack(backend, tmp_path)
    env_extra = {}
    if backend == "postgresql":
        _restore(tmp_path / "fedloom.sql", database_url)
        env_extra["FEDLOOM_DATABASE_URL"] = database_url
    server = start_serve(data_dir, env_extra)
    clients: list[subprocess.Popen] = []
    engine = make_engine(database_url)
    try:
        assert _revision(engine) == [migrations.head()]
        http = httpx.Client(base_url=server.api, headers=server.headers(), timeout=30)
        status = http.get("/training/status").json()
        assert status["experiment_id"] == EXPERIMENT_ID and status["status"] == "running", status
        assert status["current_round"] == 2, status

        # The fixture's rule holds round 3 until a fourth client registers.
        clients = spawn_clients(server, 4, tmp_path)
        deadline = time.monotonic() + 240
        while (status := http.get("/training/status").json())["status"] == "running":
            assert time.monotonic() < deadline, f"the experiment did not finish: {status}; logs in {tmp_path}"
            time.sleep(0.5)
        assert status["status"] == "completed", status
        assert status["current_round"] == ROUNDS and status["progress"] == 1.0, status
        http.close()

        with session_scope(engine) as s:
            metrics = s.exec(select(RoundMetrics).where(RoundMetrics.experiment_id == EXPERIMENT_ID)).all()
            rounds = s.exec(select(Round).where(Round.experiment_id == EXPERIMENT_ID)).all()
            exp = s.get(Experiment, EXPERIMENT_ID)
            final = s.get(GlobalModel, f"model_{EXPERIMENT_ID}_round_{ROUNDS}")
        assert sorted(m.round for m in metrics) == list(range(1, ROUNDS + 1))
        assert [len(r.selected_clients) for r in sorted(rounds, key=lambda r: r.round)] == [3, 3, 4, 4]
        assert exp is not None and exp.final_model_id == f"model_{EXPERIMENT_ID}_round_{ROUNDS}"
        assert final is not None
    finally:
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        stop_serve(server)
        engine.dispose()
