"""Smoke test of benchmarks/bench_scale.py: one --quick run on SQLite and on PostgreSQL against a real
``fedloom serve`` (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_scale.py"
ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


def _scratch_databases() -> set[str]:
    with psycopg.connect(ADMIN) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'fedloom_bench_scale_%'").fetchall()
    return {r[0] for r in rows}


def test_bench_scale_quick(tmp_path: Path) -> None:
    before = _scratch_databases()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "scale.json").read_text())
    assert result["quick"] is True
    assert [r["backend"] for r in result["runs"]] == ["sqlite", "postgresql"]
    for run in result["runs"]:
        w = run["workload"]
        assert run["registered"] == w["clients"]
        assert run["all_rounds_complete"] is True
        assert run["updates_per_round"] == [w["selected"]] * w["rounds"]
        assert len(run["round_time_s"]) == w["rounds"] and all(t > 0 for t in run["round_time_s"])
        for endpoint in ("register", "task (long-poll)", "download", "upload"):
            stats = run["latency"][endpoint]
            assert stats["count"] > 0 and stats["errors"] == 0, (run["backend"], endpoint, stats)
            assert 0 < stats["p50_ms"] <= stats["p99_ms"] <= stats["max_ms"]
        assert {"api", "worker", "temporal"} <= set(run["rss"])
        assert all(v["peak_mib"] > 0 for v in run["rss"].values())
        storage = run["storage"]
        assert 0 < storage["db_empty_bytes"] < storage["db_registered_bytes"] <= storage["db_end_bytes"]
        assert storage["blob_bytes"] > 0 and storage["rows"]["client"] == w["clients"]
        assert storage["rows"]["update"] == w["selected"] * w["rounds"]
        assert run["events"] > 0 and run["events_per_s"] > 0
    assert (tmp_path / "bench_scale.png").stat().st_size > 0
    assert _scratch_databases() == before  # the PostgreSQL run's scratch database was dropped
