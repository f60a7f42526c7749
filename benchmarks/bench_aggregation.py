"""Throughput and peak memory of the streaming FedAvg, against a naive load-everything baseline.

    .venv/bin/python benchmarks/bench_aggregation.py [--clients 10] [--params 6000000] [--reps 5]

Writes ``--clients`` float32 updates of a ~``--params``-parameter model to a temporary directory,
then times ``fedloom_core.aggregation.fedavg`` (streaming: one accumulator plus one memory-mapped
update at a time) and a naive baseline that loads every update with ``safetensors.torch.load_file``
and averages with a Python ``sum``. Throughput is update bytes read per second (GB = 1e9 bytes),
median of ``--reps`` timed runs after one warm-up run; the files are in the page cache, so this
measures the aggregation, not the disk. Peak RSS is measured for each method in a fresh
interpreter (the peak is reset after imports, so it is the aggregation's own high-water mark).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedloom_core.aggregation import UpdateFile, fedavg, fedavg_weights


def model_shapes(params: int) -> dict[str, tuple[int, ...]]:
    """A few linear layers (weight + bias) whose sizes add up to about ``params``."""
    width = 1024
    shapes: dict[str, tuple[int, ...]] = {}
    remaining, layer = params, 0
    while remaining > 2 * width:
        rows = min(2048, max(1, (remaining - width) // width))
        shapes[f"layer{layer}.weight"] = (rows, width)
        shapes[f"layer{layer}.bias"] = (rows,)
        remaining -= rows * width + rows
        layer += 1
    return shapes


def write_updates(directory: Path, clients: int, params: int) -> list[UpdateFile]:
    gen = torch.Generator().manual_seed(0)
    shapes = model_shapes(params)
    base = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    updates = []
    for i in range(clients):
        state = {name: t + 0.01 * i for name, t in base.items()}
        path = directory / f"client-{i:03d}.safetensors"
        save_file(state, str(path))
        updates.append(UpdateFile(f"client-{i:03d}", path, num_samples=100 + 37 * i))
    return updates


def naive_fedavg(updates: Sequence[UpdateFile], out_path: Path, weighted: bool = True) -> dict[str, torch.Tensor]:
    """Load every update, then average with a Python sum (what the streaming fold avoids)."""
    ordered = sorted(updates, key=lambda u: u.client_id)
    weights = fedavg_weights(ordered, weighted)
    states = [load_file(str(u.path)) for u in ordered]
    result = {name: sum(w * s[name] for w, s in zip(weights, states, strict=True)) for name in states[0]}
    save_file(result, str(out_path))
    return result


METHODS = {"streaming": fedavg, "naive": naive_fedavg}


def time_method(method: str, updates: list[UpdateFile], out: Path, reps: int) -> list[float]:
    fn = METHODS[method]
    fn(updates, out)  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(updates, out)
        times.append(time.perf_counter() - start)
    return times


def _status_bytes(field: str) -> int:
    return int(re.search(field + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _child_peak(method: str, spec_path: str) -> None:
    """Child mode: run one aggregation with ``method`` and print its base and peak RSS."""
    spec = json.loads(Path(spec_path).read_text())
    updates = [UpdateFile(c, Path(p), n) for c, p, n in spec["updates"]]
    with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current RSS
        fh.write("5")
    base = _status_bytes("VmRSS")
    METHODS[method](updates, Path(spec["out"]))
    print(json.dumps({"base": base, "peak": _status_bytes("VmHWM")}))


def peak_rss(method: str, updates: list[UpdateFile], directory: Path) -> dict[str, int] | None:
    spec = directory / f"spec-{method}.json"
    spec.write_text(
        json.dumps(
            {
                "updates": [[u.client_id, str(u.path), u.num_samples] for u in updates],
                "out": str(directory / f"peak-{method}.safetensors"),
            }
        )
    )
    proc = subprocess.run([sys.executable, __file__, "--child-peak", method, str(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  (peak RSS for {method} unavailable: {proc.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--params", type=int, default=6_000_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--child-peak", nargs=2, metavar=("METHOD", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_peak:
        _child_peak(*args.child_peak)
        return

    with tempfile.TemporaryDirectory(prefix="fedloom-bench-") as tmp:
        directory = Path(tmp)
        updates = write_updates(directory, args.clients, args.params)
        n_params = sum(t.numel() for t in load_file(str(updates[0].path)).values())
        file_bytes = updates[0].path.stat().st_size
        total_bytes = sum(u.path.stat().st_size for u in updates)
        print(
            f"model: {n_params:,} float32 parameters, {file_bytes / 1e6:.1f} MB per update; "
            f"K={args.clients} updates = {total_bytes / 1e6:.0f} MB; {args.reps} timed runs each; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads"
        )

        results = {}
        for method in METHODS:
            times = time_method(method, updates, directory / f"out-{method}.safetensors", args.reps)
            median = statistics.median(times)
            results[method] = median
            print(
                f"{method:>9}: median {median * 1e3:7.1f} ms  ->  {total_bytes / median / 1e9:5.2f} GB/s  "
                f"(runs: {', '.join(f'{t * 1e3:.0f}' for t in times)} ms)"
            )

        stream = load_file(str(directory / "out-streaming.safetensors"))
        naive = load_file(str(directory / "out-naive.safetensors"))
        max_diff = max(float((stream[k] - naive[k]).abs().max()) for k in stream)
        print(
            f"speed-up of streaming over naive: {results['naive'] / results['streaming']:.2f}x "
            f"(max |difference| between the two results: {max_diff:.2e})"
        )

        for method in METHODS:
            found = peak_rss(method, updates, directory)
            if found:
                extra = found["peak"] - found["base"]
                print(
                    f"{method:>9}: peak RSS {found['peak'] / 2**20:7.1f} MiB, {extra / 2**20:6.1f} MiB above the "
                    f"post-import baseline = {extra / file_bytes:4.1f} x one update"
                )


if __name__ == "__main__":
    main()
