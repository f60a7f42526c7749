"""Client registration, status, and the round task a client polls for."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import update as sa_update
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from api import openapi
from api.auth import store_client_key
from api.deps import AdminDep, EngineDep, PrincipalDep, RegistrarDep, valid_id
from fedloom_core.errors import ClientNotRegistered, Conflict, InvalidRequest, NotFound
from fedloom_core.ids import check_id
from fedloom_core.policy.selection import Candidate, select_clients
from fedloom_core.storage.db import Client, ClientMetrics, Experiment, Round, Update, utcnow
from fedloom_core.storage.repo import (
    current_round,
    emit_event,
    iso,
    latest_experiment,
    running_experiment,
    session_scope,
)

router = APIRouter(tags=["clients"])
TASK_POLL_S = 0.25
# While task requests are held, the shared round state is re-read this often and a change wakes them
# at once: clients learn of a new round within about this long, at one light read per interval.
BOARD_REFRESH_S = 0.05
# Between two rounds of a running experiment (no round open: the last one is being processed or the
# next selected) the next round is usually a few hundred milliseconds away, so the state is read this
# often instead, for at most BOARD_FAST_WINDOW_S after the gap was first seen (a selection that waits
# for clients to register goes back to the normal interval).
BOARD_REFRESH_FAST_S = 0.01
BOARD_FAST_WINDOW_S = 3.0
# last_seen is written at most this often, so long-polling clients do not write on every request
# (at 5 s, 1,000 clients polling every 10 s made 100 SQLite write transactions a second).
LAST_SEEN_RESOLUTION_S = 60.0
# A long-poll's first check may be answered from a board this old: the hold that follows re-checks
# as soon as a newer read differs, so the answer is never left stale for longer than the board's age.
QUICK_ANSWER_MAX_AGE_S = 1.0
CLIENT_STATUSES = ("registered", "active", "inactive")


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    client_id: str
    client_config: dict[str, Any] = Field(default_factory=dict)
    capabilities: dict[str, Any] = Field(default_factory=dict)
    location: dict[str, Any] = Field(default_factory=dict)

    @field_validator("client_id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_id(v, "client_id")


def _register(engine, body: RegisterRequest) -> dict:  # type: ignore[no-untyped-def]
    now = utcnow()
    client = Client(
        client_id=body.client_id,
        registration_id=f"reg_{secrets.token_hex(6)}",
        client_config=body.client_config,
        capabilities=body.capabilities,
        location=body.location,
        registered_at=now,
        last_seen=now,
    )
    try:
        with session_scope(engine) as s:
            if s.get(Client, body.client_id) is not None:
                raise Conflict("Resource already exists", f"client '{body.client_id}' is already registered")
            s.add(client)
            exp = running_experiment(s)
            emit_event(s, type="client_registered", client_id=body.client_id, status="registered")
            assigned = (exp.current_round + 1) if exp else 1
    except IntegrityError:
        raise Conflict("Resource already exists", f"client '{body.client_id}' is already registered") from None
    key = store_client_key(engine, body.client_id)
    return {
        "client_id": body.client_id,
        "registration_id": client.registration_id,
        "status": "registered",
        "assigned_round": assigned,
        "client_config": body.client_config,
        "api_key": key,
        "timestamp": iso(now),
    }


@router.post(
    "/clients/register",
    responses=openapi.ok(openapi.REGISTER_RESPONSE, 400, 409),
)
async def register_client(
    body: Annotated[RegisterRequest, Body(openapi_examples=openapi.body(openapi.REGISTER_REQUEST))],
    engine: EngineDep,
    _: RegistrarDep,
) -> dict:
    """Register a new FL client (admin key or enrollment token); the answer carries its own API key, shown once."""
    return await run_in_threadpool(_register, engine, body)


def _client_status(engine, client_id: str) -> dict:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        client = s.get(Client, client_id)
        if client is None:
            raise ClientNotRegistered("Client ID not found", f"The specified client ID '{client_id}' is not registered")
        last = s.exec(
            select(ClientMetrics).where(ClientMetrics.client_id == client_id).order_by(ClientMetrics.created_at.desc())  # type: ignore[attr-defined]
        ).first()
    return {
        "client_id": client.client_id,
        "status": client.status,
        "current_round": client.current_round,
        "last_update": iso(client.last_update),
        "performance_metrics": {
            "local_accuracy": last.local_accuracy if last else None,
            "training_time": last.training_time if last else None,
            "communication_time": last.communication_time if last else None,
            "data_size": last.data_samples if last else 0,
        },
        "trust_score": client.trust_score,
        "contribution_score": client.contribution_score,
    }


def _experiment_or_latest(session, experiment_id: str | None) -> Experiment | None:  # type: ignore[no-untyped-def]
    if experiment_id is None:
        return latest_experiment(session)
    exp = session.get(Experiment, experiment_id)
    if exp is None:
        raise NotFound("Resource not found", f"experiment '{experiment_id}' does not exist")
    return exp


def _list_clients(engine, status: str | None, round: int | None, experiment_id: str | None) -> dict:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        query = select(Client)
        if status is not None:
            query = query.where(Client.status == status)
        if round is not None or experiment_id is not None:
            exp = _experiment_or_latest(s, experiment_id)
            took_part: set[str] = set()
            if exp is not None:
                uq = select(Update.client_id).where(
                    Update.experiment_id == exp.experiment_id, Update.validation_status != "rejected"
                )
                if round is not None:
                    uq = uq.where(Update.round == round)
                took_part = set(s.exec(uq).all())
            query = query.where(Client.client_id.in_(took_part))  # type: ignore[attr-defined]
        clients = s.exec(query.order_by(Client.client_id)).all()
    return {
        "clients": [
            {
                "client_id": c.client_id,
                "status": c.status,
                "current_round": c.current_round,
                "trust_score": c.trust_score,
            }
            for c in clients
        ],
        "total_count": len(clients),
        "active_count": sum(1 for c in clients if c.status == "active"),
        "timestamp": iso(utcnow()),
    }


@router.get("/clients", responses=openapi.ok(openapi.CLIENTS_LIST, 400))
async def list_clients(
    engine: EngineDep,
    _: AdminDep,
    status: str | None = Query(default=None),
    round: int | None = Query(default=None, ge=1),
    experiment_id: str | None = Query(default=None),
) -> dict:
    """All clients, filtered by ``status`` and by taking part in a ``round`` of an experiment (default: the latest).

    Taking part means having uploaded an update to that round that was not rejected; ``experiment_id``
    without ``round`` keeps the clients that took part in any of its rounds. ``total_count`` and
    ``active_count`` count the clients matching the filters.
    """
    if status is not None and status not in CLIENT_STATUSES:
        raise InvalidRequest("Invalid status filter", f"status {status!r} is not one of {', '.join(CLIENT_STATUSES)}")
    if experiment_id is not None:
        valid_id(experiment_id, "experiment_id")
    return await run_in_threadpool(_list_clients, engine, status, round, experiment_id)


def _default_round(exp: Experiment, latest: Round | None) -> int:
    """The round in progress, else the next one to select (the last one once the experiment is over)."""
    if latest is None:
        return 1
    if latest.status in ("open", "closed"):
        return latest.round
    if exp.status in ("created", "running") and (not exp.total_rounds or latest.round < exp.total_rounds):
        return latest.round + 1
    return latest.round


def _selection(engine, experiment_id: str | None, round: int | None, policy_check: bool) -> dict:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        exp = _experiment_or_latest(s, experiment_id)
        if exp is None:
            raise NotFound("Resource not found", "no experiment has been created or started")
        if round is None:
            round = _default_round(exp, current_round(s, exp.experiment_id))
        elif exp.total_rounds and round > exp.total_rounds:
            raise InvalidRequest(
                "Invalid round", f"round {round} is beyond experiment '{exp.experiment_id}''s {exp.total_rounds} rounds"
            )
        stored = s.exec(select(Round).where(Round.experiment_id == exp.experiment_id, Round.round == round)).first()
        candidates = (
            [Candidate(c.client_id, c.status, c.trust_score) for c in s.exec(select(Client)).all()]
            if stored is None
            else []
        )
    if stored is not None:
        selected, excluded = list(stored.selected_clients), dict(stored.exclusions)
        results = dict(stored.policy_results)
    else:
        ec = exp.config.get("experiment_config", {})
        outcome = select_clients(
            candidates,
            round=round,
            min_clients=int(ec.get("min_clients", 2)),
            client_fraction=float(ec.get("client_fraction", 1.0)),
            seed=int(ec.get("seed", 0)),
            trust_threshold=(exp.policy_config or {}).get("trust_threshold"),
        )
        selected, excluded, results = outcome.selected, outcome.excluded, outcome.policy_results
    return {
        "experiment_id": exp.experiment_id,
        "round": round,
        "dry_run": stored is None,
        "selected_clients": selected,
        "policy_results": results if policy_check else {},
        "excluded_clients": sorted(excluded),
        "exclusion_reasons": excluded,
        "eligible_count": sum(1 for r in results.values() if r.get("compliance")),
    }


@router.get("/clients/select", responses=openapi.ok(openapi.SELECTION, 400, 404))
async def select_round_clients(
    engine: EngineDep,
    _: AdminDep,
    round: int | None = Query(default=None, ge=1),
    policy_check: bool = Query(default=True),
    experiment_id: str | None = Query(default=None),
) -> dict:
    """Policy-aware client selection of a round of an experiment (default: the latest).

    A round that has been selected answers with its stored decision (``dry_run`` false); any other
    round (by default the round in progress, else the next one) is a dry run of the same selection
    over the clients as they are now, with the experiment's min_clients, client_fraction, seed and
    trust threshold. ``policy_check=false`` leaves out ``policy_results``; the selection is the same.
    """
    if experiment_id is not None:
        valid_id(experiment_id, "experiment_id")
    return await run_in_threadpool(_selection, engine, experiment_id, round, policy_check)


@router.get("/clients/{client_id}", responses=openapi.ok(openapi.CLIENT_STATUS, 400, 404))
async def get_client(client_id: str, engine: EngineDep, principal: PrincipalDep) -> dict:
    """A client's status, last performance, trust and contribution."""
    valid_id(client_id, "client_id")
    principal.require_client(client_id)
    return await run_in_threadpool(_client_status, engine, client_id)


# What decides whether a waiting client's answer can change: (latest experiment id, its status, the
# open round's number if this client was selected for it, else None).
Signature = tuple[str | None, str | None, int | None]


def _task(engine, client_id: str) -> tuple[dict, Signature]:  # type: ignore[no-untyped-def]
    """The client's task now, and the signature of the state it was decided on."""
    with session_scope(engine) as s:
        _mark_seen(s, client_id)
        exp = latest_experiment(s)
        if exp is None:
            return {"status": "idle", "experiment_id": None}, (None, None, None)
        body: dict[str, Any] = {"experiment_id": exp.experiment_id, "experiment_status": exp.status}
        if exp.status != "running":
            body["status"] = "done" if exp.status in ("completed", "stopped", "failed") else "idle"
            return body, (exp.experiment_id, exp.status, None)
        rnd = _open_round_for_task(s, exp.experiment_id)
        if rnd is None or client_id not in rnd.selected_clients:
            body["status"] = "wait"
            return body, (exp.experiment_id, exp.status, None)
        signature = (exp.experiment_id, exp.status, rnd.round)
        uploaded = s.exec(
            select(Update.update_id).where(
                Update.experiment_id == exp.experiment_id, Update.round == rnd.round, Update.client_id == client_id
            )
        ).first()
        if uploaded is not None:
            body["status"] = "wait"
            return body, signature
        cfg = exp.config
        ec = cfg.get("experiment_config", {})
        body.update(
            status="train",
            round=rnd.round,
            model_id=rnd.global_model_id,
            download_url=f"/model/download/{rnd.global_model_id}",
            deadline=iso(rnd.deadline),
            dataset=ec.get("dataset"),
            model_architecture=ec.get("model_architecture"),
            model_config=exp.model_config_,
            # The experiment's settings, with this client's own for the round (strategy, configure rules) on top.
            training_config={**cfg.get("training_config", {}), **rnd.client_config.get(client_id, {})},
        )
        return body, signature


def _mark_seen(session, client_id: str) -> None:  # type: ignore[no-untyped-def]
    """Note that the client is connected: last_seen (at most every LAST_SEEN_RESOLUTION_S), and active again.

    Reads two columns and writes only when something changes, so most polls stay read-only.
    """
    row = session.exec(select(Client.status, Client.last_seen).where(Client.client_id == client_id)).first()
    if row is None:
        raise ClientNotRegistered("Client ID not found", f"The specified client ID '{client_id}' is not registered")
    now = utcnow()
    seen = row.last_seen.replace(tzinfo=now.tzinfo) if row.last_seen else None
    if seen is None or (now - seen).total_seconds() > LAST_SEEN_RESOLUTION_S or row.status == "inactive":
        # An inactive client is connected again, so it can rejoin a later round.
        status = "active" if row.status == "inactive" else row.status
        session.execute(sa_update(Client).where(Client.client_id == client_id).values(last_seen=now, status=status))


def _open_round_for_task(session, experiment_id: str):  # type: ignore[no-untyped-def]
    """The open round's columns a task needs, without the per-client policy results and exclusions.

    Those two JSON columns hold an entry for every registered client; decoding them on every poll
    was most of the API's time with 1,000 clients long-polling.
    """
    return session.exec(
        select(Round.round, Round.selected_clients, Round.global_model_id, Round.deadline, Round.client_config).where(
            Round.experiment_id == experiment_id, Round.status == "open"
        )
    ).first()


@dataclass(frozen=True)
class Board:
    """The state every waiting client's answer depends on, read once for all of them."""

    read_at: float  # time.monotonic() when the read began
    experiment_id: str | None = None
    experiment_status: str | None = None
    round: int | None = None
    selected: frozenset[str] = frozenset()
    # Clients marked inactive: their next task request must go to the database to reactivate them.
    inactive: frozenset[str] = frozenset()

    def state(self) -> tuple:
        """What the board says, without when it was read."""
        return (self.experiment_id, self.experiment_status, self.round, self.selected)

    def signature(self, client_id: str) -> Signature:
        """What :func:`_task` would report as its signature for ``client_id`` on this state."""
        return (self.experiment_id, self.experiment_status, self.round if client_id in self.selected else None)

    def answer(self) -> dict:
        """What :func:`_task` answers on this state to a client that is not selected."""
        if self.experiment_id is None:
            return {"status": "idle", "experiment_id": None}
        body: dict[str, Any] = {"experiment_id": self.experiment_id, "experiment_status": self.experiment_status}
        if self.experiment_status == "running":
            body["status"] = "wait"
        else:
            body["status"] = "done" if self.experiment_status in ("completed", "stopped", "failed") else "idle"
        return body


def _read_board(engine) -> Board:  # type: ignore[no-untyped-def]
    read_at = time.monotonic()
    with session_scope(engine) as s:
        inactive = frozenset(s.exec(select(Client.client_id).where(Client.status == "inactive")).all())
        exp = latest_experiment(s)
        if exp is None:
            return Board(read_at, inactive=inactive)
        row = None
        if exp.status == "running":
            row = s.exec(
                select(Round.round, Round.selected_clients).where(
                    Round.experiment_id == exp.experiment_id, Round.status == "open"
                )
            ).first()
    if row is None:
        return Board(read_at, exp.experiment_id, exp.status, inactive=inactive)
    return Board(read_at, exp.experiment_id, exp.status, row.round, frozenset(row.selected_clients), inactive)


class TaskBoard:
    """One shared view of the round state for all the task long-polls held by an API process.

    Each held request used to re-run the whole task query every ``TASK_POLL_S``: with N clients
    waiting that is 4N database sessions a second. Now the state is read at most once per
    ``TASK_POLL_S`` for everyone (one reader at a time), and a waiting request re-runs its own task
    query only when the state it was answered on has changed.
    """

    def __init__(self, engine) -> None:  # type: ignore[no-untyped-def]
        self.engine = engine
        self._board: Board | None = None
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._held = 0
        self._refresher: asyncio.Task | None = None
        # When the refresher first saw the running experiment with no round open (None: a round is open).
        self._gap_since: float | None = None
        # client id -> when this process last answered it from the database (which also marks it seen).
        self._checked: dict[str, float] = {}

    def checked(self, client_id: str, at: float) -> None:
        """Remember that ``client_id`` exists and had its last_seen refreshed at ``at``."""
        if len(self._checked) > 100_000:
            self._checked.clear()
        self._checked[client_id] = at

    def quick_answer(self, client_id: str) -> tuple[dict, Signature, float] | None:
        """The answer to a long-poll's first check from the board alone, when the database could add nothing.

        That is when the board is fresh, the client was checked against the database within
        ``LAST_SEEN_RESOLUTION_S`` (so it exists and its last_seen is current), is not inactive
        and is not selected for the open round. With 1,000 clients polling, this spares the
        database one session per request. Returns (answer, signature, when the state was read).
        """
        board = self._board
        now = time.monotonic()
        if board is None or now - board.read_at >= QUICK_ANSWER_MAX_AGE_S:
            return None
        checked = self._checked.get(client_id)
        if checked is None or now - checked >= LAST_SEEN_RESOLUTION_S:
            return None
        if client_id in board.inactive or client_id in board.selected:
            return None
        return board.answer(), board.signature(client_id), board.read_at

    async def current(self) -> Board:
        """The board, read again if it was older than ``TASK_POLL_S`` when asked for.

        Callers queued behind a read take its result: re-reading once per caller whenever a read
        took longer than ``TASK_POLL_S`` (a busy machine) made 1,000 held requests file through
        the lock one read each, and long-polls came back tens of seconds late.
        """
        asked = time.monotonic()
        board = self._board
        if board is not None and asked - board.read_at < TASK_POLL_S:
            return board
        async with self._lock:
            board = self._board
            if board is None or asked - board.read_at >= TASK_POLL_S:
                board = self._board = await run_in_threadpool(_read_board, self.engine)
        return board

    async def wait_change(self, timeout: float) -> Board:
        """The board once it next changes, or after ``timeout``, whichever comes first.

        Sleeping a fixed ``TASK_POLL_S`` between checks made a client learn of its round up to two
        intervals late; now one refresher reads the state every ``BOARD_REFRESH_S`` while anyone
        waits and wakes every waiter when it changes.
        """
        self._held += 1
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.create_task(self._refresh())
        changed = self._changed
        try:
            await asyncio.wait_for(changed.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self._held -= 1
        return await self.current()

    async def _refresh(self) -> None:
        while self._held > 0:
            before = self._board
            board = self._board = await run_in_threadpool(_read_board, self.engine)
            if before is None or board.state() != before.state():
                self._changed.set()
                self._changed = asyncio.Event()
            await asyncio.sleep(self._interval(board))

    def _interval(self, board: Board) -> float:
        """How long to sleep before the next read: shorter while a running experiment is between rounds."""
        if board.experiment_status != "running" or board.round is not None:
            self._gap_since = None
            return BOARD_REFRESH_S
        if self._gap_since is None:
            self._gap_since = board.read_at
        return BOARD_REFRESH_FAST_S if board.read_at - self._gap_since < BOARD_FAST_WINDOW_S else BOARD_REFRESH_S


def _task_board(request: Request, engine) -> TaskBoard:  # type: ignore[no-untyped-def]
    """The app's task board, made on first use (and again if the app got a new engine)."""
    board = getattr(request.app.state, "task_board", None)
    if board is None or board.engine is not engine:
        board = request.app.state.task_board = TaskBoard(engine)
    return board


@router.get("/clients/{client_id}/task", responses=openapi.errors(400, 404))
async def get_client_task(
    client_id: str,
    request: Request,
    engine: EngineDep,
    principal: PrincipalDep,
    wait: float = Query(default=0.0, ge=0.0, le=30.0, description="long-poll: seconds to wait for work"),
) -> dict:
    """Extension: what this client should do now (``train`` with the round's model and config, ``wait``, ``done``).

    With ``wait`` > 0 the answer is held until there is something to do or the time is up, so a
    client needs few requests (and little of its rate budget) while it waits to be selected.
    """
    valid_id(client_id, "client_id")
    principal.require_client(client_id)
    deadline = time.monotonic() + wait
    board = _task_board(request, engine)
    # A long-poll that the board can answer starts without a database session; it is held below,
    # so an answer from a board up to QUICK_ANSWER_MAX_AGE_S old is corrected once a newer read differs.
    quick = board.quick_answer(client_id) if wait >= QUICK_ANSWER_MAX_AGE_S else None
    if quick is not None:
        task, signature, checked_at = quick
    else:
        checked_at = time.monotonic()
        task, signature = await run_in_threadpool(_task, engine, client_id)
        board.checked(client_id, checked_at)
    while task["status"] in ("wait", "idle"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        current = await board.wait_change(min(TASK_POLL_S, remaining))
        # Only a state read after our own answer can tell that the answer is out of date.
        if current.read_at >= checked_at and current.signature(client_id) != signature:
            # A change that cannot concern this client (an experiment started or ended, a round it is
            # not in opened or closed) is answered from the board too: re-running every waiter's
            # query at once at each change made the selected clients queue behind 1,000 others.
            quick = board.quick_answer(client_id)
            if quick is not None and quick[2] >= checked_at:
                task, signature, checked_at = quick
                continue
            checked_at = time.monotonic()
            task, signature = await run_in_threadpool(_task, engine, client_id)
            board.checked(client_id, checked_at)
    return task
