"""Smoke test of benchmarks/bench_vs_flower.py: one short run (nothing about speed is asserted).

Flower's side runs only where its virtualenv already exists (a full run creates it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_vs_flower_quick(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_vs_flower.py"), "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (tmp_path / "bench_vs_flower.png").stat().st_size > 0
    result = json.loads((tmp_path / "vs_flower.json").read_text())
    assert result["benchmark"] == "vs_flower" and result["rounds"] == 2
    sides = ["fedloom", "fedloom_sep"] + (["flower"] if result["flwr"] else [])
    for side in sides:
        (run,) = result["runs"][side]
        assert 0 < run["startup_s"] < run["wall_s"]
        assert run["cpu_server_s"] > 0 and run["cpu_clients_s"] > 0
        assert run["rss_server_bytes"] > 0 and run["rss_client_bytes"] > 0
        assert sorted(run["accuracy"], key=int) == ["1", "2"] and 0 < run["final_accuracy"] <= 1
    if result["flwr"]:
        fl = result["runs"]["flower"][0]
        # Same model, data, seeds and initial weights: the same learning, round by round, in both layouts.
        for fe in (result["runs"]["fedloom"][0], result["runs"]["fedloom_sep"][0]):
            for rnd in ("1", "2"):
                assert abs(fl["accuracy"][rnd] - fe["accuracy"][rnd]) < 0.02, (rnd, fl["accuracy"], fe["accuracy"])
