"""Smoke tests of the data-plane benchmarks: each script runs once with --quick (nothing about speed is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(name: str, out: Path, timeout: float) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"bench_{name}.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / f"bench_{name}.png").stat().st_size > 0
    return json.loads((out / f"{name}.json").read_text())


def test_bench_aggregation_quick(tmp_path: Path) -> None:
    result = _run("aggregation", tmp_path, timeout=180)
    assert result["benchmark"] == "aggregation" and result["clients"] >= 5
    assert result["update_bytes"] == result["clients"] * result["model_bytes"] > 0
    for method in ("reference", "fedavg", "fedavg_rehash", "fedtrimmedavg", "multikrum"):
        assert result["median_s"][method] > 0 and result["throughput_bytes_per_s"][method] > 0, method
    assert result["ratio_vs_reference"] > 0
    assert result["fedavg_bit_identical_to_reference"] is True
    if result["flower"] is not None:  # only where Flower's own venv exists
        assert result["ratio_vs_flower"] > 0 and result["flower"]["max_abs_diff_vs_fedloom"] < 1e-3
    assert set(result["output_write_median_s"]) == {"write_save_file", "write_save_state"}
    assert result["map_updates_median_s"] > 0


def test_bench_memory_quick(tmp_path: Path) -> None:
    result = _run("memory", tmp_path, timeout=180)
    ks = result["ks"]
    assert len(ks) >= 2 and result["model_bytes"] > 0
    ours = result["results"]["fedloom_fedavg"]
    for k in ks:
        assert ours[str(k)]["peak"] >= ours[str(k)]["base"] > 0
        assert ours[str(k)]["growth"] >= 0 and ours[str(k)]["inputs"] == 0
    assert "fedloom_fedavg" in result["growth_kmin_to_kmax_bytes"]
    assert isinstance(result["target_met"], bool)


def test_bench_transfer_quick(tmp_path: Path) -> None:
    result = _run("transfer", tmp_path, timeout=300)
    assert result["model_bytes"] > 0 and len(result["upload_s"]) == len(result["download_s"]) == result["reps"]
    for rate in ("upload_bytes_per_s", "download_bytes_per_s", "loopback_bytes_per_s"):
        assert result[rate] > 0, rate
    con = result["concurrent"]
    assert con["uploads"] == len(con["latency_s"]) == 10 and con["wall_s"] > 0
    assert con["rss_peak_bytes"] >= con["rss_before_bytes"] > 0
    assert set(result["upload_floor_s"]) == {"write_fsync", "sha256", "finite_check"}
