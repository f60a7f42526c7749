"""``fedloom serve``'s supervisor: its plan survives the exec, it needs only the standard library, and it
forgets a dead child's live gauges exactly as prometheus-client does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import multiprocess

from fedloom.cli import build_parser, serve_options
from fedloom_tools import supervisor
from fedloom_tools.serve import serve

ROOT = Path(__file__).resolve().parents[1]


def test_plan_round_trips_through_json() -> None:
    plan = supervisor.Plan(
        children=[("temporal", ["temporal", "server"]), ("api", ["python", "-m", "fedloom.cli", "api"])],
        logs="/tmp/logs",
        waits=[("temporal", "127.0.0.1", 7233, 60.0), ("api", "127.0.0.1", 8080, 90.0)],
        announce=["fedloom: API http://127.0.0.1:8080/api/v1"],
        metrics_dir="/tmp/prom",
        child_env={"worker": {"MALLOC_ARENA_MAX": "2"}},
    )
    assert supervisor.Plan.from_json(plan.to_json()) == plan


def test_supervisor_imports_only_the_standard_library() -> None:
    """The exec'd supervisor stays small: running its file loads no third-party or fedloom module."""
    probe = (
        "import json, runpy, sys; runpy.run_path(sys.argv[1]); "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] not in sys.stdlib_module_names)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(ROOT / "fedloom_tools" / "supervisor.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    loaded = [m for m in json.loads(out) if not m.startswith(("_distutils_hack", "__editable__", "__main__"))]
    assert loaded == [], loaded


def test_forget_metrics_matches_prometheus_client(tmp_path: Path) -> None:
    names = [
        f"{kind}_{pid}.db"
        for pid in (41, 42)
        for kind in ("counter", "histogram", "gauge_all", "gauge_livesum", "gauge_liveall", "gauge_livemax",
                     "gauge_livemin", "gauge_livemostrecent", "gauge_max")
    ]  # fmt: skip
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for folder in (ours, theirs):
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(b"")
    supervisor.forget_metrics(str(ours), 42)
    multiprocess.mark_process_dead(42, str(theirs))
    left = sorted(p.name for p in ours.iterdir())
    assert left == sorted(p.name for p in theirs.iterdir())
    assert "gauge_livesum_42.db" not in left and "counter_42.db" in left and "gauge_livesum_41.db" in left


def test_one_process_plan_has_no_worker_child(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """serve's plan from ``fedloom serve``'s flags: by default the worker runs inside the API process;
    with ``--separate-worker`` it is its own child."""
    plans: list[supervisor.Plan] = []
    monkeypatch.delenv("FEDLOOM_TEMPORAL_ADDRESS", raising=False)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.setattr("fedloom_tools.serve.run", lambda plan, env: plans.append(plan) or 0)
    monkeypatch.setattr("fedloom_tools.serve.temporal_binary", lambda: "temporal")
    common = ["serve", "--data-dir", str(tmp_path / "data"), "--port", "18080", "--temporal-headless"]
    for flags in (["--separate-worker"], []):
        assert serve(**serve_options(build_parser().parse_args([*common, *flags]))) == 0
    separate, default = ({name: cmd for name, cmd in p.children} for p in plans)
    assert set(separate) == {"temporal", "worker", "api"} and "--with-worker" not in separate["api"]
    assert set(default) == {"temporal", "api"} and "--with-worker" in default["api"]
    assert [w[0] for w in plans[1].waits] == ["temporal", "api"]
    # Two malloc arenas for the process that runs the worker; the API alone keeps glibc's default.
    assert plans[0].child_env == {"worker": {"MALLOC_ARENA_MAX": "2"}}
    assert plans[1].child_env == {"api": {"MALLOC_ARENA_MAX": "2"}}


def test_serve_takes_one_layout_flag() -> None:
    """``--one-process`` (the default, kept for scripts that name it) and ``--separate-worker`` exclude each other."""
    assert serve_options(build_parser().parse_args(["serve", "--one-process"]))["one_process"] is True
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--one-process", "--separate-worker"])
