"""The shared round-state reader behind the task long-polls: how often it re-reads the database."""

from __future__ import annotations

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
