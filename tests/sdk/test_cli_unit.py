"""The operator CLI's parts without a fedloom server: the watch view, resuming a dropped event stream, where
the server and key come from, request files, and the missing ``cli`` extra.

The event stream is a WebSocket server in a thread that plays ``/ws/events``'s part; REST is an
``httpx.MockTransport``.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import Server, ServerConnection, serve

from fedloom import FLAPIError, FLClient, _watch, cli_ops
from fedloom._watch import RunView, events_url, watch
from tests.test_packaging import _names, _project, _run_blocked

pytestmark = pytest.mark.unit
EXP = "exp_w"
ADMIN = "admin-key"


def event(event_id: int, type: str, experiment_id: str = EXP, **fields: Any) -> dict[str, Any]:
    return {"type": type, "experiment_id": experiment_id, "event_id": event_id, **fields}


def test_the_view_follows_a_run_from_its_events() -> None:
    view = RunView(EXP)
    view.seed({"name": "n", "status": "created", "total_rounds": 2, "rounds_completed": 0, "current_round": 0})
    assert view.summary() == "waiting for the experiment to start" and not view.ended
    lines = [
        view.apply(event(1, "training_started", total_rounds=2)),
        view.apply(event(2, "round_started", round=1, selected_clients=["a", "b", "c"])),
        view.apply(event(3, "client_update", round=1, client_id="a", metrics={"local_accuracy": 0.5})),
        view.apply(event(4, "update_rejected", round=1, client_id="c", reason="norm 9.0 over 5x the median")),
    ]
    assert lines == [
        "training started: 2 rounds",
        "round 1 started: 3 clients selected (a, b, c)",
        "round 1: update from a (1/3), local accuracy 0.5000",
        "round 1: update from c rejected: norm 9.0 over 5x the median",
    ]
    assert view.summary() == "round 1 · uploads 1/3 · rejected 1"
    done = event(5, "round_completed", round=1, participating_clients=2, round_duration=1.25)
    done.update(global_metrics={"accuracy": 0.9, "loss": 0.3}, federated_metrics=None)
    assert view.apply(done) == "round 1 completed: accuracy 0.9000, loss 0.3000, 2 clients in 1.2s"
    assert view.apply(event(6, "training_progress", round=1, progress=0.5)) is None
    assert view.rounds_completed == 1 and view.summary().endswith("accuracy 0.9000")
    # A custom model's run: no central accuracy, the federated one is shown.
    fed = event(7, "round_completed", round=2, participating_clients=2, global_metrics={"accuracy": None})
    fed["federated_metrics"] = {"accuracy": 0.75}
    assert "federated accuracy 0.7500" in (view.apply(fed) or "") and view.accuracy == 0.75
    end = view.apply(event(8, "training_failed", status="failed", rounds_completed=2, reason="AGGREGATION_FAILED"))
    assert end == f"experiment {EXP} failed after 2 rounds (AGGREGATION_FAILED)" and view.ended
    # The REST record never moves counts back.
    view.seed({"name": "n", "status": "failed", "total_rounds": 2, "rounds_completed": 1, "current_round": 2})
    assert view.rounds_completed == 2


def test_events_url() -> None:
    assert events_url("http://h:8080", 0) == "ws://h:8080/ws/events"
    assert events_url("https://h/fl", 12) == "wss://h/fl/ws/events?since=12"


class EventStream:
    """Plays ``/ws/events``: each connection gets the next script of events, then a close code."""

    def __init__(self, scripts: list[tuple[list[dict[str, Any]], int]], on_end: Any = None) -> None:
        self.scripts = scripts
        self.paths: list[str] = []
        self.auth: list[str | None] = []
        self.on_end = on_end

    def handle(self, conn: ServerConnection) -> None:
        self.paths.append(conn.request.path)  # type: ignore[union-attr]
        self.auth.append(conn.request.headers.get("Authorization"))  # type: ignore[union-attr]
        events, code = self.scripts.pop(0) if self.scripts else ([], 1000)
        for e in events:
            conn.send(json.dumps(e))
            if e["type"].startswith("training_") and self.on_end:
                self.on_end(e["status"])
        if code == 1000:
            with contextlib.suppress(ConnectionClosed):
                conn.recv()  # hold the connection until the watcher leaves
            return
        conn.close(code, "closing")


@pytest.fixture
def stream_server() -> Iterator[tuple[Server, EventStream]]:
    holder = EventStream([])
    with serve(lambda conn: holder.handle(conn), "127.0.0.1", 0) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield server, holder
        server.shutdown()
    thread.join(5)


def api_for(server: Server, status: dict[str, str]) -> FLClient:
    """An admin FLClient of the stream's address whose REST answers come from ``status``."""

    def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/api/v1")
        if request.headers.get("authorization") != f"Bearer {ADMIN}":
            return httpx.Response(401, json={"error": {"code": "UNAUTHORIZED", "message": "no", "details": ""}})
        if path == f"/experiments/{EXP}":
            record = {"experiment_id": EXP, "name": "w", "status": status["now"], "total_rounds": 2}
            return httpx.Response(200, json={**record, "rounds_completed": 0, "current_round": 1})
        if path == "/metrics/training" and request.url.params.get("experiment_id") == EXP:
            row = {"round": 1, "global_accuracy": 0.8125, "global_loss": 0.5, "federated_metrics": None}
            return httpx.Response(200, json={"rounds": [{**row, "participating_clients": 1, "round_duration": 2.0}]})
        return httpx.Response(404, json={"error": {"code": "NOT_FOUND", "message": path, "details": ""}})

    host, port = server.socket.getsockname()[:2]
    return FLClient(f"http://{host}:{port}", ADMIN, transport=httpx.MockTransport(handle))


def test_watch_resumes_a_dropped_stream_from_its_last_event(
    stream_server: tuple[Server, EventStream], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, stream = stream_server
    status = {"now": "running"}
    stream.on_end = lambda s: status.update(now=s)
    first = [event(5, "round_started", round=1, selected_clients=["a"]), event(6, "client_update", client_id="a")]
    first.append(event(7, "round_started", experiment_id="exp_other", round=1))
    second = [event(8, "round_completed", round=1, global_metrics={"accuracy": 0.8})]
    second.append(event(9, "training_completed", status="completed", rounds_completed=1))
    stream.scripts = [(first, 1013), (second, 1000)]
    monkeypatch.setattr(_watch, "RECONNECT", _watch.Backoff(base_s=0.01, cap_s=0.05, max_elapsed_s=10))
    assert watch(api_for(server, status), EXP, as_json=True, timeout=20) == 0
    assert stream.paths == ["/ws/events", "/ws/events?since=7"]
    assert stream.auth == [f"Bearer {ADMIN}"] * 2
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e.get("event_id") for e in lines[:-1]] == [5, 6, 8, 9]  # the other experiment's event is left out
    assert lines[-1]["status"] == "completed" and "type" not in lines[-1]


@pytest.mark.parametrize(("status", "code"), [("failed", 3), ("stopped", 4), ("completed", 0)])
def test_watch_of_an_ended_run_returns_at_once_with_its_exit_code(
    stream_server: tuple[Server, EventStream], capsys: pytest.CaptureFixture[str], status: str, code: int
) -> None:
    server, _stream = stream_server
    assert watch(api_for(server, {"now": status}), EXP, timeout=20) == code
    out = capsys.readouterr().out
    assert f"experiment {EXP} {status}: 0 rounds, final accuracy 0.8125" in out and "2.0s" in out, out


def test_a_refused_stream_is_the_spec_error_and_a_silent_one_times_out(
    stream_server: tuple[Server, EventStream], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, stream = stream_server
    stream.scripts = [([], 4401)]
    with pytest.raises(FLAPIError) as refused:
        watch(api_for(server, {"now": "running"}), EXP, timeout=20)
    assert (refused.value.status, refused.value.code) == (401, "UNAUTHORIZED")
    monkeypatch.setattr(_watch, "IDLE_CHECK_S", 0.2)
    assert watch(api_for(server, {"now": "running"}), EXP, as_json=True, timeout=1.0) == 1
    assert f"gave up after 1s; experiment {EXP} is running" in capsys.readouterr().err


def test_server_and_key_come_from_flags_then_the_environment_then_serve_s_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = cli_ops._options()
    for name in ("FEDLOOM_SERVER", "FEDLOOM_API_KEY", "FEDLOOM_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    none = parser.parse_args([])
    assert cli_ops.server_url(none) == "http://127.0.0.1:8080"
    with pytest.raises(cli_ops.UsageError, match="an API key is needed"):
        cli_ops.api_key(none)
    (tmp_path / ".fedloom").mkdir()
    (tmp_path / ".fedloom" / "admin_api_key").write_text("from-serve\n")
    assert cli_ops.api_key(none) == "from-serve"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "admin_api_key").write_text("from-data-dir")
    monkeypatch.setenv("FEDLOOM_DATA_DIR", str(tmp_path / "d"))
    assert cli_ops.api_key(none) == "from-data-dir"
    monkeypatch.setenv("FEDLOOM_API_KEY", "from-env")
    monkeypatch.setenv("FEDLOOM_SERVER", "http://env:1/")
    assert (cli_ops.api_key(none), cli_ops.server_url(none)) == ("from-env", "http://env:1")
    flags = parser.parse_args(["--server", "http://flag:2", "--api-key", "from-flag"])
    assert (cli_ops.api_key(flags), cli_ops.server_url(flags)) == ("from-flag", "http://flag:2")


def test_request_files_are_bounded_json_objects(tmp_path: Path) -> None:
    path = tmp_path / "start.json"
    path.write_text(json.dumps({"experiment_config": {"rounds": 3, "experiment_id": "other"}, "training_config": {}}))
    args = cli_ops._options().parse_args([])
    args.file, args.experiment_id, args.rounds = str(path), "exp_1", None
    assert cli_ops.start_body(args)["experiment_config"] == {"rounds": 3, "experiment_id": "exp_1"}
    args.file, args.rounds = None, 7
    assert cli_ops.start_body(args) == {"experiment_config": {"experiment_id": "exp_1", "rounds": 7}}
    args.experiment_id = "../x"
    with pytest.raises(cli_ops.UsageError, match="experiment id '../x' is invalid"):
        cli_ops.start_body(args)
    cases = {"big.json": b" " * (cli_ops.MAX_BODY_FILE_BYTES + 1), "bad.json": b"{", "list.json": b"[]"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    for name, message in [
        ("big.json", "larger than"),
        ("bad.json", "is not JSON"),
        ("list.json", "must hold a JSON object"),
        ("missing.json", "cannot read"),
    ]:
        with pytest.raises(cli_ops.UsageError, match=message):
            cli_ops.read_json_file(str(tmp_path / name), "--file")


def test_the_operator_commands_name_the_cli_extra_when_rich_is_missing() -> None:
    done = _run_blocked({"rich"}, "from fedloom.cli import main; sys.exit(main(['experiments', 'list']))")
    assert done.returncode == 1, done.stderr
    assert "pip install 'fedloom[cli]'" in done.stderr and "fedloom experiments" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_the_cli_extra_brings_rich_and_websockets_and_the_server_extra_both() -> None:
    extras = _project()["optional-dependencies"]
    assert _names(extras["cli"]) == {"rich", "websockets"}
    assert _names(extras["cli"]) <= _names(extras["server"])
