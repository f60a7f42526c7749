"""``fedloom experiments watch``: one experiment followed live over ``WS /ws/events`` until it ends.

The WebSocket is opened first and the REST record read after it, so nothing falls between the two:
an event before the connection is in the record, one after it arrives on the socket. A dropped
connection resumes with ``since=<last event_id>``; while no event arrives the record is re-read every
``IDLE_CHECK_S``, so a run that ended while the socket was away is noticed too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fedloom._client import FLAPIError, FLClient
from fedloom._retry import Backoff, with_retries
from fedloom.cli_output import EXIT_ERROR, cell, console, fail, print_rounds

# How a watched run ended, as the command's exit code.
EXIT_CODES = {"completed": 0, "failed": 3, "stopped": 4}
IDLE_CHECK_S = 5.0
# Once the record says the run ended, events still on their way (a replay, the end event) are read
# until the stream has been quiet this long; for a run that had ended before the watch began, only
# what is already at hand is read.
END_GRACE_S = 2.0
ENDED_BEFORE_GRACE_S = 0.3
RECV_S = 0.5
# Events are small; a message past this is refused by the WebSocket client.
MAX_MESSAGE_BYTES = 1 << 20
# Reconnecting after a dropped socket, and retrying REST reads (429, 5xx, no connection).
RECONNECT = Backoff(base_s=0.5, cap_s=5.0, max_elapsed_s=120.0)
REST_RETRY = Backoff(base_s=0.5, cap_s=5.0, max_elapsed_s=60.0)
# Close codes of /ws/events that reconnecting cannot cure (docs/events.md), as the spec's errors.
FATAL_CLOSES = {4400: (400, "INVALID_REQUEST"), 4401: (401, "UNAUTHORIZED"), 4429: (429, "RATE_LIMITED")}
SHOWN_IDS = 8


@dataclass
class RunView:
    """What the watcher knows of one experiment, from its REST record and its events."""

    experiment_id: str
    name: str = ""
    status: str = "unknown"
    total_rounds: int = 0
    rounds_completed: int = 0
    round: int = 0
    selected: int = 0
    uploaded: set[str] = field(default_factory=set)
    rejected: int = 0
    accuracy: float | None = None
    loss: float | None = None
    last_event_id: int = 0
    seen_live: bool = False  # the run was seen before it ended, so its last events may be on their way
    end_seen: bool = False  # this experiment's training_completed / _failed / _stopped event arrived

    @property
    def ended(self) -> bool:
        return self.status in EXIT_CODES

    def seed(self, record: dict[str, Any]) -> None:
        """Take in ``GET /experiments/{id}``; counts only move forward (events may be newer)."""
        self.name = record.get("name") or self.name
        self.status = record["status"]
        self.seen_live = self.seen_live or not self.ended
        self.total_rounds = record.get("total_rounds") or self.total_rounds
        self.rounds_completed = max(self.rounds_completed, record.get("rounds_completed") or 0)
        if record["status"] == "running" and (record.get("current_round") or 0) > self.round:
            self.round, self.selected, self.uploaded, self.rejected = record["current_round"], 0, set(), 0

    def apply(self, event: dict[str, Any]) -> str | None:
        """Take in one event of this experiment; returns the line to log for it, if any."""
        kind, rnd = event.get("type"), event.get("round")
        if kind == "training_started":
            self.status, self.total_rounds = "running", event.get("total_rounds") or self.total_rounds
            return f"training started: {self.total_rounds} rounds"
        if kind == "round_started":
            selected = list(event.get("selected_clients") or [])
            self.round, self.selected, self.uploaded, self.rejected = rnd or self.round, len(selected), set(), 0
            return f"round {rnd} started: {len(selected)} clients selected ({_ids(selected)})"
        if kind == "client_update":
            if rnd == self.round:
                self.uploaded.add(str(event.get("client_id")))
            acc = (event.get("metrics") or {}).get("local_accuracy")
            local = f", local accuracy {cell(acc)}" if isinstance(acc, (int, float)) else ""
            return f"round {rnd}: update from {event.get('client_id')} ({self._uploads()}){local}"
        if kind == "update_rejected":
            if rnd == self.round:
                self.rejected += 1
            return f"round {rnd}: update from {event.get('client_id')} rejected: {event.get('reason')}"
        if kind == "evaluation_started":
            return f"round {rnd}: federated evaluation of the new model"
        if kind == "round_completed":
            self.rounds_completed = max(self.rounds_completed, rnd or 0)
            metrics = event.get("global_metrics") or {}
            self.accuracy, self.loss = metrics.get("accuracy"), metrics.get("loss")
            federated = (event.get("federated_metrics") or {}).get("accuracy")
            if self.accuracy is None and isinstance(federated, (int, float)):
                self.accuracy = federated
            duration = event.get("round_duration")
            took = f" in {duration:.1f}s" if isinstance(duration, (int, float)) else ""
            fed = f", federated accuracy {cell(federated)}" if federated is not None else ""
            return (
                f"round {rnd} completed: accuracy {cell(metrics.get('accuracy'))}, loss {cell(metrics.get('loss'))}"
                f"{fed}, {event.get('participating_clients')} clients{took}"
            )
        if kind == "training_progress":
            return None  # repeats round_completed
        if isinstance(kind, str) and kind.startswith("training_"):
            self.status = str(event.get("status") or kind.removeprefix("training_"))
            self.end_seen = self.seen_live = True
            self.rounds_completed = max(self.rounds_completed, event.get("rounds_completed") or 0)
            reason = f" ({event['reason']})" if event.get("reason") else ""
            return f"experiment {self.experiment_id} {self.status} after {self.rounds_completed} rounds{reason}"
        return f"{kind}" + (f" (round {rnd})" if rnd is not None else "")

    def _uploads(self) -> str:
        return f"{len(self.uploaded)}/{self.selected}" if self.selected else f"{len(self.uploaded)}"

    def summary(self) -> str:
        """The line beside the progress bar: the round, its uploads and the latest accuracy."""
        if self.status in ("created", "unknown"):
            return "waiting for the experiment to start"
        if self.ended:
            return self.status + (f" · accuracy {cell(self.accuracy)}" if self.accuracy is not None else "")
        parts = [f"round {self.round}" if self.round else "starting", f"uploads {self._uploads()}"]
        if self.rejected:
            parts.append(f"rejected {self.rejected}")
        if self.accuracy is not None:
            parts.append(f"accuracy {cell(self.accuracy)}")
        return " · ".join(parts)


def _ids(ids: list[str]) -> str:
    shown = ", ".join(ids[:SHOWN_IDS])
    return shown + (f", +{len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else "")


def events_url(server_url: str, since: int) -> str:
    """The ``/ws/events`` URL of ``server_url``, from ``since`` when positive (else live events only)."""
    scheme, sep, rest = server_url.partition("://")
    ws = {"http": "ws", "https": "wss"}.get(scheme.lower(), scheme) + sep + rest
    return f"{ws}/ws/events" + (f"?since={since}" if since > 0 else "")


class TimedOut(Exception):
    """The watch's ``--timeout`` passed before the experiment ended."""


class Follower:
    """Feeds ``view`` from the socket and the REST record, calling ``show(event or None, line)`` as it goes."""

    def __init__(
        self,
        api: FLClient,
        view: RunView,
        show: Callable[[dict | None, str | None], None],
        first: Callable[[], str | None] | None = None,
    ) -> None:
        self.api, self.view, self.show = api, view, show
        self.first = first  # run once the stream is first open (e.g. the start): none of its events are missed

    def sync(self) -> None:
        """Re-read the experiment's record (retrying 429s and outages within ``REST_RETRY``)."""
        exp_id = self.view.experiment_id
        record = with_retries(lambda: self.api.get_experiment(exp_id), REST_RETRY, f"GET /experiments/{exp_id}")
        self.view.seed(record)
        self.show(None, None)

    def run(self, deadline: float | None) -> None:
        """Follow until the experiment ends; ``TimedOut`` at ``deadline``; ``FLAPIError`` on a refused socket."""
        from websockets.exceptions import ConnectionClosed, InvalidHandshake

        failed_since: float | None = None
        attempt = 0
        while True:
            try:
                with self._connect() as ws:
                    failed_since, attempt = None, 0
                    if self.first is not None:
                        first, self.first = self.first, None
                        self.show(None, first())
                    self.sync()
                    ended_before = self.view.ended and not self.view.seen_live and not self.view.last_event_id
                    self._read(ws, deadline, ENDED_BEFORE_GRACE_S if ended_before else END_GRACE_S)
                    return
            except ConnectionClosed as exc:
                closed = exc.rcvd.code if exc.rcvd is not None else None
                if closed in FATAL_CLOSES:
                    status, code = FATAL_CLOSES[closed]
                    reason = exc.rcvd.reason or "the event stream refused the connection"  # type: ignore[union-attr]
                    raise FLAPIError(status, code, reason) from None
                error: Exception = exc
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                error = exc
            now = time.monotonic()
            failed_since = failed_since or now
            delay = RECONNECT.delay(attempt, error)
            if now - failed_since + delay > RECONNECT.max_elapsed_s:
                raise ConnectionError(f"the event stream stayed unreachable: {error}") from error
            if deadline is not None and now + delay > deadline:
                raise TimedOut
            time.sleep(delay)
            attempt += 1

    @contextmanager
    def _connect(self) -> Iterator[Any]:
        from websockets.sync.client import connect

        url = events_url(self.api.server_url, self.view.last_event_id)
        headers = {"Authorization": f"Bearer {self.api.api_key}"}
        with connect(url, additional_headers=headers, max_size=MAX_MESSAGE_BYTES, open_timeout=15) as ws:
            yield ws

    def _read(self, ws: Any, deadline: float | None, grace: float) -> None:
        """Read events until this run's end event, or ``grace`` seconds of quiet after the record said it ended."""
        checked = time.monotonic()  # the last record read or event of this run
        while not self.view.end_seen:
            if self.view.ended and time.monotonic() - checked >= grace:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimedOut
            try:
                text = ws.recv(timeout=min(RECV_S, grace) if self.view.ended else RECV_S)
            except TimeoutError:
                if not self.view.ended and time.monotonic() - checked >= IDLE_CHECK_S:
                    self.sync()
                    checked = time.monotonic()
                continue
            try:
                event = json.loads(text)
            except ValueError:
                continue  # not an event; the stream sends nothing else
            if not isinstance(event, dict):
                continue
            if isinstance(event.get("event_id"), int):
                self.view.last_event_id = max(self.view.last_event_id, event["event_id"])
            if event.get("experiment_id") != self.view.experiment_id:
                continue
            self.show(event, self.view.apply(event))
            checked = time.monotonic()


def watch(
    api: FLClient,
    experiment_id: str,
    as_json: bool = False,
    timeout: float | None = None,
    first: Callable[[], str | None] | None = None,
) -> int:
    """Follow ``experiment_id`` until it ends; exit code 0 completed, 3 failed, 4 stopped, 1 on errors.

    ``first`` runs once the event stream is open (``experiments start --watch`` starts the run there);
    the line it returns is logged.
    """
    view = RunView(experiment_id)
    deadline = time.monotonic() + timeout if timeout else None
    name = "fedloom experiments watch"
    try:
        if as_json:
            Follower(api, view, _print_event, first).run(deadline)
        else:
            _follow_live(api, view, deadline, first)
    except TimedOut:
        return fail(name, f"gave up after {timeout:g}s; experiment {experiment_id} is {view.status}")
    except ConnectionError as exc:
        return fail(name, exc)
    record = with_retries(lambda: api.get_experiment(experiment_id), REST_RETRY, "GET /experiments")
    if as_json:
        print(json.dumps(record), flush=True)
    else:
        _print_end(api, record)
    return EXIT_CODES.get(record["status"], EXIT_ERROR)


def _print_event(event: dict | None, _line: str | None) -> None:
    if event is not None:
        print(json.dumps(event), flush=True)


def _follow_live(api: FLClient, view: RunView, deadline: float | None, first: Callable[[], str | None] | None) -> None:
    """The rich view: a log line per event above a progress bar of rounds."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.text import Text

    with Progress(
        TextColumn(f"{view.experiment_id}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}", markup=False),
        TimeElapsedColumn(),
    ) as progress:
        task = progress.add_task("rounds", total=None, info=view.summary())

        def show(_event: dict | None, line: str | None) -> None:
            if line:
                progress.console.print(Text(line))
            total = view.total_rounds or None
            progress.update(task, total=total, completed=view.rounds_completed, info=view.summary())

        Follower(api, view, show, first).run(deadline)


def _print_end(api: FLClient, record: dict[str, Any]) -> None:
    from rich.text import Text

    exp_id = record["experiment_id"]
    rounds = with_retries(lambda: api.get_training_metrics(exp_id), REST_RETRY, "GET /metrics/training")["rounds"]
    if rounds:
        print_rounds(rounds)
    line = f"experiment {exp_id} {record['status']}: {record.get('rounds_completed', len(rounds))} rounds"
    if rounds and rounds[-1].get("global_accuracy") is not None:
        line += f", final accuracy {cell(rounds[-1]['global_accuracy'])}"
    if record.get("error"):
        line += f"; {record['error'].get('code') or 'error'}: {record['error'].get('message')}"
    elif record.get("stop_reason"):
        line += f"; reason: {record['stop_reason']}"
    console().print(Text(line))
