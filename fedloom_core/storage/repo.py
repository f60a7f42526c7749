"""Queries and writes shared by the API and the activities."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import defer
from sqlmodel import Session, select

from fedloom_core.storage.db import Event, Experiment, GlobalModel, Round, utcnow


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def iso(ts: datetime | None) -> str | None:
    """ISO-8601 UTC with a trailing Z (naive datetimes from SQLite are UTC)."""
    if ts is None:
        return None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def emit_event(
    session: Session, *, type: str, experiment_id: str | None = None, client_id: str | None = None, **payload: Any
) -> Event:
    """Append an event to the log that WebSocket listeners tail; committed with the session."""
    now = utcnow()
    body = {"type": type, **({"experiment_id": experiment_id} if experiment_id else {}), **payload}
    if client_id and "client_id" not in body:
        body["client_id"] = client_id
    body["timestamp"] = iso(now)
    event = Event(type=type, experiment_id=experiment_id, client_id=client_id, payload=body, created_at=now)
    session.add(event)
    return event


def running_first(query):  # type: ignore[no-untyped-def]
    """``query`` over experiments narrowed to the running ones, the most recently started first."""
    return query.where(Experiment.status == "running").order_by(Experiment.started_at.desc().nulls_last())  # type: ignore[union-attr]


# The PostgreSQL advisory lock that start decisions take in turn (any fixed number of this project's).
_START_LOCK_KEY = 7263002


def serialize_starts(session: Session) -> None:
    """Hold every other start decision back until this session's transaction ends.

    Call it first in the transaction that counts the running experiments and marks one running, so two
    starts cannot both see room under the limit. PostgreSQL takes a transaction-scoped advisory lock;
    SQLite opens the write transaction now (one writer at a time), so the count read next is the newest.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _START_LOCK_KEY})
    else:
        session.execute(text("UPDATE experiment SET status = status WHERE experiment_id IS NULL"))


def running_experiment(session: Session) -> Experiment | None:
    """The experiment that is running now, if any."""
    return session.exec(running_first(select(Experiment)).limit(1)).first()


def latest_experiment(session: Session) -> Experiment | None:
    """The running experiment, else the one started most recently, else the one created most recently."""
    exp = running_experiment(session)
    if exp is not None:
        return exp
    started = session.exec(
        select(Experiment)
        .where(Experiment.started_at.is_not(None))  # type: ignore[union-attr]
        .order_by(Experiment.started_at.desc())  # type: ignore[union-attr]
        .limit(1)
    ).first()
    if started is not None:
        return started
    return session.exec(select(Experiment).order_by(Experiment.created_at.desc()).limit(1)).first()  # type: ignore[attr-defined]


def _light_round():  # type: ignore[no-untyped-def]
    """Load options that leave out a round's ``policy_results`` and ``exclusions`` until they are read.

    Both hold an entry per registered client (large with many clients) and the frequent readers
    (uploads, task polls, training status) never need them; read inside the session they still load.
    """
    return (defer(Round.policy_results), defer(Round.exclusions))  # type: ignore[arg-type]


def open_round(session: Session, experiment_id: str) -> Round | None:
    """The round of ``experiment_id`` that is taking uploads, if any."""
    return session.exec(
        select(Round).where(Round.experiment_id == experiment_id, Round.status == "open").options(*_light_round())
    ).first()


def current_round(session: Session, experiment_id: str) -> Round | None:
    """The most recent round of an experiment."""
    return session.exec(
        select(Round)
        .where(Round.experiment_id == experiment_id)
        .order_by(Round.round.desc())  # type: ignore[attr-defined]
        .options(*_light_round())
        .limit(1)
    ).first()


def latest_model(session: Session, experiment_id: str, round: int | None = None) -> GlobalModel | None:
    """The global model of a round, or the newest one; raises ``ModelRemoved`` (410) for a round's model
    that the retention rules deleted."""
    query = select(GlobalModel).where(GlobalModel.experiment_id == experiment_id)
    if round is not None:
        query = query.where(GlobalModel.round == round)
    found = session.exec(query.order_by(GlobalModel.round.desc())).first()  # type: ignore[attr-defined]
    if found is None and round is not None:
        from fedloom_core.storage.retention import removed_model_error  # retention itself uses this module

        error = removed_model_error(session, experiment_id, round)
        if error is not None:
            raise error
    return found
