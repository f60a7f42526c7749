"""Storage retention: the keep rules, the database-driven sweep, orphan collection (local directory and
S3 on a real moto server), the start-up spool cleanup and the 410 for a removed round's model."""

from __future__ import annotations

import io
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from fedloom_core.schemas import StartRequest
from fedloom_core.settings import Settings
from fedloom_core.storage import retention
from fedloom_core.storage.blobstore import BlobStore, LocalBlobStore, S3BlobStore, open_blob_store
from fedloom_core.storage.candidates import details_key
from fedloom_core.storage.db import Experiment, GlobalModel, RoundMetrics, Update, create_schema, make_engine
from fedloom_core.storage.keys import model_id_for, model_key, state_key, update_key
from fedloom_core.storage.repo import latest_model, session_scope
from fedloom_core.storage.round_outcomes import outcome_key
from tests.storage.test_blobstore import moto_endpoint  # noqa: F401 - the session's moto server
from tests.storage.test_db import DEFAULT_PG_URL, PG_URL_ENV, _in_ci, _pg_unreachable

EXP = "exp-r"
CLIENTS = ("c1", "c2")


def _settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", **kw)  # type: ignore[arg-type]


def test_keep_rules() -> None:
    rules = retention.Rules(keep_last_models=2, keep_model_every=5)
    kept = [r for r in range(0, 13) if rules.keeps_model(r, last=12, final_round=None)]
    # initial, every 5th, the last two committed, and anything at or after the latest committed round
    assert kept == [0, 5, 10, 11, 12]
    assert rules.keeps_model(3, last=12, final_round=3)
    assert not rules.keeps_updates(4, last=4) and rules.keeps_updates(5, last=4)
    assert rules.keeps_state(4, last=4) and not rules.keeps_state(3, last=4)
    assert [r for r in range(0, 13) if retention.Rules(keep_last_models=1, keep_model_every=0).keeps_model(r, 12)] == [
        0,
        12,
    ]
    off = retention.Rules(enabled=False)
    assert off.keeps_model(3, 12) and off.keeps_updates(1, 12) and off.keeps_state(1, 12)


def test_experiment_config_overrides_the_server(tmp_path: Path) -> None:
    settings = _settings(tmp_path, keep_last_models=4, keep_model_every=0)
    fresh = StartRequest().model_dump(mode="json")
    assert retention.rules_for(settings, fresh) == retention.Rules(True, False, 4, 0)
    # Recorded before retention existed (no retention key): kept whole after an upgrade.
    assert not retention.rules_for(settings, {}).enabled
    assert not retention.rules_for(settings, {"experiment_config": {"rounds": 3}}).enabled
    req = StartRequest.model_validate(
        {"experiment_config": {"retention": {"keep_updates": True, "keep_model_every": 2}}}
    )
    assert retention.rules_for(settings, req.model_dump(mode="json")) == retention.Rules(True, True, 4, 2)
    off = StartRequest.model_validate({"experiment_config": {"retention": {"enabled": False}}})
    assert not retention.rules_for(settings, off.model_dump(mode="json")).enabled
    assert not retention.rules_for(_settings(tmp_path, retention=False), fresh).enabled
    with pytest.raises(ValidationError, match="keep_everything"):
        StartRequest.model_validate({"experiment_config": {"retention": {"keep_everything": True}}})
    with pytest.raises(ValidationError):
        StartRequest.model_validate({"experiment_config": {"retention": {"keep_last_models": 0}}})


@pytest.fixture
def local_store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


@pytest.fixture
def s3_store(moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> S3BlobStore:  # noqa: F811
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    store = open_blob_store(f"s3://fedloom-ret-{uuid.uuid4().hex[:12]}/blobs", s3_endpoint_url=moto_endpoint)
    assert isinstance(store, S3BlobStore)
    return store


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> BlobStore:
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """An empty database: SQLite, or a fresh schema on the test PostgreSQL server (dropped afterwards)."""
    if request.param == "sqlite":
        eng = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
        create_schema(eng)
        yield eng
        eng.dispose()
        return
    url = make_url(os.environ.get(PG_URL_ENV) or DEFAULT_PG_URL)
    problem = _pg_unreachable(url.render_as_string(hide_password=False))
    if problem is not None:
        message = f"PostgreSQL not reachable ({problem}); set {PG_URL_ENV} to a reachable server"
        if _in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    schema = f"t_{uuid.uuid4().hex}"
    admin = create_engine(url, poolclass=NullPool)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    scoped = url.update_query_dict({"options": f"-csearch_path={schema}"})
    eng = make_engine(scoped.render_as_string(hide_password=False))
    create_schema(eng)
    try:
        yield eng
    finally:
        eng.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def _put(blobs: BlobStore, key: str) -> str:
    return blobs.put_stream(key, io.BytesIO(key.encode())).sha256


def _commit_round(engine, blobs: BlobStore, exp_id: str, rnd: int) -> None:  # type: ignore[no-untyped-def]
    """What a round leaves: its updates, its model, its strategy state and its rows."""
    with session_scope(engine) as s:
        for client in CLIENTS:
            key = update_key(exp_id, rnd, client, f"{rnd:02d}{client}".ljust(32, "0"))
            sha = _put(blobs, key)
            s.add(
                Update(
                    update_id=f"u-{exp_id}-{rnd}-{client}",
                    experiment_id=exp_id,
                    round=rnd,
                    client_id=client,
                    blob_key=key,
                    sha256=sha,
                    size_bytes=len(key),
                    num_samples=1,
                )
            )
        _record_model(s, blobs, exp_id, rnd)
        _put(blobs, state_key(exp_id, rnd))
        _put(blobs, details_key(exp_id, rnd, f"{rnd:064x}"))
        _put(blobs, outcome_key(exp_id, rnd, f"{rnd:064x}"))
        s.add(
            RoundMetrics(
                experiment_id=exp_id, round=rnd, participating_clients=2, round_duration=1.0, aggregation_time=0.1
            )
        )


def _record_model(s, blobs: BlobStore, exp_id: str, rnd: int) -> None:  # type: ignore[no-untyped-def]
    key = model_key(exp_id, rnd)
    sha = _put(blobs, key)
    s.add(
        GlobalModel(
            model_id=model_id_for(exp_id, rnd), experiment_id=exp_id, round=rnd, blob_key=key, sha256=sha, size_bytes=3
        )
    )


def _experiment(engine, blobs: BlobStore, exp_id: str, rounds: int, config: dict | None = None) -> None:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        stored = config or StartRequest().model_dump(mode="json")
        s.add(Experiment(experiment_id=exp_id, status="running", config=stored))
        _record_model(s, blobs, exp_id, 0)
    for rnd in range(1, rounds + 1):
        _commit_round(engine, blobs, exp_id, rnd)


def _keys(blobs: BlobStore, prefix: str) -> set[str]:
    return {key for key, _ in blobs.list_keys(prefix)}


def test_sweep_deletes_what_the_rules_let_go(engine, store: BlobStore, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = _settings(tmp_path, keep_last_models=2, keep_model_every=3)
    _experiment(engine, store, EXP, 7)
    keep_all = StartRequest.model_validate({"experiment_config": {"retention": {"enabled": False}}})
    _experiment(engine, store, "exp-all", 3, keep_all.model_dump(mode="json"))
    swept: dict[str, int] = {}
    retention.apply_retention(engine, store, settings, swept)
    assert swept == {EXP: 7, "exp-all": 3}
    assert _keys(store, f"models/{EXP}") == {model_key(EXP, r) for r in (0, 3, 6, 7)}
    assert _keys(store, f"updates/{EXP}") == set()
    assert _keys(store, f"state/{EXP}") == {state_key(EXP, 7)}
    assert _keys(store, f"selections/{EXP}") == set()  # each was copied into its round's row
    assert _keys(store, f"outcomes/{EXP}") == set()
    assert len(_keys(store, "updates/exp-all")) == 6 and len(_keys(store, "models/exp-all")) == 4
    assert len(_keys(store, "selections/exp-all")) == 3 and len(_keys(store, "outcomes/exp-all")) == 3
    with session_scope(engine) as s:
        assert latest_model(s, EXP, 6) is not None and latest_model(s, EXP).round == 7
        with pytest.raises(retention.ModelRemoved) as removed:
            latest_model(s, EXP, 5)
        assert "round 5 of experiment 'exp-r' was deleted by the storage retention rules" in removed.value.details
        assert latest_model(s, EXP, 8) is None  # never committed: a plain 404
        assert len(s.exec(Update.__table__.select()).all()) == 20  # the rows and their metrics stay

    # Round 8 is under way: its updates, model and state exist before its rows; nothing of it goes.
    for client in CLIENTS:
        _put(store, update_key(EXP, 8, client, "f" * 32))
    _put(store, model_key(EXP, 8))
    _put(store, state_key(EXP, 8))
    _put(store, details_key(EXP, 8, "8" * 64))
    _put(store, outcome_key(EXP, 8, "8" * 64))
    if isinstance(store, LocalBlobStore):  # a write in progress: its temp file
        (store.root / "models" / EXP / ".round-9.safetensors.x1.tmp").write_bytes(b"partial")
    assert retention.apply_retention(engine, store, settings, swept).deleted == []
    assert retention.collect_orphans(engine, store, grace_s=0, now=time.time() + 5).deleted == []
    assert len(_keys(store, f"updates/{EXP}/8")) == 2 and store.exists(model_key(EXP, 8))
    if isinstance(store, LocalBlobStore):
        (store.root / "models" / EXP / ".round-9.safetensors.x1.tmp").unlink()  # still there: it was spared

    # Then it commits: round 7's model stays (one of the last two), round 8's updates go.
    with session_scope(engine) as s:
        s.add(RoundMetrics(experiment_id=EXP, round=8, participating_clients=2, round_duration=1, aggregation_time=0))
        _record_model_row_only(s, EXP, 8)
        for client, key in zip(CLIENTS, _sorted_updates(EXP, 8), strict=True):
            s.add(
                Update(
                    update_id=f"u8-{client}",
                    experiment_id=EXP,
                    round=8,
                    client_id=client,
                    blob_key=key,
                    sha256="0" * 64,
                    size_bytes=1,
                    num_samples=1,
                )
            )
    deleted = retention.apply_retention(engine, store, settings, swept).deleted
    assert sorted(deleted) == sorted(
        [*_sorted_updates(EXP, 8), state_key(EXP, 7), details_key(EXP, 8, "8" * 64), outcome_key(EXP, 8, "8" * 64)]
    )
    assert _keys(store, f"models/{EXP}") == {model_key(EXP, r) for r in (0, 3, 6, 7, 8)}


def _sorted_updates(exp_id: str, rnd: int) -> list[str]:
    return [update_key(exp_id, rnd, client, "f" * 32) for client in CLIENTS]


def _record_model_row_only(s, exp_id: str, rnd: int) -> None:  # type: ignore[no-untyped-def]
    s.add(
        GlobalModel(
            model_id=model_id_for(exp_id, rnd),
            experiment_id=exp_id,
            round=rnd,
            blob_key=model_key(exp_id, rnd),
            sha256="0" * 64,
            size_bytes=3,
        )
    )


def test_orphans_are_collected_after_the_grace(engine, store: BlobStore, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _experiment(engine, store, EXP, 2)
    with session_scope(engine) as s:
        s.get(Experiment, EXP).status = "completed"  # type: ignore[union-attr]
    referenced = {key for prefix in retention.PREFIXES for key in _keys(store, prefix)}
    orphans = {
        update_key(EXP, 2, "c1", "9" * 32),  # a re-upload replaced it, or its row's commit failed
        model_key(EXP, 3),  # a round that never committed, in a finished experiment
        state_key(EXP, 3),
        model_key("gone", 1),  # an experiment the database does not know
        update_key("gone", 1, "c1", "a" * 32),
    }
    for key in orphans:
        _put(store, key)
    _put(store, "selections/exp-r/round-1-x.json")  # another prefix: never retention's to delete
    assert retention.collect_orphans(engine, store, grace_s=3600).deleted == []  # all younger than the grace
    deleted = retention.collect_orphans(engine, store, grace_s=3600, now=time.time() + 3700).deleted
    assert set(deleted) == orphans
    assert {key for prefix in retention.PREFIXES for key in _keys(store, prefix)} == referenced
    assert store.exists("selections/exp-r/round-1-x.json")


def test_local_store_collects_interrupted_writes(engine, local_store: LocalBlobStore) -> None:  # type: ignore[no-untyped-def]
    _experiment(engine, local_store, EXP, 1)
    with session_scope(engine) as s:
        s.get(Experiment, EXP).status = "failed"  # type: ignore[union-attr]
    folder = local_store.root / "models" / EXP
    tmp = folder / ".round-2.safetensors.abc123.tmp"
    tmp.write_bytes(b"partial")
    (folder / "round-9.safetensors.sha256").write_text("0" * 64)  # a sidecar whose data is gone
    deleted = retention.collect_orphans(engine, local_store, grace_s=10, now=time.time() + 20).deleted
    assert set(deleted) == {f"models/{EXP}/{tmp.name}", model_key(EXP, 9)}
    assert sorted(p.name for p in folder.iterdir()) == [
        "round-0.safetensors",
        "round-0.safetensors.sha256",
        "round-1.safetensors",
        "round-1.safetensors.sha256",
    ]


def test_spool_cleanup_spares_what_may_be_in_use(tmp_path: Path) -> None:
    spool = tmp_path / "tmp"
    spool.mkdir()
    started = time.time()
    old_file, old_dir, fresh = spool / "upload-old", spool / "fedloom-upload-old", spool / "upload-fresh"
    old_file.write_bytes(b"x" * 100)
    old_dir.mkdir()
    (old_dir / "update.safetensors").write_bytes(b"y")
    busy_dir = spool / "fedloom-upload-busy"  # old directory, but a file in it is being written
    busy_dir.mkdir()
    (busy_dir / "update.safetensors").write_bytes(b"z")
    fresh.write_bytes(b"z")
    hour_ago = started - 3600
    for path in (old_file, old_dir / "update.safetensors", old_dir, busy_dir):
        os.utime(path, (hour_ago, hour_ago))
    assert sorted(retention.clean_spool(spool, started)) == ["fedloom-upload-old", "upload-old"]
    assert sorted(p.name for p in spool.iterdir()) == ["fedloom-upload-busy", "upload-fresh"]
    assert retention.clean_spool(tmp_path / "missing", started) == []


def test_global_model_of_a_removed_round_answers_410(local_app, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spool = tmp_path / "tmp"
    spool.mkdir(parents=True)
    stale = spool / "upload-crashed"
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    http = local_app()
    assert not stale.exists()  # removed at start-up
    settings = http.app.state.settings
    engine, blobs = http.app.state.engine, http.app.state.blobs
    _experiment(engine, blobs, EXP, 4)
    retention.apply_retention(engine, blobs, settings, {})  # defaults: the last 3, every 10th
    gone = http.get("/model/global", params={"experiment_id": EXP, "round": 1})
    assert gone.status_code == 410
    error = gone.json()["error"]
    assert error["code"] == "MODEL_REMOVED" and "retention" in error["details"]
    assert http.get("/model/global", params={"experiment_id": EXP, "round": 2}).status_code == 200
    assert http.get("/model/global", params={"experiment_id": EXP, "round": 5}).status_code == 404


def test_create_experiment_takes_a_strict_retention_object(local_app) -> None:  # type: ignore[no-untyped-def]
    from tests.api.test_metrics_experiments import digits_body

    http = local_app()
    body = digits_body(experiment_id="kept", retention={"keep_updates": True, "keep_last_models": 2})
    created = http.post("/experiments", json=body)
    assert created.status_code == 200, created.text
    with session_scope(http.app.state.engine) as s:
        config = s.get(Experiment, "kept").config  # type: ignore[union-attr]
    rules = retention.rules_for(http.app.state.settings, config)
    assert rules == retention.Rules(True, True, 2, http.app.state.settings.keep_model_every)
    bad = http.post("/experiments", json=digits_body(retention={"keep_all": True}))
    assert bad.status_code == 400 and "retention.keep_all" in bad.json()["error"]["details"]


def test_worker_sweep_pass(engine, local_store: LocalBlobStore, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from workers import retention as sweeper

    assert sweeper.orphan_every(_settings(tmp_path)) == 30  # 3600 s grace / 4 / 30 s passes
    assert sweeper.orphan_every(_settings(tmp_path, orphan_grace_s=0)) == 1
    settings = _settings(tmp_path, keep_last_models=1, keep_model_every=0, orphan_grace_s=0)
    _experiment(engine, local_store, EXP, 3)
    with session_scope(engine) as s:
        s.get(Experiment, EXP).status = "completed"  # type: ignore[union-attr]
    _put(local_store, update_key(EXP, 3, "c1", "e" * 32))  # a replaced upload
    swept: dict[str, int] = {}
    # rounds 1-3's six updates, selections and outcomes, models 1 and 2, states 1 and 2; the orphan
    # only when orphans are swept
    assert sweeper.sweep_once(engine, local_store, settings, swept, orphans=False) == 16
    assert sweeper.sweep_once(engine, local_store, settings, swept, orphans=True) == 1
    assert sweeper.sweep_once(engine, local_store, settings, swept, orphans=True) == 0
