"""Aggregation memory: peak RSS of FedAvg for K = 2, 10 and 50 updates of 44 MB, against Flower's functions.

    .venv/bin/python benchmarks/bench_memory.py [--quick] [--out DIR] [--params 11000000] [--ks 2 10 50]

Each measurement is one aggregation in a fresh process. The process resets its peak (``VmHWM``,
through ``/proc/self/clear_refs``) once it is ready, runs the aggregation once, and reports how far
its resident set grew above that point.

- fedloom: the ``FedAvg`` strategy reading the K updates from a local blob store, as the
  aggregation activity does (digests checked, one memory-mapped update at a time).
- Flower (``flwr``, in its own virtualenv, see ``bench_aggregation.py``): ``aggregate`` on the K
  updates as numpy arrays, and ``aggregate_inplace`` on the K updates as serialized ``FitRes``.
  Flower's functions take their inputs in memory, so the RSS those inputs take before the call
  is reported too ("inputs held"); fedloom holds none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402
import bench_aggregation as agg  # noqa: E402

NAME = "memory"
METHODS = ("fedloom_fedavg", "flwr_aggregate", "flwr_aggregate_inplace")
LABELS = {
    "fedloom_fedavg": "fedloom FedAvg (blob store)",
    "flwr_aggregate": "Flower aggregate",
    "flwr_aggregate_inplace": "Flower aggregate_inplace",
}


def fedloom_child(spec_path: str) -> None:
    """Child mode: one FedAvg over the spec's blob keys; prints the RSS before and the peak during it."""
    from fedloom_core.learning.kernels import UpdateFile
    from fedloom_core.learning.strategies import AggregationContext, make_strategy
    from fedloom_core.storage.blobstore import LocalBlobStore

    spec = json.loads(Path(spec_path).read_text())
    store = LocalBlobStore(spec["root"])
    updates = [UpdateFile(cid, Path(key), n) for cid, key, n in spec["updates"]]
    strategy = make_strategy("FedAvg", {})
    ctx = AggregationContext(
        round=1,
        global_path=Path(spec["out"]),
        updates=updates,
        out_path=Path(spec["out"]),
        opener=lambda u: store.open_local(str(u.path)),
    )
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = common.rss_bytes()
    strategy.aggregate(ctx)
    print(json.dumps({"import_base": base, "base": base, "peak": common.rss_bytes(field="VmHWM")}))


def run_child(cmd: list[str]) -> dict[str, Any] | None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  child failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(ks: list[int], params: int, flower: str | None) -> dict[str, Any]:
    from fedloom_core.storage.blobstore import LocalBlobStore

    with tempfile.TemporaryDirectory(prefix="fedloom-bench-mem-") as tmp:
        scratch = Path(tmp)
        store = LocalBlobStore(scratch / "blobs")
        updates = agg.write_updates(store, max(ks), params, scratch)
        paths = agg.local_paths(store, updates)
        model_bytes = paths[0].stat().st_size
        print(f"model: {model_bytes / 1e6:.1f} MB per update; K = {ks}", flush=True)
        rows: dict[str, dict[str, Any]] = {m: {} for m in METHODS}
        for k in ks:
            chosen = list(zip(updates[:k], paths[:k], strict=True))
            spec = scratch / f"spec-{k}.json"
            spec.write_text(
                json.dumps(
                    {
                        "root": str(store.root),
                        "updates": [[u.client_id, str(u.path), u.num_samples] for u, _ in chosen],
                        "out": str(scratch / "out.safetensors"),
                    }
                )
            )
            rows["fedloom_fedavg"][k] = run_child([sys.executable, __file__, "--fedloom-child", str(spec)])
            if flower:
                for function in ("aggregate", "aggregate_inplace"):
                    fspec = scratch / f"flower-{k}-{function}.json"
                    fspec.write_text(
                        json.dumps(
                            {
                                "mode": "peak",
                                "function": function,
                                "updates": [[str(p), u.num_samples] for u, p in chosen],
                            }
                        )
                    )
                    rows[f"flwr_{function}"][k] = run_child([flower, agg.__file__, "--flower-child", str(fspec)])
            for method in METHODS:
                found = rows[method].get(k)
                if found:
                    found["inputs"] = found["base"] - found["import_base"]
                    found["growth"] = found["peak"] - found["base"]
                    print(
                        f"K={k:3d} {LABELS[method]:>26}: inputs held {found['inputs'] / 1e6:8.1f} MB, "
                        f"growth {found['growth'] / 1e6:8.1f} MB = {found['growth'] / model_bytes:5.2f} models",
                        flush=True,
                    )
    growth = {
        m: rows[m][max(ks)]["growth"] - rows[m][min(ks)]["growth"]
        for m in METHODS
        if rows[m].get(max(ks)) and rows[m].get(min(ks))
    }
    return {
        "load_average": os.getloadavg(),
        "ks": ks,
        "model_bytes": model_bytes,
        "results": {m: {str(k): v for k, v in r.items() if v} for m, r in rows.items()},
        "growth_kmin_to_kmax_bytes": growth,
        "target_met": growth.get("fedloom_fedavg", float("inf")) < model_bytes,
    }


def report(res: dict[str, Any]) -> str:
    mb = 1e6
    rows = []
    for method in METHODS:
        for k in res["ks"]:
            found = res["results"][method].get(str(k))
            if found:
                rows.append(
                    [
                        LABELS[method],
                        k,
                        f"{found['inputs'] / mb:.0f}",
                        f"{found['growth'] / mb:.1f}",
                        f"{found['growth'] / res['model_bytes']:.2f}",
                        f"{(found['inputs'] + found['growth']) / mb:.0f}",
                    ]
                )
    return common.table(
        ["method", "K", "inputs held (MB)", "growth during aggregation (MB)", "growth (models)", "total (MB)"], rows
    )


def doc_section(res: dict[str, Any], info: dict[str, Any], plot_name: str) -> str:
    model_mb = res["model_bytes"] / 1e6
    kmin, kmax = min(res["ks"]), max(res["ks"])
    growth = res["growth_kmin_to_kmax_bytes"]
    ours = growth.get("fedloom_fedavg")
    flower_lines = "\n".join(
        f"- {LABELS[m]}: the growth rises by {growth[m] / 1e6:.0f} MB from K={kmin} to K={kmax} "
        f"({growth[m] / res['model_bytes']:.1f} models), on top of the K updates it must hold in memory."
        for m in METHODS[1:]
        if m in growth
    )
    return f"""## 2. Aggregation memory

Machine: {common.machine_line(info)}.

Workload: one FedAvg over K = {", ".join(str(k) for k in res["ks"])} float32 updates of {model_mb:.1f} MB, each
aggregation in a fresh process whose peak RSS (`VmHWM`) is reset just before the call. fedloom reads the updates
from a local blob store; Flower's functions get them in memory ("inputs held", measured before the call).

{report(res)}

- fedloom FedAvg: the growth during the aggregation changes by **{ours / 1e6:.1f} MB** from K={kmin} to K={kmax},
  against one model of {model_mb:.1f} MB: target (under one model size) **{"met" if res["target_met"] else "not met"}**.
  It holds one float32 accumulator (the output) and, while it is folded, one memory-mapped update whose pages are
  released when its map closes; the digest check reads files in 1 MiB chunks.
{flower_lines}

![aggregation memory]({plot_name})
"""


def plot(res: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for method in METHODS:
        found = res["results"][method]
        ks = [k for k in res["ks"] if str(k) in found]
        if ks:
            totals = [(found[str(k)]["inputs"] + found[str(k)]["growth"]) / res["model_bytes"] for k in ks]
            ax.plot(ks, totals, marker="o", label=f"{LABELS[method]} (inputs + growth)")
    ax.set_xlabel("K (updates)")
    ax.set_ylabel("peak RSS above baseline, in models")
    ax.set_xscale("log")
    ax.set_yscale("symlog")
    ax.set_title(f"Memory of one aggregation, {res['model_bytes'] / 1e6:.0f} MB model")
    ax.legend()
    common.save_figure(fig, path)


def main() -> int:
    parser = common.base_parser(__doc__)
    parser.add_argument("--params", type=int, default=None)
    parser.add_argument("--ks", type=int, nargs="+", default=None)
    parser.add_argument("--fedloom-child", metavar="SPEC", help=agg.argparse_suppress())
    args = parser.parse_args()
    if args.fedloom_child:
        fedloom_child(args.fedloom_child)
        return 0
    ks = sorted(args.ks or ([2, 4] if args.quick else [2, 10, 50]))
    params = args.params or (200_000 if args.quick else 11_000_000)
    # --quick skips Flower: its child processes alone would take longer than the smoke test may.
    res = measure(ks, params, None if args.quick else agg.flower_python(create=True))
    print(report(res))
    print(f"fedloom FedAvg growth K={ks[0]} -> K={ks[-1]}: {res['growth_kmin_to_kmax_bytes'].get('fedloom_fedavg')} B")
    common.publish(args, NAME, res, plot, lambda info, image: doc_section(res, info, image))
    return 0


if __name__ == "__main__":
    sys.exit(main())
