"""Database schema (SQLModel) and engine set-up; the same code runs on SQLite and PostgreSQL."""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, UniqueConstraint, event, text
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Field, SQLModel, create_engine

from fedloom_core.storage import migrations

# The version in the schema_version table, which marks databases created before Alembic migrations;
# the schema's revision is in alembic_version (see fedloom_core.storage.migrations).
SCHEMA_VERSION = 1


def utcnow() -> datetime:
    """The current time in UTC, timezone-aware."""
    return datetime.now(UTC)


def _json() -> Any:
    return Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class Experiment(SQLModel, table=True):
    experiment_id: str = Field(primary_key=True, max_length=128)
    name: str = ""
    description: str = ""
    # created | running | completed | failed | stopped
    status: str = Field(default="created", index=True)
    dataset: str = "digits"
    model_architecture: str = "CNN"
    total_rounds: int = 0
    current_round: int = 0
    # The full, validated start request (experiment, training and aggregation config).
    config: dict = _json()
    dataset_config: dict = _json()
    model_config_: dict = Field(default_factory=dict, sa_column=Column("model_config", JSON, nullable=False))
    training_config: dict = _json()
    policy_config: dict = _json()
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    stop_reason: str | None = None
    error_code: str | None = None
    error: str | None = None
    final_model_id: str | None = None


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_key"
    id: int | None = Field(default=None, primary_key=True)
    # sha256 of the key; the key itself is never stored.
    key_hash: str = Field(index=True, unique=True, max_length=64)
    # admin | client
    role: str = "client"
    client_id: str | None = Field(default=None, index=True, max_length=128)
    created_at: datetime = Field(default_factory=utcnow)
    revoked: bool = False


class Client(SQLModel, table=True):
    client_id: str = Field(primary_key=True, max_length=128)
    registration_id: str
    # registered | active | inactive
    status: str = Field(default="registered", index=True)
    client_config: dict = _json()
    capabilities: dict = _json()
    location: dict = _json()
    registered_at: datetime = Field(default_factory=utcnow)
    last_seen: datetime | None = None
    last_update: datetime | None = None
    current_round: int = 0
    trust_score: float = 1.0
    contribution_score: float = 0.0


class Round(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("experiment_id", "round"),)
    id: int | None = Field(default=None, primary_key=True)
    experiment_id: str = Field(index=True, max_length=128)
    round: int
    # open (taking uploads) | closed (aggregating) | completed | failed | stopped
    status: str = "open"
    selected_clients: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # client id -> why it was not selected; client id -> {trust_score, compliance, policies_applied}
    exclusions: dict = _json()
    policy_results: dict = _json()
    # client id -> training parameters for this round (strategy and configure rules), sent with the task.
    client_config: dict = _json()
    # What the aggregation reported (e.g. Krum's selection, DP noise).
    strategy_info: dict = _json()
    # The clients asked to evaluate this round's new model (federated evaluation), or None when none were.
    evaluators: list | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    # None (no evaluation phase) | open (taking reports) | closed
    evaluation_status: str | None = None
    # When the evaluation phase stops waiting for reports.
    evaluation_deadline: datetime | None = None
    global_model_id: str = ""
    upload_count: int = 0
    started_at: datetime = Field(default_factory=utcnow)
    deadline: datetime | None = None
    closed_at: datetime | None = None
    completed_at: datetime | None = None


class Update(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("experiment_id", "round", "client_id"),)
    update_id: str = Field(primary_key=True, max_length=64)
    experiment_id: str = Field(index=True, max_length=128)
    round: int
    client_id: str = Field(index=True, max_length=128)
    blob_key: str
    sha256: str = Field(max_length=64)
    size_bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    num_samples: int
    metrics: dict = _json()
    # pending | accepted | rejected
    validation_status: str = "pending"
    reason: str | None = None
    received_at: datetime = Field(default_factory=utcnow)


class ExperimentClient(SQLModel, table=True):
    """A client's standing within one experiment: trust, counts, and whether it is still admitted."""

    __tablename__ = "experiment_client"
    experiment_id: str = Field(primary_key=True, max_length=128)
    client_id: str = Field(primary_key=True, max_length=128)
    # active | inactive (exceeded max_client_failures in this experiment)
    status: str = "active"
    trust_score: float = 1.0
    contribution_score: float = 0.0
    selections: int = 0
    deliveries: int = 0
    failures: int = 0
    last_round: int = 0


class ClientRoundScore(SQLModel, table=True):
    """One row per selected client and round: what it delivered and how its scores moved."""

    __tablename__ = "client_round_score"
    __table_args__ = (UniqueConstraint("experiment_id", "round", "client_id"),)
    id: int | None = Field(default=None, primary_key=True)
    experiment_id: str = Field(index=True, max_length=128)
    round: int
    client_id: str = Field(index=True, max_length=128)
    delivered: bool = False
    accepted: bool = False
    reason: str | None = None
    update_norm: float | None = None
    norm_ratio: float | None = None
    cosine_similarity: float | None = None
    anomaly: float | None = None
    trust_score: float = 1.0
    contribution: float | None = None
    created_at: datetime = Field(default_factory=utcnow)


class GlobalModel(SQLModel, table=True):
    __tablename__ = "global_model"
    model_id: str = Field(primary_key=True, max_length=200)
    experiment_id: str = Field(index=True, max_length=128)
    round: int
    blob_key: str
    sha256: str = Field(max_length=64)
    size_bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    parameters_count: int = 0
    accuracy: float | None = None
    loss: float | None = None
    created_at: datetime = Field(default_factory=utcnow)


class RoundMetrics(SQLModel, table=True):
    __tablename__ = "round_metrics"
    __table_args__ = (UniqueConstraint("experiment_id", "round"),)
    id: int | None = Field(default=None, primary_key=True)
    experiment_id: str = Field(index=True, max_length=128)
    round: int
    # None where the server had no evaluation data (central evaluation off).
    global_accuracy: float | None = None
    global_loss: float | None = None
    # The clients' evaluation reports averaged weighted by data_samples, or None when none came.
    federated_metrics: dict | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    participating_clients: int
    round_duration: float
    aggregation_time: float
    evaluation_time: float = 0.0
    model_id: str = ""
    created_at: datetime = Field(default_factory=utcnow)


class ClientEvaluation(SQLModel, table=True):
    """One client's evaluation of one round's new global model on its local data."""

    __tablename__ = "client_evaluation"
    __table_args__ = (UniqueConstraint("experiment_id", "round", "client_id"),)
    id: int | None = Field(default=None, primary_key=True)
    experiment_id: str = Field(index=True, max_length=128)
    round: int
    client_id: str = Field(index=True, max_length=128)
    # 0 means the client could not evaluate; such reports are left out of the average.
    data_samples: int = 0
    loss: float | None = None
    accuracy: float | None = None
    # Every numeric metric of the report, data_samples, loss and accuracy included.
    metrics: dict = _json()
    received_at: datetime = Field(default_factory=utcnow)


class ClientMetrics(SQLModel, table=True):
    __tablename__ = "client_metrics"
    __table_args__ = (UniqueConstraint("experiment_id", "round", "client_id"),)
    id: int | None = Field(default=None, primary_key=True)
    experiment_id: str = Field(index=True, max_length=128)
    round: int
    client_id: str = Field(index=True, max_length=128)
    local_accuracy: float | None = None
    local_loss: float | None = None
    training_time: float | None = None
    communication_time: float | None = None
    data_samples: int = 0
    epochs_completed: int | None = None
    created_at: datetime = Field(default_factory=utcnow)


class Event(SQLModel, table=True):
    event_id: int | None = Field(default=None, primary_key=True)
    type: str = Field(index=True, max_length=64)
    experiment_id: str | None = Field(default=None, index=True, max_length=128)
    client_id: str | None = Field(default=None, max_length=128)
    payload: dict = _json()
    created_at: datetime = Field(default_factory=utcnow)


class RateCounter(SQLModel, table=True):
    """One fixed-window request counter, shared by API replicas using the database limiter."""

    __tablename__ = "rate_counter"
    bucket: str = Field(primary_key=True, max_length=300)
    window_start: int = Field(sa_column=Column(BigInteger, nullable=False))
    count: int = 0


class SchemaVersion(SQLModel, table=True):
    __tablename__ = "schema_version"
    id: int = Field(default=1, primary_key=True)
    version: int


# The statements that make sqlite3 open a write transaction (it begins one implicitly before them).
_SQLITE_WRITE = re.compile(r"\s*(INSERT|UPDATE|DELETE|REPLACE)\b", re.IGNORECASE)
# One lock per database file in this process: its write transactions take turns on it.
_WRITER_LOCKS: dict[str, threading.Lock] = {}
_WRITER_LOCKS_GUARD = threading.Lock()
# A writer waits this long for its turn (SQLite's own busy timeout), then goes on to SQLite's lock as before.
_WRITER_TURN_TIMEOUT_S = 30.0


def _writer_lock(database: str) -> threading.Lock:
    """The lock of this database file in this process (an in-memory database has its own)."""
    if not database or database == ":memory:":
        return threading.Lock()
    with _WRITER_LOCKS_GUARD:
        return _WRITER_LOCKS.setdefault(os.path.realpath(database), threading.Lock())


class _TurnCursor(sqlite3.Cursor):
    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
        self.connection._before(sql)  # type: ignore[attr-defined]
        return super().execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
        self.connection._before(sql)  # type: ignore[attr-defined]
        return super().executemany(sql, *args)


class _TurnConnection(sqlite3.Connection):
    """A SQLite connection whose write transactions queue on this process's lock for the file.

    SQLite lets one writer in at a time; the others wait in its busy handler, which sleeps 1, 2, 5,
    10, 15 ms... between tries, so five uploads committing together took 35 ms for the last one
    where taking turns takes 7 (measured). The lock is taken before the statement that opens a write
    transaction and released after its commit or rollback; readers never take it (WAL lets them run),
    and other processes still meet at SQLite's own lock. A writer that waits longer than SQLite's
    busy timeout for its turn goes on without it, so the worst case is the old behaviour.
    """

    writer_lock: threading.Lock

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._writing = False

    def cursor(self, factory: Any = None) -> sqlite3.Cursor:  # type: ignore[override]
        return super().cursor(factory or _TurnCursor)

    def _before(self, sql: str) -> None:
        if not self._writing and _SQLITE_WRITE.match(sql):
            self._writing = self.writer_lock.acquire(timeout=_WRITER_TURN_TIMEOUT_S)

    def _done(self) -> None:
        if self._writing:
            self._writing = False
            self.writer_lock.release()

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self._done()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._done()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._done()


def make_engine(url: str) -> Engine:
    """An engine for ``url``, tuned for concurrent API and worker processes."""
    if url.startswith("sqlite"):
        # As many connections as the API's worker threads (anyio's default 40) may want at once:
        # WAL readers run concurrently, and a thread waiting for a pooled connection waits for nothing.
        in_memory = url in ("sqlite://", "sqlite:///:memory:") or "mode=memory" in url
        pool = {} if in_memory else {"pool_size": 20, "max_overflow": 30}
        lock = _writer_lock(make_url(url).database or "")
        factory = type("TurnConnection", (_TurnConnection,), {"writer_lock": lock})
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30, "factory": factory}, **pool
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


@contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    """Serialise schema upgrades between processes sharing one SQLite file (no-op for memory DBs)."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.schema-lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def create_schema(engine: Engine) -> None:
    """Upgrade the database to the newest migration; safe to run at every start-up, from many processes.

    One transaction holds the whole upgrade. Processes starting together wait for each other: on
    PostgreSQL at an advisory lock, on SQLite at a file lock beside the database.
    """
    with _sqlite_file_lock(engine), engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(7263001)"))
        elif engine.dialect.name == "sqlite":
            # sqlite3 opens transactions only before INSERT/UPDATE/DELETE; this one holds the DDL too.
            conn.exec_driver_sql("BEGIN")
        migrations.upgrade(conn)
