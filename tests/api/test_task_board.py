"""The shared round-state reader behind the task long-polls: how often it re-reads the database."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import event, update
from sqlmodel import select

from api.taskboard import (
    BOARD_FAST_WINDOW_S,
    BOARD_REFRESH_FAST_S,
    BOARD_REFRESH_S,
    Board,
    TaskBoard,
)


def test_reads_fast_only_while_a_running_experiment_is_between_rounds() -> None:
    board = TaskBoard(engine=None)
    open_round = Board(10.0, "e1", "running", 3, frozenset({"a"}))
    assert board._interval(open_round) == BOARD_REFRESH_S
    # Round 3 closed, round 4 not open yet: the change clients wait for is close, read often.
    assert board._interval(Board(10.5, "e1", "running")) == BOARD_REFRESH_FAST_S
    assert board._interval(Board(10.5 + BOARD_FAST_WINDOW_S / 2, "e1", "running")) == BOARD_REFRESH_FAST_S
    # A gap longer than the window (a selection waiting for clients) goes back to the normal pace...
    assert board._interval(Board(10.6 + BOARD_FAST_WINDOW_S, "e1", "running")) == BOARD_REFRESH_S
    # ...and the window starts again at the next gap.
    assert board._interval(Board(20.0, "e1", "running", 4, frozenset({"a"}))) == BOARD_REFRESH_S
    assert board._interval(Board(22.0, "e1", "running")) == BOARD_REFRESH_FAST_S
    # No running experiment: nothing is about to open.
    assert board._interval(Board(23.0, "e1", "completed")) == BOARD_REFRESH_S
    assert board._interval(Board(24.0)) == BOARD_REFRESH_S
    assert BOARD_REFRESH_FAST_S < BOARD_REFRESH_S


def test_a_board_of_several_experiments_tells_each_clients_part() -> None:
    other = Board(5.0, "e1", "running", 2, frozenset({"b"}))
    board = Board(5.0, "e2", "running", 7, frozenset({"a"}), others=(other,))
    # A client's signature covers every running experiment, so a round opening in either wakes it.
    assert board.signature("a") == ("e2", "running", 7, None, "e1", "running", None, None)
    assert board.signature("b") == ("e2", "running", None, None, "e1", "running", 2, None)
    assert board.concerns("a") and board.concerns("b") and not board.concerns("c")
    assert board.state() != Board(5.0, "e2", "running", 7, frozenset({"a"})).state()
    # The quick answer for a client in neither names the most recently started experiment.
    assert board.answer() == {"experiment_id": "e2", "experiment_status": "running", "status": "wait"}
    # Between two rounds of either experiment, the board is read at the fast interval.
    assert not board.in_gap()
    assert Board(6.0, "e2", "running", 7, frozenset({"a"}), others=(Board(6.0, "e1", "running"),)).in_gap()
    assert TaskBoard(engine=None)._interval(Board(6.0, "e2", "running", others=(other,))) == BOARD_REFRESH_FAST_S


def test_the_clients_last_seen_marks_are_written_together_and_an_inactive_client_is_reactivated_at_once(
    local_app,
) -> None:  # type: ignore[no-untyped-def]
    from fedloom_core.storage.db import Client, utcnow
    from fedloom_core.storage.repo import session_scope

    admin = local_app()
    ids = [f"seen-{i}" for i in range(5)]
    for cid in ids:
        assert admin.post("/clients/register", json={"client_id": cid}).status_code == 200
    engine = admin.app.state.engine
    long_ago = utcnow() - timedelta(minutes=10)
    with session_scope(engine) as s:
        s.execute(update(Client).values(last_seen=long_ago))
        s.execute(update(Client).where(Client.client_id == "seen-4").values(status="inactive"))
    updates: list[str] = []
    event.listen(
        engine,
        "before_cursor_execute",
        lambda _c, _cur, sql, *_a: updates.append(sql) if sql.lstrip().upper().startswith("UPDATE") else None,
    )

    def seen() -> dict[str, tuple]:
        with session_scope(engine) as s:
            return {c.client_id: (c.status, c.last_seen > long_ago) for c in s.exec(select(Client))}

    async def polls() -> int:
        board = TaskBoard(engine)
        for cid in ids:
            await board._ask_database(cid)
        before = seen()
        # The inactive client was written at once (it must be able to rejoin), the others not yet.
        assert before == {**{c: ("registered", False) for c in ids[:4]}, "seen-4": ("active", True)}
        assert len(updates) == 1
        flushed = await board.flush_seen()
        assert await board.flush_seen() == 0  # nothing left queued
        return flushed

    assert asyncio.run(polls()) == 4
    assert len(updates) == 2  # the four marks in one UPDATE
    assert seen() == {**{c: ("registered", True) for c in ids[:4]}, "seen-4": ("active", True)}


def test_a_client_vouched_for_by_its_own_key_is_answered_from_the_board_on_its_first_poll() -> None:
    import time

    async def check() -> None:
        board = TaskBoard(engine=None)
        board._board = Board(time.monotonic(), "e1", "running", 3, frozenset({"a"}), inactive=frozenset({"z"}))
        assert board.quick_answer("b") is None  # never checked: only the database can tell it exists
        answer, signature, _ = board.quick_answer("b", vouched=True)
        assert answer == {"experiment_id": "e1", "experiment_status": "running", "status": "wait"}
        assert signature == ("e1", "running", None, None)
        assert board._seen == {"b"}  # its last_seen goes out with the next flush
        assert board.quick_answer("b") is not None  # now checked for LAST_SEEN_RESOLUTION_S
        # Selected for the open round, or inactive (to be reactivated): the database answers.
        assert board.quick_answer("a", vouched=True) is None
        assert board.quick_answer("z", vouched=True) is None
        assert board._seen == {"b"}

    asyncio.run(check())


def test_held_requests_sleep_until_the_state_changes(local_app, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import time

    admin = local_app()
    ids = [f"held-{i}" for i in range(10)]
    for cid in ids:
        assert admin.post("/clients/register", json={"client_id": cid}).status_code == 200
    looks = []
    real = Board.signature
    monkeypatch.setattr(Board, "signature", lambda self, cid: looks.append(cid) or real(self, cid))

    async def hold() -> list[dict]:
        board = TaskBoard(admin.app.state.engine)
        board._board = await board.current()
        started = time.monotonic()
        answers = await asyncio.gather(*(board.next_task(cid, 1.5, vouched=True) for cid in ids))
        assert time.monotonic() - started >= 1.5  # held to the end: nothing changed
        return answers

    assert all(a["status"] == "idle" for a in asyncio.run(hold()))
    # One look when answered and one when the hold ends; waking every 0.25 s would be about 7 each.
    assert len(looks) <= 2 * len(ids), len(looks)


def test_the_board_is_read_beside_the_requests_queued_for_the_api_threads(local_app) -> None:  # type: ignore[no-untyped-def]
    import threading

    import anyio
    from fastapi.concurrency import run_in_threadpool

    engine = local_app().app.state.engine

    async def check() -> Board:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 1
        release = threading.Event()
        busy = asyncio.create_task(run_in_threadpool(release.wait, 10))  # takes the only request thread
        await asyncio.sleep(0.05)
        try:
            return await asyncio.wait_for(TaskBoard(engine).current(), 3)
        finally:
            release.set()
            await busy

    assert asyncio.run(check()).experiment_id is None  # read at once: no experiment yet
