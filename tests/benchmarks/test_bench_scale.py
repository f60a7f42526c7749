"""Smoke test of benchmarks/bench_scale.py: one --quick run against a real ``fedloom serve`` (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_scale.py"


def test_bench_scale_quick(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "scale.json").read_text())
    w = result["workload"]
    assert result["quick"] is True
    assert result["registered"] == w["clients"]
    assert result["all_rounds_complete"] is True
    assert result["updates_per_round"] == [w["selected"]] * w["rounds"]
    assert len(result["round_time_s"]) == w["rounds"] and all(t > 0 for t in result["round_time_s"])
    for endpoint in ("register", "task (long-poll)", "download", "upload"):
        stats = result["latency"][endpoint]
        assert stats["count"] > 0 and stats["errors"] == 0, (endpoint, stats)
        assert 0 < stats["p50_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    assert {"api", "worker", "temporal"} <= set(result["rss"])
    assert all(v["peak_mib"] > 0 for v in result["rss"].values())
    assert (tmp_path / "bench_scale.png").stat().st_size > 0
