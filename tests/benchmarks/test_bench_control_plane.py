"""Smoke tests: each control-plane benchmark runs once on its --quick size and writes a sane JSON.

They assert nothing about speed (the machine is shared); they keep the scripts working.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_quick(script: str, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    name = script.removeprefix("bench_").removesuffix(".py")
    assert (out / f"bench_{name}.png").exists()
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.timeout(300)
def test_round_overhead_quick(tmp_path: Path) -> None:
    data = run_quick("bench_round_overhead.py", tmp_path)
    assert data["quick"] is True and data["benchmark"] == "round_overhead"
    assert data["rounds_measured"] == data["rounds"] - 1 >= 1
    assert len(data["overhead_ms"]) == data["rounds_measured"]
    assert all(ms > 0 for ms in data["overhead_ms"])
    assert data["median_clients_ms"] > 0 and data["median_notify_ms"] >= 0
    phases = data["phase_median_ms"]
    # Every phase of the breakdown is there (values come from two clocks' timestamps, so only finiteness is checked).
    # A new run does its heavy work in one activity (processing), not three.
    for phase in ("wake", "close", "processing", "persistence", "selection", "open"):
        assert math.isfinite(phases[phase]), phase
    assert "aggregation" not in phases
    assert sum(phases[p] for p in ("close", "processing", "persistence")) > 0
    assert isinstance(data["met"], bool)
    # Temporal alone, for a workflow of the same shape: every round ran and each part was timed.
    floor = data["temporal_floor"]
    assert floor["rounds"] == 3
    for part in ("round_ms", "signal_rpc_ms", "workflow_task_dispatch_ms", "workflow_task_ms", "activity_dispatch_ms"):
        assert math.isfinite(floor[part]) and floor[part] >= 0, part
    assert floor["round_ms"] >= floor["workflow_task_ms"]


@pytest.mark.timeout(300)
def test_efficiency_quick(tmp_path: Path) -> None:
    data = run_quick("bench_efficiency.py", tmp_path)
    assert data["quick"] is True and data["benchmark"] == "efficiency"
    assert len(data["per_round"]) == data["rounds"]
    assert all(r["slowest_training_s"] >= data["train_s"] for r in data["per_round"])
    # The wall time holds every round's training, so the ratio is at least 1.
    assert data["wall_s"] >= data["training_s"] > 0
    assert data["efficiency"] == pytest.approx(data["wall_s"] / data["training_s"])
    assert data["startup_s"] > 0 and data["server_s"] > 0
    # The clients time their requests, and the server records its evaluation of each round.
    assert data["median_download_ms"] > 0 and data["median_slowest_upload_ms"] >= data["median_upload_ms"] > 0
    assert all(r["evaluation_s"] > 0 for r in data["per_round"])


@pytest.mark.timeout(300)
def test_long_run_quick(tmp_path: Path) -> None:
    data = run_quick("bench_long_run.py", tmp_path)
    assert data["quick"] is True and data["benchmark"] == "long_run"
    assert len(data["overhead_ms"]) == data["rounds"] - 1
    for role in ("api", "worker"):
        rss = data["rss"][role]
        assert 10 < rss["first_mb"] < 10_000 and 10 < rss["last_mb"] < 10_000
        assert rss["last_round"] == data["rounds"]
    assert data["early_median_ms"] > 0 and data["late_median_ms"] > 0
    assert isinstance(data["rss_met"], bool) and isinstance(data["overhead_met"], bool)
