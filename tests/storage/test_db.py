"""Contract tests for the database layer: SQLite and PostgreSQL pass the same suite.

``DatabaseContract`` holds the tests; ``TestSQLite`` and ``TestPostgres`` subclass it, each with an
``engine`` fixture on an empty database, and hold the tests of their backend's own behaviour.

Covers the schema (``fedloom_core.storage.db``), the shared queries (``fedloom_core.storage.repo``), the upload insert
(``fedloom_core.storage.uploads.store_update``) and the round/experiment activities that write to the database
(``activities.experiment``), including the close-round/late-upload race.

PostgreSQL: ``FEDLOOM_TEST_POSTGRES_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``);
every test runs in its own freshly created schema, dropped afterwards. When the server is not reachable
TestPostgres is skipped, or fails when ``CI`` is set.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy import update as sa_update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool
from sqlmodel import Session, SQLModel, func, select

from activities.experiment import ExperimentActivities
from fedloom_core.errors import Conflict, RoundNotActive
from fedloom_core.learning import weights
from fedloom_core.learning.zoo import build_model
from fedloom_core.messages import (
    CompleteRoundInput,
    Evaluation,
    FinishInput,
    InitInput,
    ModelRef,
    OpenRoundInput,
    RoundRef,
    UpdateRef,
)
from fedloom_core.storage.blobstore import LocalBlobStore
from fedloom_core.storage.db import (
    SCHEMA_VERSION,
    ApiKey,
    Client,
    ClientMetrics,
    Event,
    Experiment,
    GlobalModel,
    Round,
    RoundMetrics,
    Update,
    create_schema,
    make_engine,
    utcnow,
)
from fedloom_core.storage.repo import (
    current_round,
    emit_event,
    iso,
    latest_experiment,
    latest_model,
    open_round,
    running_experiment,
    session_scope,
)
from fedloom_core.storage.uploads import StoredUpdate, round_reported, store_update

PG_URL_ENV = "FEDLOOM_TEST_POSTGRES_URL"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BASE = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
JOIN_S = 60  # upper bound on any helper thread; the database busy/lock waits are far shorter

_pg_problem: dict[str, str | None] = {}


# -- helpers -----------------------------------------------------------------------------------


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _pg_unreachable(url: str) -> str | None:
    """Why the PostgreSQL server at ``url`` cannot be used, or None; probed once per URL."""
    if url not in _pg_problem:
        probe = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
        try:
            with probe.connect() as conn:
                conn.execute(text("SELECT 1"))
            _pg_problem[url] = None
        except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
            _pg_problem[url] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        finally:
            probe.dispose()
    return _pg_problem[url]


def _url_of(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def _count(engine: Engine, model: type[SQLModel], *where: Any) -> int:
    with session_scope(engine) as s:
        return s.exec(select(func.count()).select_from(model).where(*where)).one()


def _events(engine: Engine, type_: str, experiment_id: str | None = None) -> list[Event]:
    with session_scope(engine) as s:
        q = select(Event).where(Event.type == type_)
        if experiment_id is not None:
            q = q.where(Event.experiment_id == experiment_id)
        return list(s.exec(q.order_by(Event.event_id)).all())


def _round(engine: Engine, experiment_id: str, number: int) -> Round:
    with session_scope(engine) as s:
        return s.exec(select(Round).where(Round.experiment_id == experiment_id, Round.round == number)).one()


def _conditional_upload_update(engine: Engine, experiment_id: str, number: int) -> int:
    """The exact guard store_update runs before inserting; returns the affected row count."""
    with session_scope(engine) as s:
        result = s.execute(
            sa_update(Round)
            .where(Round.experiment_id == experiment_id, Round.round == number, Round.status == "open")
            .values(upload_count=Round.upload_count + 1)
        )
        return result.rowcount


# -- a small but real experiment: running, with clients, a round-0 model and update files ---------


@dataclass
class World:
    engine: Engine
    blobs: LocalBlobStore
    acts: ExperimentActivities
    experiment_id: str
    model: ModelRef
    clients: list[str]
    uploads: dict[str, Path] = field(default_factory=dict)

    def open(self, number: int, selected: list[str] | None = None) -> None:
        self.acts.open_round(
            OpenRoundInput(
                experiment_id=self.experiment_id,
                round=number,
                selected=self.clients if selected is None else selected,
                global_model=self.model,
                deadline_s=600,
            )
        )

    def close(self, number: int) -> list[UpdateRef]:
        return self.acts.close_round(RoundRef(experiment_id=self.experiment_id, round=number))

    def upload(self, client_id: str, path: Path | None = None, samples: int = 10) -> StoredUpdate:
        # store_update takes ownership of the received file (it moves it into the blob store), so each
        # call gets its own copy, as each HTTP request brings its own body.
        source = path or self.uploads[client_id]
        received = source.with_name(f"{source.stem}-{uuid.uuid4().hex}.received")
        shutil.copyfile(source, received)
        return store_update(
            self.engine,
            self.blobs,
            client_id=client_id,
            upload_path=received,
            metrics={"data_samples": samples, "local_accuracy": 0.5, "local_loss": 0.7, "training_time": 1.5},
        )


def make_world(engine: Engine, tmp_path: Path, n_clients: int) -> World:
    experiment_id = f"exp_{uuid.uuid4().hex[:12]}"
    blobs = LocalBlobStore(tmp_path / "b")
    acts = ExperimentActivities(engine, blobs)
    clients = [f"client_{i:02d}" for i in range(n_clients)]
    with session_scope(engine) as s:
        s.add(Experiment(experiment_id=experiment_id, status="created", model_architecture="MLP", total_rounds=5))
        for cid in clients:
            s.add(Client(client_id=cid, registration_id=f"reg_{cid}"))
    # The real activity stores the round-0 model blob and row and marks the experiment running.
    model = acts.init_experiment(
        InitInput(experiment_id=experiment_id, architecture="MLP", input_shape=[2, 2, 1], num_classes=2, seed=7)
    )
    world = World(engine, blobs, acts, experiment_id, model, clients)
    updir = tmp_path / "uploads"
    updir.mkdir(exist_ok=True)
    for i, cid in enumerate(clients):
        path = updir / f"{cid}.safetensors"
        weights.save_state(build_model("MLP", (2, 2, 1), 2, seed=100 + i).state_dict(), path)
        world.uploads[cid] = path
    return world


_ROUND_UPDATE = re.compile(r'\s*UPDATE\s+"?round"?\s+SET\s+"?(status|upload_count)"?', re.IGNORECASE)


class StatementGate:
    """Pause chosen threads right after (or signal right before) the round-row UPDATE they run.

    ``pause_after[thread_name] = kind`` makes that thread wait on ``release`` once its UPDATE of
    ``kind`` ("status" for close_round, "upload_count" for store_update) has executed, i.e. while
    its transaction holds the round row. ``reached`` records, per thread, that it is about to run
    such an UPDATE (and so may be blocked inside it).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.pause_after: dict[str, str] = {}
        self.paused = threading.Event()
        self.release = threading.Event()
        self.reached: dict[str, threading.Event] = {}

    def reached_event(self, name: str) -> threading.Event:
        return self.reached.setdefault(name, threading.Event())

    def _kind(self, statement: str) -> str | None:
        m = _ROUND_UPDATE.match(statement)
        return m.group(1).lower() if m else None

    def _before(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if self._kind(statement):
            self.reached_event(threading.current_thread().name).set()

    def _after(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        kind = self._kind(statement)
        if kind and self.pause_after.get(threading.current_thread().name) == kind:
            self.paused.set()
            assert self.release.wait(JOIN_S), "gate was never released"

    def __enter__(self) -> StatementGate:
        event.listen(self.engine, "before_cursor_execute", self._before)
        event.listen(self.engine, "after_cursor_execute", self._after)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        event.remove(self.engine, "before_cursor_execute", self._before)
        event.remove(self.engine, "after_cursor_execute", self._after)


class Worker(threading.Thread):
    """A thread that keeps its target's result or exception."""

    def __init__(self, name: str, target: Callable[[], Any]) -> None:
        super().__init__(name=name, daemon=True)
        self._fn = target
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def finish(self) -> Any:
        self.join(JOIN_S)
        assert not self.is_alive(), f"{self.name} did not finish in {JOIN_S}s"
        return self.result


def _update(update_id: str, client_id: str = "c1", round: int = 1, size: int = 100) -> Update:
    return Update(
        update_id=update_id,
        experiment_id="e1",
        round=round,
        client_id=client_id,
        blob_key=f"updates/e1/{round}/{client_id}",
        sha256="f" * 64,
        size_bytes=size,
        num_samples=5,
        metrics={"data_samples": 5, "nested": {"a": [1, 2]}},
    )


def _complete_input(world: World, number: int, refs: list[UpdateRef]) -> CompleteRoundInput:
    model = ModelRef(
        model_id=f"model_{world.experiment_id}_round_{number}",
        blob_key=f"models/{world.experiment_id}/round-{number}.safetensors",
        sha256="a" * 64,
        round=number,
        size_bytes=2**33,
        parameters_count=642,
    )
    return CompleteRoundInput(
        experiment_id=world.experiment_id,
        round=number,
        total_rounds=5,
        model=model,
        evaluation=Evaluation(accuracy=0.75, loss=0.5, evaluation_time=0.1),
        updates=refs,
        round_duration=3.0,
        aggregation_time=0.2,
    )


def _sqlite_counter(tmp_path: Path) -> Engine:
    from fedloom_core.storage.db import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'turns.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER)"))
        conn.execute(text("INSERT INTO counter VALUES (1, 0)"))
    return engine


# -- the suite, and the backends that run it -------------------------------------------------------


class DatabaseContract:
    """The behaviour both databases share. A subclass provides ``engine``: an engine from ``make_engine``
    on an empty database (no tables yet)."""

    @pytest.fixture
    def db(self, engine: Engine) -> Engine:
        """The engine with the schema created."""
        create_schema(engine)
        return engine

    # -- schema ------------------------------------------------------------------------------------

    def test_create_schema_is_idempotent_and_records_version(self, engine: Engine) -> None:
        create_schema(engine)
        with session_scope(engine) as s:
            s.add(Experiment(experiment_id="keep-me"))
        create_schema(engine)  # a second start-up: no error, nothing lost
        create_schema(engine)

        tables = set(inspect(engine).get_table_names())
        assert set(SQLModel.metadata.tables) <= tables
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, version FROM schema_version")).all()
        assert [tuple(r) for r in rows] == [(1, SCHEMA_VERSION)]
        with session_scope(engine) as s:
            assert s.get(Experiment, "keep-me") is not None

    def test_create_schema_from_concurrent_processes(self, engine: Engine) -> None:
        """API and worker start together: each with its own engine runs create_schema at the same time."""
        url = _url_of(engine)
        barrier = threading.Barrier(4)

        def start_up() -> None:
            own = make_engine(url)
            try:
                barrier.wait(JOIN_S)
                create_schema(own)
            finally:
                own.dispose()

        workers = [Worker(f"startup-{i}", start_up) for i in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.finish()
        errors = [f"{w.name}: {type(w.error).__name__}: {w.error}" for w in workers if w.error]
        assert not errors, "\n".join(errors)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version FROM schema_version")).scalars().all() == [SCHEMA_VERSION]

    # -- experiments -------------------------------------------------------------------------------

    def test_experiment_insert_get_and_json_round_trip(self, db: Engine) -> None:
        config = {
            "experiment": {"name": "ünïcode ✓", "rounds": 3, "tags": ["a", "b", {"deep": [1, 2.5, None, True]}]},
            "training": {"lr": 0.01, "schedule": [{"epoch": 1, "lr": 0.1}, {"epoch": 2, "lr": 0.05}]},
            "empty": {},
            "list_of_lists": [[1, 2], [], [[3]]],
        }
        with session_scope(db) as s:
            s.add(
                Experiment(
                    experiment_id="e1",
                    name="first",
                    config=config,
                    dataset_config={"name": "digits", "split": {"iid": False, "alpha": 0.5}},
                    model_config_={"architecture": "CNN", "layers": [32, 64]},
                    training_config={"epochs": 2},
                    policy_config={"min_clients": 2, "weights": [0.25, 0.75]},
                    total_rounds=3,
                )
            )
        with session_scope(db) as s:
            exp = s.get(Experiment, "e1")
            assert exp is not None
            assert exp.config == config
            assert exp.dataset_config == {"name": "digits", "split": {"iid": False, "alpha": 0.5}}
            assert exp.model_config_ == {"architecture": "CNN", "layers": [32, 64]}
            assert exp.training_config == {"epochs": 2}
            assert exp.policy_config == {"min_clients": 2, "weights": [0.25, 0.75]}
            assert (exp.status, exp.total_rounds, exp.current_round, exp.started_at) == ("created", 3, 0, None)
            assert s.get(Experiment, "nope") is None
        # The Python attribute model_config_ is stored in the column model_config.
        with db.connect() as conn:
            assert "model_config" in {c["name"] for c in inspect(conn).get_columns("experiment")}

        # JSON columns are replaced as a whole by assignment (no in-place mutation tracking needed).
        with session_scope(db) as s:
            exp = s.get(Experiment, "e1")
            exp.config = {**exp.config, "extra": {"x": [1]}}
            s.add(exp)
        with session_scope(db) as s:
            assert s.get(Experiment, "e1").config["extra"] == {"x": [1]}

    def test_running_and_latest_experiment_ordering(self, db: Engine) -> None:
        with session_scope(db) as s:
            assert running_experiment(s) is None
            assert latest_experiment(s) is None
            s.add(Experiment(experiment_id="old-done", status="completed", created_at=BASE, started_at=BASE))
            s.add(Experiment(experiment_id="new-created", status="created", created_at=BASE + timedelta(hours=2)))
            # Created in a UTC+05:30 zone: 10:00+05:30 is 04:30Z, before the other two.
            s.add(
                Experiment(
                    experiment_id="mid-failed",
                    status="failed",
                    created_at=datetime(2024, 5, 1, 10, 0, tzinfo=timezone(timedelta(hours=5, minutes=30))),
                )
            )
        with session_scope(db) as s:
            assert running_experiment(s) is None
            # The one that ran last wins over a newer one that was only created.
            assert latest_experiment(s).experiment_id == "old-done"

        with session_scope(db) as s:
            # The oldest experiment is the running one: running beats "most recently created".
            s.add(
                Experiment(
                    experiment_id="running-a",
                    status="running",
                    created_at=BASE - timedelta(days=1),
                    started_at=BASE + timedelta(hours=1),
                )
            )
        with session_scope(db) as s:
            assert running_experiment(s).experiment_id == "running-a"
            assert latest_experiment(s).experiment_id == "running-a"

        with session_scope(db) as s:
            # Started later, expressed in a UTC-07:00 zone (06:30-07:00 is 13:30Z, after running-a's 13:00Z).
            s.add(
                Experiment(
                    experiment_id="running-b",
                    status="running",
                    created_at=BASE - timedelta(days=2),
                    started_at=datetime(2024, 5, 1, 6, 30, tzinfo=timezone(timedelta(hours=-7))),
                )
            )
        with session_scope(db) as s:
            assert running_experiment(s).experiment_id == "running-b"
            assert latest_experiment(s).experiment_id == "running-b"
            for exp_id in ("running-a", "running-b"):
                exp = s.get(Experiment, exp_id)
                exp.status = "stopped"
                s.add(exp)
        with session_scope(db) as s:
            assert running_experiment(s) is None
            # Nothing runs: the most recently started one (running-b, 13:30Z) is the latest.
            assert latest_experiment(s).experiment_id == "running-b"

    def test_concurrent_starts_never_pass_the_running_limit(self, db: Engine) -> None:
        from api.current import claim_start
        from fedloom_core.errors import TrainingAlreadyRunning

        limit, starters = 2, 5
        with session_scope(db) as s:
            s.add(Experiment(experiment_id="done", status="completed"))
        gate = threading.Barrier(starters)

        def start(i: int) -> bool:
            gate.wait()
            try:
                with session_scope(db) as s:
                    claim_start(s, limit)
                    time.sleep(0.2)  # a start's own checks run between the count and marking it running
                    s.add(Experiment(experiment_id=f"race-{i}", status="running", started_at=utcnow()))
            except TrainingAlreadyRunning:
                return False
            return True

        workers = [Worker(f"start-{i}", lambda i=i: start(i)) for i in range(starters)]
        for w in workers:
            w.start()
        results = [w.finish() for w in workers]
        assert all(w.error is None for w in workers), [w.error for w in workers]
        assert results.count(True) == limit
        with session_scope(db) as s:
            running = s.exec(select(Experiment).where(Experiment.status == "running")).all()
            assert len(running) == limit

    def test_timestamps_are_utc_and_iso_ends_with_z(self, db: Engine) -> None:
        ist = timezone(timedelta(hours=5, minutes=30))
        given = datetime(2024, 5, 1, 17, 45, 30, 123456, tzinfo=ist)  # 12:15:30.123456Z
        before = utcnow()
        with session_scope(db) as s:
            s.add(Experiment(experiment_id="tz", started_at=given))
        with session_scope(db) as s:
            exp = s.get(Experiment, "tz")
            assert exp.started_at == given  # the same instant
            assert exp.started_at.utcoffset() == timedelta(0)
            assert exp.started_at.replace(tzinfo=None) == datetime(2024, 5, 1, 12, 15, 30, 123456)
            assert iso(exp.started_at) == "2024-05-01T12:15:30Z"
            assert before - timedelta(seconds=5) <= exp.created_at <= utcnow() + timedelta(seconds=5)
            assert iso(exp.created_at).endswith("Z") and "+" not in iso(exp.created_at)
            assert exp.finished_at is None and iso(exp.finished_at) is None
        assert iso(datetime(2024, 1, 1, 0, 0, 0)) == "2024-01-01T00:00:00Z"  # naive values are taken as UTC

    # -- clients and API keys ----------------------------------------------------------------------

    def test_api_key_hash_is_unique(self, db: Engine) -> None:
        with session_scope(db) as s:
            s.add(ApiKey(key_hash="a" * 64, role="admin"))
            s.add(ApiKey(key_hash="b" * 64, role="client", client_id="c1"))
        with pytest.raises(IntegrityError):
            with session_scope(db) as s:
                s.add(ApiKey(key_hash="a" * 64, role="client", client_id="c2"))
        with session_scope(db) as s:
            keys = s.exec(select(ApiKey).order_by(ApiKey.id)).all()
            assert [(k.key_hash[0], k.role, k.client_id, k.revoked) for k in keys] == [
                ("a", "admin", None, False),
                ("b", "client", "c1", False),
            ]
            assert keys[0].id is not None and keys[1].id > keys[0].id

    def test_client_id_is_unique_and_json_round_trips(self, db: Engine) -> None:
        caps = {"gpu": False, "cores": 4, "frameworks": ["torch", {"name": "onnx", "v": [1, 2]}]}
        with session_scope(db) as s:
            s.add(Client(client_id="c1", registration_id="r1", capabilities=caps, location={"lat": 1.5, "lon": -2.25}))
        with pytest.raises(IntegrityError):
            with session_scope(db) as s:
                s.add(Client(client_id="c1", registration_id="r2"))
        with session_scope(db) as s:
            client = s.get(Client, "c1")
            assert client.registration_id == "r1"
            assert client.capabilities == caps
            assert client.location == {"lat": 1.5, "lon": -2.25}
            assert client.client_config == {}
            assert client.registered_at.utcoffset() == timedelta(0)
        assert _count(db, Client) == 1

    # -- rounds ------------------------------------------------------------------------------------

    def test_rounds_unique_per_experiment_and_round_queries(self, db: Engine) -> None:
        with session_scope(db) as s:
            assert open_round(s, "e1") is None and current_round(s, "e1") is None
            s.add(Round(experiment_id="e1", round=1, status="completed", selected_clients=["a", "b"]))
            s.add(Round(experiment_id="e1", round=2, status="open", selected_clients=["b", "c"]))
            s.add(
                Round(experiment_id="e2", round=1, status="open", selected_clients=[])
            )  # same number, other experiment
        with pytest.raises(IntegrityError):
            with session_scope(db) as s:
                s.add(Round(experiment_id="e1", round=2, status="open"))
        with session_scope(db) as s:
            rnd = open_round(s, "e1")
            assert (rnd.round, rnd.selected_clients) == (2, ["b", "c"])
            assert current_round(s, "e1").round == 2
            assert open_round(s, "e2").round == 1
            assert open_round(s, "other") is None
            rnd.status = "closed"
            s.add(rnd)
            s.add(Round(experiment_id="e1", round=10, status="completed"))  # numeric, not text, ordering
        with session_scope(db) as s:
            assert open_round(s, "e1") is None
            assert current_round(s, "e1").round == 10
        assert _count(db, Round) == 4

    def test_latest_model_by_round(self, db: Engine) -> None:
        with session_scope(db) as s:
            for n in (0, 2, 1):
                s.add(
                    GlobalModel(
                        model_id=f"m{n}",
                        experiment_id="e1",
                        round=n,
                        blob_key=f"k{n}",
                        sha256="0" * 64,
                        size_bytes=2**35 + n,
                    )
                )
        with session_scope(db) as s:
            assert latest_model(s, "e1").model_id == "m2"
            assert latest_model(s, "e1", 1).model_id == "m1"
            assert latest_model(s, "e1", 7) is None
            assert latest_model(s, "e2") is None
            assert s.get(GlobalModel, "m2").size_bytes == 2**35 + 2

    # -- updates -----------------------------------------------------------------------------------

    def test_update_unique_per_round_and_client_and_big_sizes(self, db: Engine) -> None:
        big = 2**40 + 12345  # far beyond a 32-bit INTEGER
        with session_scope(db) as s:
            s.add(_update("u1", size=big))
            s.add(_update("u2", client_id="c2"))
            s.add(_update("u3", round=2))  # the same client in another round
        with pytest.raises(IntegrityError):
            with session_scope(db) as s:
                s.add(_update("u4"))  # c1 again in round 1, under a fresh update id
        with session_scope(db) as s:
            u1 = s.get(Update, "u1")
            assert u1.size_bytes == big
            assert u1.metrics == {"data_samples": 5, "nested": {"a": [1, 2]}}
            assert u1.validation_status == "pending"
            assert s.get(Update, "u4") is None
        assert _count(db, Update) == 3

    # -- events ------------------------------------------------------------------------------------

    def test_emit_event_ids_increase_and_payload_is_complete(self, db: Engine) -> None:
        with session_scope(db) as s:
            first = emit_event(s, type="experiment_started", experiment_id="e1", total_rounds=3)
            second = emit_event(s, type="client_registered", client_id="c1", capabilities={"gpu": False})
        with session_scope(db) as s:
            third = emit_event(s, type="client_update", experiment_id="e1", client_id="c2", round=1, metrics={"a": 1})
        with pytest.raises(RuntimeError):
            with session_scope(db) as s:
                emit_event(s, type="rolled_back", experiment_id="e1")
                s.flush()
                raise RuntimeError("abort")
        with session_scope(db) as s:
            fourth = emit_event(s, type="round_started", experiment_id="e1", round=2)

        ids = [e.event_id for e in (first, second, third, fourth)]
        assert all(isinstance(i, int) for i in ids)
        assert ids == sorted(ids) and len(set(ids)) == 4

        with session_scope(db) as s:
            rows = s.exec(select(Event).order_by(Event.event_id)).all()
        assert [r.event_id for r in rows] == ids
        assert [r.type for r in rows] == ["experiment_started", "client_registered", "client_update", "round_started"]
        for row in rows:
            assert row.payload["type"] == row.type
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row.payload["timestamp"])
            assert row.payload["timestamp"] == iso(row.created_at)
        assert rows[0].payload["experiment_id"] == "e1" and rows[0].payload["total_rounds"] == 3
        assert rows[1].experiment_id is None and "experiment_id" not in rows[1].payload
        assert rows[1].payload["client_id"] == "c1" and rows[1].payload["capabilities"] == {"gpu": False}
        assert rows[2].payload == {
            "type": "client_update",
            "experiment_id": "e1",
            "client_id": "c2",
            "round": 1,
            "metrics": {"a": 1},
            "timestamp": rows[2].payload["timestamp"],
        }

    # -- closing a round against uploads -----------------------------------------------------------

    def test_close_round_refuses_a_late_upload(self, db: Engine, tmp_path: Path) -> None:
        world = make_world(db, tmp_path, 3)
        world.open(1)
        assert world.upload("client_00").created

        refs = world.close(1)
        assert [r.client_id for r in refs] == ["client_00"]
        rnd = _round(db, world.experiment_id, 1)
        assert rnd.status == "closed" and rnd.closed_at is not None and rnd.upload_count == 1

        # The guard store_update takes before inserting no longer matches the round...
        assert _conditional_upload_update(db, world.experiment_id, 1) == 0
        # ...and the real upload path refuses a late update.
        with pytest.raises(RoundNotActive):
            world.upload("client_01")
        assert _count(db, Update, Update.experiment_id == world.experiment_id) == 1

        # close_round again (a Temporal retry) returns the same list and keeps the first closing time.
        assert world.close(1) == refs
        again = _round(db, world.experiment_id, 1)
        assert again.status == "closed" and again.closed_at == rnd.closed_at and again.upload_count == 1

    def test_repeated_and_conflicting_uploads_are_recorded_once(self, db: Engine, tmp_path: Path) -> None:
        world = make_world(db, tmp_path, 2)
        world.open(1)
        first = world.upload("client_00")
        repeat = world.upload("client_00")
        assert first.created and not repeat.created and repeat.update.update_id == first.update.update_id
        with pytest.raises(Conflict):
            world.upload("client_00", path=world.uploads["client_01"])  # a different model for the same round
        assert _count(db, Update, Update.experiment_id == world.experiment_id) == 1
        assert _round(db, world.experiment_id, 1).upload_count == 1
        assert len(_events(db, "client_update", world.experiment_id)) == 1

    def test_a_round_is_reported_complete_once_every_selected_client_has_an_update(
        self, db: Engine, tmp_path: Path
    ) -> None:
        world = make_world(db, tmp_path, 3)
        world.open(1, selected=["client_00", "client_01"])
        assert round_reported(db, world.experiment_id, 1) is None
        assert world.upload("client_00").completed_round is None
        assert round_reported(db, world.experiment_id, 1) is None  # client_01 has not reported yet
        assert world.upload("client_01").completed_round == ["client_00", "client_01"]
        assert round_reported(db, world.experiment_id, 1) == ["client_00", "client_01"]
        assert round_reported(db, world.experiment_id, 2) is None  # no such round
        # A repeat does not claim to have completed the round: it asks round_reported again.
        repeat = world.upload("client_01")
        assert not repeat.created and repeat.completed_round is None

    def test_of_concurrent_last_uploads_exactly_one_completes_the_round(self, db: Engine, tmp_path: Path) -> None:
        world = make_world(db, tmp_path, 4)
        world.open(1)
        barrier = threading.Barrier(4)

        def go(cid: str) -> list[str] | None:
            barrier.wait(JOIN_S)
            return world.upload(cid).completed_round

        workers = [Worker(f"last-{cid}", lambda cid=cid: go(cid)) for cid in world.clients]
        for w in workers:
            w.start()
        results = [w.finish() for w in workers]
        assert [w.error for w in workers] == [None] * 4
        # The round row serialises the uploads' transactions, so the count each one reads is its own.
        assert results.count(sorted(world.clients)) == 1 and results.count(None) == 3
        assert round_reported(db, world.experiment_id, 1) == sorted(world.clients)

    def test_concurrent_identical_uploads_of_one_client_are_recorded_once(self, db: Engine, tmp_path: Path) -> None:
        world = make_world(db, tmp_path, 1)
        world.open(1)
        barrier = threading.Barrier(4)

        def go() -> StoredUpdate:
            barrier.wait(JOIN_S)
            return world.upload("client_00")

        workers = [Worker(f"dup-{i}", go) for i in range(4)]
        for w in workers:
            w.start()
        results = [w.finish() for w in workers]
        assert [w.error for w in workers] == [None] * 4
        assert sum(r.created for r in results) == 1
        assert len({r.update.update_id for r in results}) == 1
        assert _count(db, Update, Update.experiment_id == world.experiment_id) == 1
        assert _round(db, world.experiment_id, 1).upload_count == 1  # the losers' increments rolled back

    def test_close_round_waits_for_an_upload_in_flight(self, db: Engine, tmp_path: Path) -> None:
        """An upload that holds the round row when close_round starts is in the closed round's list."""
        world = make_world(db, tmp_path, 2)
        world.open(1)
        with StatementGate(db) as gate:
            gate.pause_after["uploader"] = "upload_count"
            uploader = Worker("uploader", lambda: world.upload("client_01"))
            uploader.start()
            assert gate.paused.wait(JOIN_S), "the upload never reached its conditional UPDATE"
            closer = Worker("closer", lambda: world.close(1))
            closer.start()
            assert gate.reached_event("closer").wait(JOIN_S)
            time.sleep(0.3)
            assert closer.is_alive(), "close_round did not wait for the upload that holds the round row"
            gate.release.set()
            stored = uploader.finish()
            refs = closer.finish()
        assert uploader.error is None and closer.error is None, (uploader.error, closer.error)
        assert stored.created
        assert [r.update_id for r in refs] == [stored.update.update_id]
        assert _round(db, world.experiment_id, 1).status == "closed"

    def test_upload_waits_for_a_close_in_flight_and_is_refused(self, db: Engine, tmp_path: Path) -> None:
        """An upload that reaches the round row while close_round holds it is refused, not lost."""
        world = make_world(db, tmp_path, 2)
        world.open(1)
        with StatementGate(db) as gate:
            gate.pause_after["closer"] = "status"
            closer = Worker("closer", lambda: world.close(1))
            closer.start()
            assert gate.paused.wait(JOIN_S), "close_round never ran its UPDATE"
            uploader = Worker("uploader", lambda: world.upload("client_00"))
            uploader.start()
            assert gate.reached_event("uploader").wait(JOIN_S), "the upload never reached its conditional UPDATE"
            time.sleep(0.3)
            assert uploader.is_alive(), "the upload did not wait for close_round, which holds the round row"
            gate.release.set()
            refs = closer.finish()
            uploader.finish()
        assert closer.error is None, closer.error
        assert refs == []
        assert isinstance(uploader.error, RoundNotActive), repr(uploader.error)
        assert _count(db, Update, Update.experiment_id == world.experiment_id) == 0
        rnd = _round(db, world.experiment_id, 1)
        assert (rnd.status, rnd.upload_count) == ("closed", 0)

    @pytest.mark.parametrize("n_clients", [8])
    def test_concurrent_uploads_racing_close_round_lose_nothing(
        self, db: Engine, tmp_path: Path, n_clients: int
    ) -> None:
        """N real uploads race one close_round; every committed update is in the list close_round returned.

        Each round starts the closer at a different point: at once, and once 1, N/2 and N uploads have
        reached their conditional UPDATE of the round row, so the close lands before, among and after them.
        """
        world = make_world(db, tmp_path, n_clients)
        at_guard = {"n": 0}
        cond = threading.Condition()

        def count_guards(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            m = _ROUND_UPDATE.match(statement)
            if m and m.group(1).lower() == "upload_count":
                with cond:
                    at_guard["n"] += 1
                    cond.notify_all()

        event.listen(db, "before_cursor_execute", count_guards)
        outcomes = []
        try:
            for number, trigger in enumerate([0, 1, n_clients // 2, n_clients], start=1):
                world.open(number)
                at_guard["n"] = 0
                barrier = threading.Barrier(n_clients + 1)

                def upload(cid: str, barrier: threading.Barrier = barrier) -> StoredUpdate:
                    barrier.wait(JOIN_S)
                    return world.upload(cid)

                def close(
                    trigger: int = trigger, n: int = number, barrier: threading.Barrier = barrier
                ) -> list[UpdateRef]:
                    barrier.wait(JOIN_S)
                    with cond:
                        cond.wait_for(lambda: at_guard["n"] >= trigger, timeout=JOIN_S)
                    return world.close(n)

                uploaders = [Worker(f"up-{number}-{cid}", lambda cid=cid: upload(cid)) for cid in world.clients]
                closer = Worker(f"close-{number}", close)
                for w in [*uploaders, closer]:
                    w.start()
                refs = closer.finish()
                for w in uploaders:
                    w.finish()
                assert closer.error is None, repr(closer.error)

                unexpected = [
                    f"{w.name}: {w.error!r}" for w in uploaders if w.error and not isinstance(w.error, RoundNotActive)
                ]
                assert not unexpected, unexpected
                accepted = {w.result.update.update_id for w in uploaders if w.error is None}
                assert all(w.result.created for w in uploaders if w.error is None)
                with session_scope(db) as s:
                    committed = {
                        u.update_id
                        for u in s.exec(
                            select(Update).where(Update.experiment_id == world.experiment_id, Update.round == number)
                        ).all()
                    }
                returned = {r.update_id for r in refs}
                missing = committed - returned
                assert not missing, f"round {number}: committed updates missing from close_round's list: {missing}"
                assert returned == committed == accepted
                rnd = _round(db, world.experiment_id, number)
                assert rnd.status == "closed"
                assert rnd.upload_count == len(committed)
                assert world.close(number) == refs  # nothing got in after the close either
                outcomes.append(len(accepted))
        finally:
            event.remove(db, "before_cursor_execute", count_guards)
        assert len(outcomes) == 4

    # -- idempotent activities ---------------------------------------------------------------------

    def test_complete_round_is_idempotent(self, db: Engine, tmp_path: Path) -> None:
        world = make_world(db, tmp_path, 3)
        world.open(1)
        world.upload("client_00", samples=10)
        world.upload("client_02", samples=30)
        refs = world.close(1)
        inp = _complete_input(world, 1, refs)

        world.acts.complete_round(inp)
        world.acts.complete_round(inp)  # a retry after a lost acknowledgement

        exp_id = world.experiment_id
        assert _count(db, GlobalModel, GlobalModel.experiment_id == exp_id) == 2  # round 0 and round 1
        assert _count(db, RoundMetrics, RoundMetrics.experiment_id == exp_id) == 1
        assert _count(db, ClientMetrics, ClientMetrics.experiment_id == exp_id) == 2
        assert len(_events(db, "round_completed", exp_id)) == 1
        assert len(_events(db, "training_progress", exp_id)) == 1
        with session_scope(db) as s:
            model = latest_model(s, exp_id)
            assert (model.round, model.size_bytes, model.accuracy) == (1, 2**33, 0.75)
            metrics = s.exec(select(RoundMetrics).where(RoundMetrics.experiment_id == exp_id)).one()
            assert (metrics.participating_clients, metrics.model_id) == (2, model.model_id)
            updates = s.exec(select(Update).where(Update.experiment_id == exp_id)).all()
            assert {u.validation_status for u in updates} == {"accepted"}
            statuses = {c.client_id: c.status for c in s.exec(select(Client)).all()}
            assert statuses == {"client_00": "active", "client_01": "inactive", "client_02": "active"}
            data = {m.client_id: m.data_samples for m in s.exec(select(ClientMetrics)).all()}
            assert data == {"client_00": 10, "client_02": 30}
        rnd = _round(db, exp_id, 1)
        assert rnd.status == "completed" and rnd.completed_at is not None

    @pytest.mark.parametrize("status", ["completed", "stopped", "failed"])
    def test_finish_experiment_is_idempotent(self, db: Engine, tmp_path: Path, status: str) -> None:
        world = make_world(db, tmp_path, 2)
        world.open(1)
        world.upload("client_00")
        inp = FinishInput(
            experiment_id=world.experiment_id,
            status=status,
            rounds_completed=0,
            final_model_id=world.model.model_id,
            reason=None if status == "completed" else f"why {status}",
            error_code="BOOM" if status == "failed" else None,
        )
        world.acts.finish_experiment(inp)
        with session_scope(db) as s:
            first = s.get(Experiment, world.experiment_id)
        world.acts.finish_experiment(inp)  # a retry
        # A later call with a different ending changes nothing either.
        world.acts.finish_experiment(inp.model_copy(update={"status": "failed", "reason": "late"}))

        with session_scope(db) as s:
            exp = s.get(Experiment, world.experiment_id)
            running = running_experiment(s)
        assert running is None
        assert exp.status == status
        assert exp.finished_at == first.finished_at and exp.finished_at is not None
        assert exp.final_model_id == world.model.model_id
        assert exp.stop_reason == ("why stopped" if status == "stopped" else None)
        assert exp.error == ("why failed" if status == "failed" else None)
        assert exp.error_code == ("BOOM" if status == "failed" else None)
        assert len(_events(db, f"training_{status}", world.experiment_id)) == 1
        if status != "failed":
            assert _events(db, "training_failed", world.experiment_id) == []  # the later call changed nothing
        # The open round takes no more uploads.
        rnd = _round(db, world.experiment_id, 1)
        assert rnd.status != "open"
        assert _conditional_upload_update(db, world.experiment_id, 1) == 0
        with pytest.raises(Exception) as refused:
            world.upload("client_01")
        assert type(refused.value).__name__ in ("ExperimentNotActive", "RoundNotActive")
        assert _count(db, Update, Update.experiment_id == world.experiment_id) == 1


@pytest.mark.unit
class TestSQLite(DatabaseContract):
    @pytest.fixture
    def engine(self, tmp_path: Path) -> Iterator[Engine]:
        eng = make_engine(f"sqlite:///{tmp_path}/t.db")
        try:
            yield eng
        finally:
            eng.dispose()

    # -- writers take turns within a process -----------------------------------------------------

    def test_sqlite_write_transactions_of_a_process_take_turns_and_readers_do_not(self, tmp_path: Path) -> None:
        from fedloom_core.storage import db as dbmod

        engine = _sqlite_counter(tmp_path)
        lock = dbmod._writer_lock(str(tmp_path / "turns.db"))
        assert not lock.locked()
        holder = engine.connect()
        holder.execute(text("UPDATE counter SET n = n + 1 WHERE id = 1"))  # opens a write transaction
        assert lock.locked()  # taken at the statement that opened it
        # A reader is not held up by the writer (WAL), and takes no turn.
        with engine.connect() as reader:
            assert reader.execute(text("SELECT n FROM counter")).scalar() == 0

        def write() -> int:
            with engine.begin() as conn:
                conn.execute(text("UPDATE counter SET n = n + 10 WHERE id = 1"))
                return int(conn.execute(text("SELECT n FROM counter")).scalar())

        waiter = Worker("second-writer", write)
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive()  # waiting for its turn
        holder.commit()  # the turn is released after the commit
        assert waiter.finish() == 11 and waiter.error is None
        assert not lock.locked()
        # A rollback (and a connection returned to the pool mid-transaction) gives the turn back too.
        holder.execute(text("UPDATE counter SET n = 0"))
        holder.rollback()
        assert not lock.locked()
        holder.execute(text("UPDATE counter SET n = 0"))
        holder.close()
        assert not lock.locked()
        with engine.connect() as reader:
            assert reader.execute(text("SELECT n FROM counter")).scalar() == 11

    def test_a_sqlite_writer_that_waits_too_long_for_its_turn_goes_on_to_sqlites_lock(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from fedloom_core.storage import db as dbmod

        engine = _sqlite_counter(tmp_path)
        monkeypatch.setattr(dbmod, "_WRITER_TURN_TIMEOUT_S", 0.2)
        lock = dbmod._writer_lock(str(tmp_path / "turns.db"))
        assert lock.acquire(timeout=1)  # a turn that is never given back (a leaked connection, say)
        try:
            with engine.begin() as conn:
                conn.execute(text("UPDATE counter SET n = 5"))
            with engine.connect() as conn:
                assert conn.execute(text("SELECT n FROM counter")).scalar() == 5
        finally:
            lock.release()


@pytest.mark.postgres
class TestPostgres(DatabaseContract):
    @pytest.fixture
    def engine(self) -> Iterator[Engine]:
        """A fresh schema on the server, dropped afterwards; skipped (failed under CI) if unreachable."""
        raw_url = os.environ.get(PG_URL_ENV) or DEFAULT_PG_URL
        url = make_url(raw_url)
        shown = url.render_as_string(hide_password=True)
        problem = _pg_unreachable(url.render_as_string(hide_password=False))
        if problem is not None:
            message = f"PostgreSQL not reachable at {shown} ({problem}); set {PG_URL_ENV} to a reachable server"
            if _in_ci():
                pytest.fail(message, pytrace=False)
            pytest.skip(message)

        schema = f"t_{uuid.uuid4().hex}"
        admin = create_engine(url, poolclass=NullPool)
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        # The schema goes into libpq's ``options`` so that every pooled connection of the engine (and of
        # any further engine built from ``engine.url``) uses it, without touching make_engine.
        existing = url.query.get("options")
        existing = " ".join(existing) if isinstance(existing, tuple) else (existing or "")
        scoped = url.update_query_dict({"options": f"{existing} -csearch_path={schema}".strip()})
        eng = make_engine(scoped.render_as_string(hide_password=False))
        try:
            with eng.connect() as conn:
                assert conn.execute(text("SELECT current_schema()")).scalar() == schema
            yield eng
        finally:
            eng.dispose()
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            admin.dispose()

    def test_a_connection_in_another_time_zone_reads_the_same_instant(self, db: Engine) -> None:
        given = datetime(2024, 5, 1, 17, 45, 30, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30)))
        with session_scope(db) as s:
            s.add(Experiment(experiment_id="tz", started_at=given))
        with db.connect() as conn:
            conn.execute(text("SET TIME ZONE 'America/Los_Angeles'"))
            with Session(bind=conn) as s:
                exp = s.exec(select(Experiment).where(Experiment.started_at == given)).one()
                assert iso(exp.started_at) == "2024-05-01T12:15:30Z"
            conn.rollback()
