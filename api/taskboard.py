"""The task long-poll: what a client should do now, and one shared view of the round state to wait on.

A client asks ``GET /clients/{id}/task?wait=<s>``; the answer is held until it has something to do
(``train``, or ``evaluate`` in a round's federated evaluation phase) or the time is up. Every held
request of an API process waits on one :class:`TaskBoard`, which reads the round state for all of
them, so the database sees one light read per interval however many clients wait.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import update as sa_update
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from fedloom_core.errors import ClientNotRegistered
from fedloom_core.storage.db import Client, ClientEvaluation, Experiment, Round, Update, utcnow
from fedloom_core.storage.keys import model_id_for
from fedloom_core.storage.repo import iso, latest_experiment, running_first, session_scope

# The board is read again when older than this when asked for.
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
# last_seen is written at most this often, so long-polling clients do not write on every request.
LAST_SEEN_RESOLUTION_S = 60.0
# The last_seen marks of an API process's clients are written together this often: one UPDATE instead
# of a write per client (about 170 a second at 10,000 clients, queued behind SQLite's single writer).
LAST_SEEN_FLUSH_S = 1.0
# Clients per UPDATE of a flush.
LAST_SEEN_CHUNK = 500
# A long-poll's first check may be answered from a board this old: the hold that follows re-checks
# as soon as a newer read differs, so the answer is never left stale for longer than the board's age.
QUICK_ANSWER_MAX_AGE_S = 1.0
CHECKED_MAX = 100_000  # bound on the clients remembered as checked against the database

# What decides whether a waiting client's answer can change: (latest experiment id, its status, the
# open round's number if this client was selected for it, else None, the round in federated evaluation
# if this client is one of its evaluators, else None); while several experiments run, these four for
# each of them, the most recently started first.
Signature = tuple[str | int | None, ...]


def read_task(engine: Engine, client_id: str, note_seen: Callable[[str], None] | None = None) -> tuple[dict, Signature]:
    """The client's task now, and the signature of the state it was decided on; marks the client seen.

    While several experiments run, the task is the first one's (most recently started first) that has
    something for this client to do, else ``wait`` naming the most recently started. With
    ``note_seen``, a last_seen that is due is handed to it to be written later with others'.
    """
    with session_scope(engine) as s:
        _mark_seen(s, client_id, note_seen)
        running = list(s.exec(running_first(select(Experiment))).all())
        if not running:
            exp = latest_experiment(s)
            if exp is None:
                return {"status": "idle", "experiment_id": None}, (None, None, None, None)
            body: dict[str, Any] = {"experiment_id": exp.experiment_id, "experiment_status": exp.status}
            body["status"] = "done" if exp.status in ("completed", "stopped", "failed") else "idle"
            return body, (exp.experiment_id, exp.status, None, None)
        answers = [_task_in(s, exp, client_id) for exp in running]
    signature: Signature = tuple(part for _, sig in answers for part in sig)
    task = next((body for body, _ in answers if body["status"] != "wait"), answers[0][0])
    return task, signature


def _task_in(s: Session, exp: Experiment, client_id: str) -> tuple[dict, Signature]:
    """The client's task in one running experiment, and its part of the signature."""
    body: dict[str, Any] = {"experiment_id": exp.experiment_id, "experiment_status": exp.status}
    evaluating = _evaluation_task(s, exp, client_id, body)
    if evaluating is not None:
        return evaluating
    rnd = _open_round_for_task(s, exp.experiment_id)
    if rnd is None or client_id not in rnd.selected_clients:
        body["status"] = "wait"
        return body, (exp.experiment_id, exp.status, None, None)
    signature = (exp.experiment_id, exp.status, rnd.round, None)
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


def _evaluation_task(session: Session, exp, client_id: str, body: dict) -> tuple[dict, Signature] | None:  # type: ignore[no-untyped-def]
    """The ``evaluate`` task (or ``wait`` once reported) when the client is an evaluator of an open phase."""
    rnd = session.exec(
        select(Round.round, Round.evaluators, Round.evaluation_deadline).where(
            Round.experiment_id == exp.experiment_id, Round.evaluation_status == "open"
        )
    ).first()
    if rnd is None or client_id not in (rnd.evaluators or []):
        return None
    signature = (exp.experiment_id, exp.status, None, rnd.round)
    reported = session.exec(
        select(ClientEvaluation.id).where(
            ClientEvaluation.experiment_id == exp.experiment_id,
            ClientEvaluation.round == rnd.round,
            ClientEvaluation.client_id == client_id,
        )
    ).first()
    if reported is not None:
        return {**body, "status": "wait"}, signature
    model_id = model_id_for(exp.experiment_id, rnd.round)
    ec = exp.config.get("experiment_config", {})
    task = {
        **body,
        "status": "evaluate",
        "round": rnd.round,
        "model_id": model_id,
        "download_url": f"/model/download/{model_id}",
        "deadline": iso(rnd.evaluation_deadline),
        "dataset": ec.get("dataset"),
        "model_architecture": ec.get("model_architecture"),
        "model_config": exp.model_config_,
        "training_config": dict(exp.config.get("training_config", {})),
    }
    return task, signature


def _mark_seen(session: Session, client_id: str, note_seen: Callable[[str], None] | None = None) -> None:
    """Note that the client is connected: last_seen (at most every LAST_SEEN_RESOLUTION_S), and active again.

    Reads two columns and writes only when something changes, so most polls stay read-only; a due
    last_seen goes to ``note_seen`` when given (an inactive client is still reactivated at once).
    """
    row = session.exec(select(Client.status, Client.last_seen).where(Client.client_id == client_id)).first()
    if row is None:
        raise ClientNotRegistered("Client ID not found", f"The specified client ID '{client_id}' is not registered")
    now = utcnow()
    seen = row.last_seen.replace(tzinfo=now.tzinfo) if row.last_seen else None
    due = seen is None or (now - seen).total_seconds() > LAST_SEEN_RESOLUTION_S
    if due and note_seen is not None and row.status != "inactive":
        note_seen(client_id)
    elif due or row.status == "inactive":
        # An inactive client is connected again, so it can rejoin a later round.
        status = "active" if row.status == "inactive" else row.status
        session.execute(sa_update(Client).where(Client.client_id == client_id).values(last_seen=now, status=status))


def _open_round_for_task(session: Session, experiment_id: str):  # type: ignore[no-untyped-def]
    """The open round's columns a task needs, without the per-client policy results and exclusions
    (an entry for every registered client, too much to decode on every poll)."""
    return session.exec(
        select(Round.round, Round.selected_clients, Round.global_model_id, Round.deadline, Round.client_config).where(
            Round.experiment_id == experiment_id, Round.status == "open"
        )
    ).first()


def write_last_seen(engine: Engine, client_ids: list[str]) -> None:
    """Set last_seen to now for these clients, in one transaction."""
    now = utcnow()
    with session_scope(engine) as s:
        for i in range(0, len(client_ids), LAST_SEEN_CHUNK):
            chunk = client_ids[i : i + LAST_SEEN_CHUNK]
            s.execute(sa_update(Client).where(Client.client_id.in_(chunk)).values(last_seen=now))  # type: ignore[attr-defined]


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
    # The round whose new model is in federated evaluation, and the clients asked to evaluate it.
    evaluation_round: int | None = None
    evaluators: frozenset[str] = frozenset()
    # The other running experiments (each a board of its own), when several run; this one started last.
    others: tuple[Board, ...] = ()

    def state(self) -> tuple:
        """What the board says, without when it was read."""
        own = (self.experiment_id, self.experiment_status, self.round, self.selected, self.evaluation_round)
        return own + tuple(other.state() for other in self.others)

    def signature(self, client_id: str) -> Signature:
        """What :func:`read_task` would report as its signature for ``client_id`` on this state."""
        own = (
            self.experiment_id,
            self.experiment_status,
            self.round if client_id in self.selected else None,
            self.evaluation_round if client_id in self.evaluators else None,
        )
        return own + tuple(part for other in self.others for part in other.signature(client_id))

    def concerns(self, client_id: str) -> bool:
        """Whether ``client_id`` is selected for, or evaluates, a round of a running experiment."""
        return any(client_id in b.selected or client_id in b.evaluators for b in (self, *self.others))

    def in_gap(self) -> bool:
        """Whether a running experiment is between rounds (none open, none in federated evaluation)."""
        return any(
            b.experiment_status == "running" and b.round is None and b.evaluation_round is None
            for b in (self, *self.others)
        )

    def answer(self) -> dict:
        """What :func:`read_task` answers on this state to a client that is not selected."""
        if self.experiment_id is None:
            return {"status": "idle", "experiment_id": None}
        body: dict[str, Any] = {"experiment_id": self.experiment_id, "experiment_status": self.experiment_status}
        if self.experiment_status == "running":
            body["status"] = "wait"
        else:
            body["status"] = "done" if self.experiment_status in ("completed", "stopped", "failed") else "idle"
        return body


def read_board(engine: Engine) -> Board:
    """Read the shared round state from the database."""
    read_at = time.monotonic()
    with session_scope(engine) as s:
        inactive = frozenset(s.exec(select(Client.client_id).where(Client.status == "inactive")).all())
        running = list(s.exec(running_first(select(Experiment.experiment_id, Experiment.status))).all())
        if len(running) > 1:
            boards = [_experiment_board(s, read_at, exp, inactive) for exp in running]
            return replace(boards[0], others=tuple(boards[1:]))
        exp = latest_experiment(s)
        if exp is None:
            return Board(read_at, inactive=inactive)
        return _experiment_board(s, read_at, exp, inactive)


def _experiment_board(s: Session, read_at: float, exp, inactive: frozenset[str]) -> Board:  # type: ignore[no-untyped-def]
    """One experiment's part of the board."""
    row = evaluation = None
    if exp.status == "running":
        row = s.exec(
            select(Round.round, Round.selected_clients).where(
                Round.experiment_id == exp.experiment_id, Round.status == "open"
            )
        ).first()
        evaluation = s.exec(
            select(Round.round, Round.evaluators).where(
                Round.experiment_id == exp.experiment_id, Round.evaluation_status == "open"
            )
        ).first()
    phase = {}
    if evaluation is not None:
        phase = {"evaluation_round": evaluation.round, "evaluators": frozenset(evaluation.evaluators or [])}
    if row is None:
        return Board(read_at, exp.experiment_id, exp.status, inactive=inactive, **phase)
    return Board(read_at, exp.experiment_id, exp.status, row.round, frozenset(row.selected_clients), inactive, **phase)


class TaskBoard:
    """One shared view of the round state for all the task long-polls held by an API process.

    The state is read at most once per ``TASK_POLL_S`` for everyone (one reader at a time); a waiting
    request re-runs its own task query only when the state it was answered on has changed."""

    def __init__(self, engine: Engine) -> None:
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
        # Clients whose last_seen is due, written together by the flusher (added from worker threads).
        self._seen: set[str] = set()
        self._seen_lock = threading.Lock()
        self._flusher: asyncio.Task | None = None

    async def next_task(self, client_id: str, wait: float, vouched: bool = False) -> dict:
        """The client's task, held up to ``wait`` seconds while it is ``wait`` or ``idle``.

        ``vouched``: the caller authenticated with this client's own key, so the client is registered
        (keys are made with their client) and its first poll needs no database check of its own.
        """
        deadline = time.monotonic() + wait
        # A long-poll that the board can answer starts without a database session; it is held below,
        # so an answer from a board up to QUICK_ANSWER_MAX_AGE_S old is corrected once a newer read differs.
        quick = self.quick_answer(client_id, vouched) if wait >= QUICK_ANSWER_MAX_AGE_S else None
        if quick is not None:
            task, signature, checked_at = quick
        else:
            task, signature, checked_at = await self._ask_database(client_id)
        while task["status"] in ("wait", "idle"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # Until the refresher signals a change: waking every held request each 0.25 s cost a core at 10k clients.
            current = await self.wait_change(remaining)
            # Only a state read after our own answer can tell that the answer is out of date.
            if current.read_at >= checked_at and current.signature(client_id) != signature:
                # A change that cannot concern this client (an experiment started or ended, a round it is
                # not in opened or closed) is answered from the board too, so the selected clients'
                # queries do not queue behind every other waiter's.
                quick = self.quick_answer(client_id, vouched)
                if quick is not None and quick[2] >= checked_at:
                    task, signature, checked_at = quick
                    continue
                task, signature, checked_at = await self._ask_database(client_id)
        return task

    async def _ask_database(self, client_id: str) -> tuple[dict, Signature, float]:
        """Run the client's task query; return its answer, signature and when it began."""
        checked_at = time.monotonic()
        task, signature = await run_in_threadpool(read_task, self.engine, client_id, self.note_seen)
        self.checked(client_id, checked_at)
        self._start_flusher()
        return task, signature, checked_at

    def _start_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_seen_loop())

    def note_seen(self, client_id: str) -> None:
        with self._seen_lock:  # called from worker threads
            self._seen.add(client_id)

    async def flush_seen(self) -> int:
        """Write the queued last_seen marks (one UPDATE per LAST_SEEN_CHUNK clients); how many."""
        with self._seen_lock:
            pending, self._seen = self._seen, set()
        if pending:
            await run_in_threadpool(write_last_seen, self.engine, sorted(pending))
        return len(pending)

    async def _flush_seen_loop(self) -> None:
        while True:
            await asyncio.sleep(LAST_SEEN_FLUSH_S)
            if not await self.flush_seen():
                return  # nothing queued: the next database answer starts the flusher again

    def checked(self, client_id: str, at: float) -> None:
        """Remember that ``client_id`` exists and had its last_seen refreshed at ``at``."""
        if len(self._checked) > CHECKED_MAX:
            self._checked.clear()
        self._checked[client_id] = at

    def quick_answer(self, client_id: str, vouched: bool = False) -> tuple[dict, Signature, float] | None:
        """The answer to a check from the board alone, when the database could add nothing.

        That is when the board is fresh, the client was checked against the database within
        ``LAST_SEEN_RESOLUTION_S`` (so it exists and its last_seen is current) or is ``vouched`` for
        by its own key (then its last_seen is queued for the next flush), is not inactive and is not
        selected for the open round; it spares the database a session per request (at 10,000 clients,
        their first polls' queries kept the selected ones waiting). Returns (answer, signature, read_at).
        """
        board = self._board
        now = time.monotonic()
        if board is None or now - board.read_at >= QUICK_ANSWER_MAX_AGE_S:
            return None
        if client_id in board.inactive or board.concerns(client_id):
            return None
        checked = self._checked.get(client_id)
        if checked is None or now - checked >= LAST_SEEN_RESOLUTION_S:
            if not vouched:
                return None
            self.note_seen(client_id)
            self.checked(client_id, now)
            self._start_flusher()
        return board.answer(), board.signature(client_id), board.read_at

    async def current(self) -> Board:
        """The board, read again if it was older than ``TASK_POLL_S`` when asked for.

        Callers queued behind a read take its result, so a slow read is not repeated once per caller.
        """
        asked = time.monotonic()
        board = self._board
        if board is not None and asked - board.read_at < TASK_POLL_S:
            return board
        async with self._lock:
            board = self._board
            if board is None or asked - board.read_at >= TASK_POLL_S:
                board = self._board = await asyncio.to_thread(read_board, self.engine)
        return board

    async def wait_change(self, timeout: float) -> Board:
        """The board once it next changes, or after ``timeout``, whichever comes first.

        One refresher reads the state every ``BOARD_REFRESH_S`` while anyone waits and wakes every
        waiter when it changes.
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
            # Not behind the requests queued for the API's threads: a stale board sends every poll to the database.
            board = self._board = await asyncio.to_thread(read_board, self.engine)
            if before is None or board.state() != before.state():
                self._changed.set()
                self._changed = asyncio.Event()
            await asyncio.sleep(self._interval(board))

    def _interval(self, board: Board) -> float:
        """How long to sleep before the next read: shorter while a running experiment is between rounds."""
        # An evaluation phase is not a gap between rounds: clients are busy evaluating.
        if not board.in_gap():
            self._gap_since = None
            return BOARD_REFRESH_S
        if self._gap_since is None:
            self._gap_since = board.read_at
        return BOARD_REFRESH_FAST_S if board.read_at - self._gap_since < BOARD_FAST_WINDOW_S else BOARD_REFRESH_S
