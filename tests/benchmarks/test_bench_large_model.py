"""Smoke test of the large-model benchmark: --quick with a small model through the same steps (no speed asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_bench_large_model_quick(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_large_model.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "bench_large_model.png").stat().st_size > 0
    res = json.loads((tmp_path / "large_model.json").read_text())
    assert res["experiment_status"] == "completed" and res["clients"] == 10
    assert len(res["upload_s"]) == 10 and all(s > 0 for s in res["upload_s"])
    assert res["upload_bytes_per_s"] > 0 and res["download_bytes_per_s"] > 0
    # The average of +delta and -delta updates is the global model again, up to float32 rounding.
    assert res["max_abs_diff_vs_expected"] < 1e-5
    assert res["aggregation_process"]["peak"] >= res["aggregation_process"]["base"] > 0
    assert res["worker_rss_peak_bytes"] >= res["worker_rss_before_bytes"] > 0
    assert set(res["targets_met"]) == {"upload", "download", "memory"}
