"""Aggregation throughput: fedloom's FedAvg from the blob store against in-memory ``add_`` and Flower.

    .venv/bin/python benchmarks/bench_aggregation.py [--quick] [--out DIR] [--clients 10] [--params 11000000]

Workload: K updates of a float32 model of about ``--params`` parameters (11M, 44 MB by default),
stored in a local blob store (sha256 sidecars, as the server keeps them) and in the page cache.
Every method is timed in the same process run, interleaved rep by rep so that the noise of a
shared machine falls on all of them alike; the metric is update bytes read per second.

- ``reference``: ``acc.add_(u, alpha=w)`` over the same tensors already in memory (no I/O at all).
- ``fedloom FedAvg``: the ``FedAvg`` strategy as the aggregation activity runs it: each update
  opened through the blob store (digest checked, see below), memory-mapped, folded into one
  accumulator in client-id order, and the new global model written to disk.
- ``FedAvg, digest re-hashed``: the same with a fresh blob store each time, so every update's
  sha256 is computed again (what every open cost before the verified-digest cache).
- Robust rules, in a phase of their own interleaved with the reference rep by rep: fedloom's
  ``FedMedian``, ``FedTrimmedAvg`` (beta 0.1), ``Krum`` and ``MultiKrum`` (f = 1, m = K - 1,
  weighted like Flower's) as the activity runs them, and Flower's ``aggregate_median``,
  ``aggregate_trimmed_avg`` and ``aggregate_krum`` on the same arrays (in memory) in the child.
  Each fedloom rule's peak RSS growth is measured in a fresh process (``--peak-child``).
- Flower: ``flwr.server.strategy.aggregate.aggregate`` on the same arrays (numpy, in memory) and
  ``aggregate_inplace`` on ``FitRes`` objects made from them (it deserializes each update, as
  Flower's server does). Flower cannot be installed beside fedloom (every release pins older
  protobuf, FastAPI and Starlette than fedloom uses), so it runs in its own virtualenv, created
  once under ``~/.cache/fedloom-bench/flwr-venv`` (or ``FEDLOOM_BENCH_FLWR_PYTHON``), in a child
  process that loads the same files.

The same script, run with ``--flower-child`` by that other interpreter, needs only numpy and flwr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

NAME = "aggregation"
FLWR_SPEC = "flwr>=1.8"
FLWR_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedloom-bench" / "flwr-venv"
WIDTH = 1024
_NUMPY_OF = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


# -- workload ------------------------------------------------------------------------------------


def model_shapes(params: int) -> dict[str, tuple[int, ...]]:
    """Linear layers (weight + bias) of width 1024 whose sizes add up to about ``params``."""
    shapes: dict[str, tuple[int, ...]] = {}
    remaining, layer = params, 0
    while remaining > 2 * WIDTH:
        rows = min(2048, max(1, (remaining - WIDTH) // (WIDTH + 1)))
        shapes[f"layer{layer}.weight"] = (rows, WIDTH)
        shapes[f"layer{layer}.bias"] = (rows,)
        remaining -= rows * WIDTH + rows
        layer += 1
    return shapes


def write_updates(store: Any, clients: int, params: int, scratch: Path) -> list[Any]:
    """``clients`` float32 updates in the blob store ``store``; returns UpdateFiles whose path is the blob key."""
    import torch

    from fedloom_core.learning.kernels import UpdateFile
    from fedloom_core.learning.weights import save_state

    gen = torch.Generator().manual_seed(0)
    base = {name: torch.randn(shape, generator=gen) for name, shape in model_shapes(params).items()}
    updates = []
    for i in range(clients):
        cid = f"client-{i:03d}"
        local = scratch / f"{cid}.safetensors"
        save_state({name: t + 0.01 * (i % 7) - 0.02 * (i % 3) for name, t in base.items()}, local)
        key = f"updates/bench/1/{cid}.safetensors"
        adopt(store, key, local)
        updates.append(UpdateFile(cid, Path(key), num_samples=100 + 37 * i))
    return updates


def adopt(store: Any, key: str, local: Path) -> None:
    """Move ``local`` into a LocalBlobStore under ``key`` with its digest sidecar, as ``put_file`` lays it out.

    Benchmark set-up only: ``put_file`` also copies and fsyncs every blob, which for 50 updates of
    44 MB would make the set-up take longer than the measurements.
    """
    import hashlib

    from fedloom_core.storage.blobstore import SIDECAR_SUFFIX

    digest = hashlib.sha256()
    with open(local, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    target = store._path(key)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(local, target)
    target.with_name(target.name + SIDECAR_SUFFIX).write_text(digest.hexdigest() + "\n")


def wait_settled(store: Any, updates: Sequence[Any]) -> None:
    """Sleep until every update is old enough for the blob store to cache its verified digest."""
    from fedloom_core.storage.blobstore import local as blobstore

    newest = max(store._path(str(u.path)).stat().st_ctime_ns for u in updates)
    delay = (newest + blobstore._SETTLED_NS - time.time_ns()) / 1e9 + 0.05
    if delay > 0:
        time.sleep(delay)


def store_opener(store: Any) -> Callable[[Any], Any]:
    """The aggregation activity's opener: an update's blob key, opened (and digest-checked) locally."""
    return lambda update: store.open_local(str(update.path))


def local_paths(store: Any, updates: Sequence[Any]) -> list[Path]:
    return [store._path(str(u.path)) for u in updates]


# -- methods -------------------------------------------------------------------------------------


def strategy_run(
    name: str, params: dict[str, Any], store_factory: Callable[[], Any], updates: Sequence[Any], out: Path
):
    """A callable running strategy ``name`` over ``updates`` as the aggregation activity does."""
    from fedloom_core.learning.strategies import AggregationContext, make_strategy

    strategy = make_strategy(name, params)

    def prepare() -> None:
        # The activity writes into a fresh temporary directory; freeing the last run's output
        # file is not part of an aggregation.
        out.unlink(missing_ok=True)

    def run() -> None:
        store = store_factory()
        ctx = AggregationContext(
            round=1,
            global_path=out.parent / "global.safetensors",
            updates=list(updates),
            out_path=out,
            opener=store_opener(store),
        )
        strategy.aggregate(ctx)

    run.prepare = prepare  # type: ignore[attr-defined]
    return run


# The fold of an earlier version: slices below torch's parallel grain size, on the calling thread.
SLICE = 1 << 15


def sliced(run: Callable[[], None]) -> Callable[[], None]:
    """``run`` with FedAvg's fold done slice by slice on one thread (how it was before)."""
    import torch

    from fedloom_core.learning import kernels as aggregation

    def fold(acc: Any, update: Any, weight: float) -> None:
        for a, u in zip(acc.view(-1).split(SLICE), update.reshape(-1).split(SLICE), strict=True):
            a.add_(u, alpha=weight)

    def start_fold(update: Any, weight: float) -> Any:
        acc = torch.empty(update.shape, dtype=update.dtype)
        zero = torch.zeros((), dtype=update.dtype)
        for a, u in zip(acc.view(-1).split(SLICE), update.reshape(-1).split(SLICE), strict=True):
            torch.add(zero, u, alpha=weight, out=a)
        return acc

    def variant() -> None:
        saved = aggregation.fold, aggregation.start_fold
        aggregation.fold, aggregation.start_fold = fold, start_fold
        try:
            run()
        finally:
            aggregation.fold, aggregation.start_fold = saved

    variant.prepare = run.prepare  # type: ignore[attr-defined]
    return variant


def fresh_target(write: Callable[[Path], None], path: Path) -> Callable[[], None]:
    """``write(path)``, with the previous file removed before the clock starts (as into a new directory)."""

    def run() -> None:
        write(path)

    run.prepare = lambda: path.unlink(missing_ok=True)  # type: ignore[attr-defined]
    return run


def map_updates(store: Any, updates: Sequence[Any]) -> float:
    """Open and memory-map every update as FedAvg does and read one float per 4 KiB page; no arithmetic."""
    from fedloom_core.learning.weights import mapped_tensors

    total = 0.0
    for update in updates:
        with store.open_local(str(update.path)) as path, mapped_tensors(path) as tensors:
            for t in tensors.values():
                total += float(t.reshape(-1)[::1024].sum())
    return total


def reference_run(states: Sequence[dict[str, Any]], weights: Sequence[float]) -> Callable[[], dict[str, Any]]:
    """In-memory ``add_`` accumulation in the same order with the same weights: the ceiling."""
    import torch

    def run() -> dict[str, Any]:
        acc = {name: torch.zeros_like(t) for name, t in states[0].items()}
        for state, weight in zip(states, weights, strict=True):
            for name, t in state.items():
                acc[name].add_(t, alpha=weight)
        return acc

    return run


def timed(fn: Callable[[], Any]) -> float:
    prepare = getattr(fn, "prepare", None)
    if prepare is not None:
        prepare()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(
    methods: dict[str, Callable[[], Any]], reps: int, also: Callable[[], None] | None = None, warm_up: bool = True
) -> dict[str, list[float]]:
    """One warm-up call of each, then ``reps`` rounds calling each method once (and ``also``) per round."""
    for fn in methods.values() if warm_up else ():
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(reps):
        for name, fn in methods.items():
            times[name].append(timed(fn))
        if also is not None:
            also()
    return times


def profile_top(fn: Callable[[], Any], top: int = 6) -> list[dict[str, Any]]:
    """pyinstrument's view of one call: the functions with the most self time and their share."""
    try:
        from pyinstrument import Profiler
    except ImportError:
        return []
    profiler = Profiler(interval=0.0005)
    profiler.start()
    fn()
    session = profiler.stop()
    totals: dict[str, float] = {}

    def walk(frame: Any, caller: str) -> None:
        # pyinstrument puts a frame's own time in a synthetic "[self]" leaf under it.
        label = f"{frame.function} ({Path(frame.file_path or '?').name}:{frame.line_no})"
        if frame.children:
            for child in frame.children:
                walk(child, label)
        else:
            key = caller if frame.is_synthetic_leaf else label
            totals[key] = totals.get(key, 0.0) + frame.time

    root = session.root_frame()
    if root is None:
        return []
    walk(root, "?")
    whole = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return [{"function": label, "share": secs / whole} for label, secs in ranked]


# -- Flower, in its own interpreter --------------------------------------------------------------


def flower_python(create: bool) -> str | None:
    """The interpreter of the virtualenv holding flwr; created (about a minute) when ``create``."""
    given = os.environ.get("FEDLOOM_BENCH_FLWR_PYTHON")
    if given:
        return given
    python = FLWR_VENV / "bin" / "python"
    if not python.exists() and create:
        print(f"creating {FLWR_VENV} with {FLWR_SPEC} (Flower cannot share fedloom's venv) ...", flush=True)
        FLWR_VENV.parent.mkdir(parents=True, exist_ok=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(FLWR_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", FLWR_SPEC], check=True)
    return str(python) if python.exists() else None


def read_arrays(path: str) -> dict[str, np.ndarray]:
    """A safetensors file's tensors as numpy arrays (one read each), parsed by hand: the child has no torch."""
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    header.pop("__metadata__", None)
    base = 8 + header_len
    arrays = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = np.dtype(_NUMPY_OF[entry["dtype"]])
        flat = np.fromfile(path, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=base + begin)
        arrays[name] = flat.reshape(entry["shape"])
    return arrays


def flower_child(spec_path: str) -> None:
    """Child mode (Flower's venv): time or peak-measure Flower's functions on the spec's update files."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.server.strategy.aggregate import (
        aggregate,
        aggregate_inplace,
        aggregate_krum,
        aggregate_median,
        aggregate_trimmed_avg,
    )

    spec = json.loads(Path(spec_path).read_text())
    import_base = common.rss_bytes()
    names = None
    results = []
    for path, samples in spec["updates"]:
        arrays = read_arrays(path)
        names = names or list(arrays)
        results.append(([arrays[n] for n in names], samples))

    def fit_results() -> list[tuple[None, FitRes]]:
        return [
            (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), samples, {}))
            for arrays, samples in results
        ]

    if spec["mode"] == "peak":
        fits = fit_results() if spec["function"] == "aggregate_inplace" else None
        if fits is not None:
            results.clear()  # Flower's server holds only the serialized updates
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = common.rss_bytes()
        out = aggregate(results) if fits is None else aggregate_inplace(fits)
        print(
            json.dumps(
                {"import_base": import_base, "base": base, "peak": common.rss_bytes(field="VmHWM"), "layers": len(out)}
            )
        )
        return
    fits = fit_results()
    f = 1
    methods = {"aggregate": lambda: aggregate(results), "aggregate_inplace": lambda: aggregate_inplace(fits)}
    robust = {
        "median": lambda: aggregate_median(results),
        "trimmed_avg": lambda: aggregate_trimmed_avg(results, 0.1),
        "krum": lambda: aggregate_krum(results, num_malicious=f, to_keep=0),
        "multikrum": lambda: aggregate_krum(results, num_malicious=f, to_keep=len(results) - f),
    }
    for fn in methods.values():  # warm-up
        fn()
    print(json.dumps({"ready": True}), flush=True)
    # One line from the parent per repetition, so Flower's reps interleave with fedloom's.
    for line in sys.stdin:
        wanted = {"rep": methods, "robust": robust}.get(line.strip())
        if wanted is None:
            break
        print(json.dumps({name: timed(fn) for name, fn in wanted.items()}), flush=True)

    def max_diff(got: list[np.ndarray], path: str) -> float:
        theirs = read_arrays(path)
        return max(float(np.abs(g - theirs[n]).max()) for g, n in zip(got, names, strict=True))

    diffs = {"fedavg": max_diff(aggregate(results), spec["compare_with"])}
    for name, fn in robust.items():
        if name in spec.get("robust_outputs", {}):
            diffs[name] = max_diff(fn(), spec["robust_outputs"][name])
    import flwr

    print(json.dumps({"max_abs_diff_vs_fedloom": diffs["fedavg"], "robust_diffs": diffs, "flwr": flwr.__version__}))


class FlowerChild:
    """Flower's functions in a child process (its own venv), timed one repetition at a time on request."""

    def __init__(self, python: str, spec: dict[str, Any], scratch: Path) -> None:
        path = scratch / "flower-spec.json"
        self.spec_path = path
        path.write_text(json.dumps({**spec, "mode": "time"}))
        self.proc = subprocess.Popen(
            [python, __file__, "--flower-child", str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.times: dict[str, list[float]] = {}
        self._read()  # ready

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            raise RuntimeError(f"the Flower child exited with {self.proc.wait()}")
        return json.loads(line)

    def rep(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("rep\n")
        self.proc.stdin.flush()
        for name, secs in self._read().items():
            self.times.setdefault(f"flwr_{name}", []).append(secs)

    def robust_rep(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("robust\n")
        self.proc.stdin.flush()
        for name, secs in self._read().items():
            self.times.setdefault(f"flwr_{name}", []).append(secs)

    def finish(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("done\n")
        self.proc.stdin.close()
        final = self._read()
        self.proc.wait()
        return {**final, "times": self.times}


# -- robust rules ----------------------------------------------------------------------------------

# fedloom's robust rules as benchmarked (f = 1; MultiKrum keeps K - f and weights like Flower's).
ROBUST = {
    "fedmedian": ("FedMedian", {}),
    "fedtrimmedavg": ("FedTrimmedAvg", {"trim_fraction": 0.1}),
    "krum": ("Krum", {"num_byzantine": 1}),
    "multikrum": ("MultiKrum", {"num_byzantine": 1, "weighted": True}),
}
FLOWER_OF = {"fedmedian": "median", "fedtrimmedavg": "trimmed_avg", "krum": "krum", "multikrum": "multikrum"}
# Peak RSS growth is measured for these, each in a fresh process.
PEAKS = {"fedavg": ("FedAvg", {}), **ROBUST}


def krum_selection(strategy: str, params: dict[str, Any], updates: Sequence[Any], store: Any, scratch: Path) -> list:
    """The client ids a Krum rule keeps on the benchmark's updates."""
    from fedloom_core.learning.strategies import AggregationContext, make_strategy

    ctx = AggregationContext(
        round=1,
        global_path=scratch / "global.safetensors",
        updates=list(updates),
        out_path=scratch / "selection.safetensors",
        opener=store_opener(store),
    )
    return make_strategy(strategy, params).aggregate(ctx).info["selected"]


def peak_child(spec_path: str) -> None:
    """Child mode: one aggregation in this fresh process; prints its RSS before and its peak (VmHWM)."""
    from fedloom_core.learning.kernels import UpdateFile
    from fedloom_core.learning.strategies import AggregationContext, make_strategy

    spec = json.loads(Path(spec_path).read_text())
    updates = [UpdateFile(cid, Path(path), n) for cid, path, n in spec["updates"]]
    strategy = make_strategy(spec["strategy"], spec["params"])
    ctx = AggregationContext(1, Path(spec["global"]), updates, Path(spec["out"]))
    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak to the current RSS
        fh.write("5")
    base = common.rss_bytes()
    strategy.aggregate(ctx)
    print(json.dumps({"base": base, "peak": common.rss_bytes(field="VmHWM")}))


def peak_growth(strategy: str, params: dict[str, Any], ordered: Sequence[Any], paths: Sequence[Path], scratch: Path):
    """Peak RSS growth (bytes) of one aggregation by ``strategy`` in a fresh process (``paths`` are
    ``ordered``'s local files)."""
    spec = {
        "strategy": strategy,
        "params": params,
        "global": str(scratch / "global.safetensors"),
        "updates": [[u.client_id, str(p), u.num_samples] for u, p in zip(ordered, paths, strict=True)],
        "out": str(scratch / f"peak-{strategy}.safetensors"),
    }
    path = scratch / f"peak-{strategy}.json"
    path.write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, __file__, "--peak-child", str(path)], capture_output=True, text=True, check=True
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return found["peak"] - found["base"]


# -- the benchmark -------------------------------------------------------------------------------


def measure(clients: int, params: int, reps: int, robust_reps: int, flower: str | None) -> dict[str, Any]:
    """Write the updates, time every method, and return the medians and ratios."""
    import torch

    from fedloom_core.learning.kernels import fedavg_weights
    from fedloom_core.learning.weights import load_state, save_state
    from fedloom_core.storage.blobstore import LocalBlobStore

    with tempfile.TemporaryDirectory(prefix="fedloom-bench-agg-") as tmp:
        scratch = Path(tmp)
        store = LocalBlobStore(scratch / "blobs")
        updates = write_updates(store, clients, params, scratch)
        paths = local_paths(store, updates)
        first = load_state(paths[0])
        save_state(first, scratch / "global.safetensors")  # Krum's reference model
        update_bytes = sum(p.stat().st_size for p in paths)
        n_params = sum(t.numel() for t in first.values())
        ordered = sorted(updates, key=lambda u: u.client_id)
        states = [load_state(store._path(str(u.path))) for u in ordered]
        weights = fedavg_weights(ordered, True)
        out = scratch / "out.safetensors"
        wait_settled(store, updates)

        def fresh_store() -> LocalBlobStore:
            return LocalBlobStore(scratch / "blobs")

        reference = reference_run(states, weights)
        methods = {
            "reference": reference,
            "fedavg": strategy_run("FedAvg", {}, lambda: store, updates, out),
            "fedavg_rehash": strategy_run("FedAvg", {}, fresh_store, updates, scratch / "out-rehash.safetensors"),
            "fedavg_sliced": sliced(
                strategy_run("FedAvg", {}, lambda: store, updates, scratch / "out-sliced.safetensors")
            ),
        }
        print(
            f"workload: K={clients} updates x {n_params:,} float32 parameters ({update_bytes / clients / 1e6:.1f} MB "
            f"each, {update_bytes / 1e6:.0f} MB in all); {reps} interleaved reps; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads",
            flush=True,
        )
        robust_out = {name: scratch / f"robust-{name}.safetensors" for name in ROBUST}
        child = None
        if flower:
            reference()  # leave the fedloom result on disk for the child to compare with
            methods["fedavg"]()
            spec = {
                "updates": [[str(p), u.num_samples] for p, u in zip(local_paths(store, ordered), ordered, strict=True)],
                "compare_with": str(out),
                "robust_outputs": {FLOWER_OF[name]: str(path) for name, path in robust_out.items()},
            }
            child = FlowerChild(flower, spec, scratch)
        times = interleaved(methods, reps, also=child.rep if child else None)
        acc = reference()
        got = load_state(out)
        identical = all(torch.equal(got[n], acc[n]) for n in acc)
        # The robust rules, interleaved rep by rep with the reference (and Flower's, in the child).
        robust = {"reference_robust": reference}
        for name, (strategy, params) in ROBUST.items():
            robust[name] = strategy_run(strategy, params, lambda: store, updates, robust_out[name])
        times.update(interleaved(robust, robust_reps, also=child.robust_rep if child else None))
        flower_out = child.finish() if child else None
        # The same on one thread each (torch's, which fedloom's block threads follow too): a parallel region
        # waits for a core another process holds, so on a busy machine the two-thread reference slows down far
        # more than the rules' threads that take the next block when free; one thread each is a fairer ratio.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            single = interleaved({f"{name}_1t": fn for name, fn in robust.items()}, robust_reps, warm_up=False)
        finally:
            torch.set_num_threads(threads)
        times.update(single)
        selected = {}
        for name, (strategy, params) in ROBUST.items():
            if strategy.endswith("Krum"):
                selected[name] = krum_selection(strategy, params, updates, store, scratch)
        local = local_paths(store, ordered)
        peaks = {
            name: peak_growth(strategy, params, ordered, local, scratch) for name, (strategy, params) in PEAKS.items()
        }
        # The output write on its own, before (safetensors' save_file) and after (save_state).
        from safetensors.torch import save_file

        writes = interleaved(
            {
                "write_save_file": fresh_target(lambda p: save_file(acc, str(p)), scratch / "w1.safetensors"),
                "write_save_state": fresh_target(lambda p: save_state(acc, p), scratch / "w2.safetensors"),
            },
            reps,
        )
        # Bringing the updates' pages into the process on their own: each opened through the store and
        # memory-mapped as FedAvg does, one value read per 4 KiB page, no arithmetic.
        mapped = interleaved({"map_updates": lambda: map_updates(store, ordered)}, reps)
        profile = profile_top(methods["fedavg"])
    medians = {name: common.median(ts) for name, ts in times.items()}
    if flower_out:
        for name, ts in flower_out["times"].items():
            times[name] = ts
            medians[name] = common.median(ts)
    throughput = {name: update_bytes / m for name, m in medians.items()}
    best_flower = max((throughput[k] for k in throughput if k.startswith("flwr_aggregate")), default=None)
    return {
        "load_average": os.getloadavg(),
        "clients": clients,
        "parameters": n_params,
        "update_bytes": update_bytes,
        "model_bytes": update_bytes // clients,
        "reps": reps,
        "times_s": times,
        "median_s": medians,
        "throughput_bytes_per_s": throughput,
        "ratio_vs_reference": throughput["fedavg"] / throughput["reference"],
        "ratio_vs_flower": (throughput["fedavg"] / best_flower) if best_flower else None,
        "fedavg_bit_identical_to_reference": identical,
        "robust_reps": robust_reps,
        "robust_ratio_vs_reference": {
            name: medians["reference_robust"] / medians[name] for name in ROBUST if name in medians
        },
        "robust_ratio_vs_reference_1_thread": {
            name: medians["reference_robust_1t"] / medians[f"{name}_1t"] for name in ROBUST if f"{name}_1t" in medians
        },
        "krum_selected": selected,
        "peak_growth_bytes": peaks,
        "threads": torch.get_num_threads(),
        "flower": {
            "version": flower_out["flwr"],
            "max_abs_diff_vs_fedloom": flower_out["max_abs_diff_vs_fedloom"],
            "robust_max_abs_diff_vs_fedloom": flower_out.get("robust_diffs", {}),
        }
        if flower_out
        else None,
        "output_write_median_s": {name: common.median(ts) for name, ts in writes.items()},
        "map_updates_median_s": common.median(mapped["map_updates"]),
        "profile_fedavg": profile,
    }


LABELS = {
    "reference": "reference: in-memory `add_`",
    "fedavg": "fedloom FedAvg (blob store, mmap)",
    "fedavg_rehash": "fedloom FedAvg, digest re-hashed on every open (before)",
    "fedavg_sliced": "fedloom FedAvg, sliced one-thread fold (before)",
    "flwr_aggregate": "Flower `aggregate` (numpy, in memory)",
    "flwr_aggregate_inplace": "Flower `aggregate_inplace` (from FitRes)",
}


ROBUST_LABELS = {
    "fedmedian": "FedMedian",
    "fedtrimmedavg": "FedTrimmedAvg (beta 0.1)",
    "krum": "Krum (f = 1)",
    "multikrum": "MultiKrum (f = 1, m = K - 1, weighted)",
}
CHUNK_ELEMS_DEFAULT = 1 << 20


def robust_report(res: dict[str, Any]) -> str:
    """The robust rules' table: fedloom against the in-run reference and Flower, and peak memory."""
    med, peaks = res["median_s"], res["peak_growth_bytes"]
    diffs = (res.get("flower") or {}).get("robust_max_abs_diff_vs_fedloom", {})
    rows = [
        [
            "reference: in-memory `add_` (this phase)",
            f"{med['reference_robust'] * 1e3:.1f}",
            "1.00",
            f"{med['reference_robust_1t'] * 1e3:.1f}",
            "1.00",
            "",
            "",
            "",
            "",
        ]
    ]
    for name, label in ROBUST_LABELS.items():
        flwr = med.get(f"flwr_{FLOWER_OF[name]}")
        diff = diffs.get(FLOWER_OF[name])
        rows.append(
            [
                f"fedloom {label}",
                f"{med[name] * 1e3:.1f}",
                f"**{res['robust_ratio_vs_reference'][name]:.2f}**",
                f"{med[f'{name}_1t'] * 1e3:.1f}",
                f"**{res['robust_ratio_vs_reference_1_thread'][name]:.2f}**",
                f"{peaks[name] / 1e6:.0f}",
                f"{flwr * 1e3:.0f}" if flwr else "n/a",
                f"{flwr / med[name]:.1f}x" if flwr else "n/a",
                f"{diff:.1e}" if diff is not None else "n/a",
            ]
        )
    headers = [
        "rule",
        f"median ms, {res['threads']} threads",
        "x reference",
        "median ms, 1 thread",
        "x reference (1 thread)",
        "peak RSS growth (MB)",
        "Flower median ms",
        "fedloom faster by",
        "max abs diff vs Flower",
    ]
    return common.table(headers, rows)


def robust_section(res: dict[str, Any]) -> str:
    worst = min(res["robust_ratio_vs_reference"].values())
    worst_1t = min(res["robust_ratio_vs_reference_1_thread"].values())
    load = ", ".join(f"{v:.1f}" for v in res["load_average"])
    bound = res["clients"] * CHUNK_ELEMS_DEFAULT * 4 + res["model_bytes"]
    peaks = res["peak_growth_bytes"]
    worst_peak = max(peaks[name] for name in ROBUST)
    flower = res.get("flower")
    flower_text = (
        f"Flower's functions (flwr {flower['version']}) ran in the same run on the same arrays, in memory, "
        "interleaved rep by rep; they write nothing."
        if flower
        else "Flower could not be run in this run (its virtualenv could not be built; see the script's output), "
        "so its columns are empty."
    )
    diffs = (flower or {}).get("robust_max_abs_diff_vs_fedloom", {})
    same = [ROBUST_LABELS[n].split(" ")[0] for n in ROBUST if diffs.get(FLOWER_OF[n]) == 0.0]
    close = [ROBUST_LABELS[n].split(" ")[0] for n in ROBUST if diffs.get(FLOWER_OF[n], 0.0) > 0.0]
    diff_text = (
        "The last column compares each Flower result with fedloom's output file: "
        + (f"{', '.join(same)} give the same values; " if same else "")
        + (f"{', '.join(close)} differ by float32 rounding (another order of additions)." if close else "")
        if diffs
        else ""
    )
    return f"""### Robust rules

The same K = {res["clients"]} updates, FedMedian, FedTrimmedAvg, Krum and MultiKrum as the aggregation
activity runs them (blob store, default `chunk_elems` = {CHUNK_ELEMS_DEFAULT:,}), interleaved rep by rep with the
reference, first with torch's {res["threads"]} threads (fedloom's block threads follow torch's count), then with one
thread for both; {res["robust_reps"]} repetitions each, medians. Peak RSS growth: each rule once in a fresh
process, `VmHWM` reset just before the call.

{robust_report(res)}

- Target: each rule at least 0.25 of the in-run reference. With torch's {res["threads"]} threads on both sides
  the lowest is **{worst:.2f}** (**{"met" if worst >= 0.25 else "not met"}**); with one thread on both sides
  **{worst_1t:.2f}** (**{"met" if worst_1t >= 0.25 else "not met"}**). System load average at the end of the
  run: {load}. On a busy machine the multi-threaded reference, a parallel region that
  waits for a core another process holds, slows down far more than the rules, whose threads take the next
  block when free; the one-thread columns are the fairer comparison then.
- Memory: the four rules grew by at most {worst_peak / 1e6:.0f} MB, against a bound of
  K x chunk_elems x 4 bytes + one model = {bound / 1e6:.0f} MB
  (**{"within" if worst_peak <= bound * 1.02 else "over"}**; FedAvg, which maps whole updates, grew by
  {peaks["fedavg"] / 1e6:.0f} MB in this run).
- Selected by Krum: {", ".join(res["krum_selected"].get("krum", []))}; by MultiKrum:
  {", ".join(res["krum_selected"].get("multikrum", []))}.
- {flower_text} {diff_text}

**How.** The coordinate-wise rules no longer sort each coordinate's K values one coordinate at a time
(`numpy.sort` on rows of K; before this change FedTrimmedAvg took 1066 ms and MultiKrum 1192 ms here, 0.04 of
the reference). A comparator network (Batcher's merge
exchange, pruned to the comparators that can change the wanted order statistics, and to the one side of a
comparator that is read later) runs on cache-sized blocks of K rows, each comparator one elementwise
`minimum`/`maximum` over the block: exact operations, so the result is the same bit for bit for any block
size, thread count or arrival order (for K = 10 the network is pruned from Waksman's 29-comparator one:
FedTrimmedAvg needs 24 minima/maxima per block instead of Batcher's 34). Krum's squared distances come from
Gram matrices of the deltas, three batched float32 matrix products over the two halves of the rows per block
giving the upper triangle of every 1,024-coordinate piece's matrix (3/4 of the multiplications of `X X^T`),
summed in float64 in piece order, instead of K^2 passes. Krum then writes the selected update from its file;
MultiKrum averages the selection the first window's distances point to in the same pass (the global model
plus one matrix-vector product of the selected deltas per block) and re-reads only that window when the
final selection agrees. Results are written into the output file a window at a time, with no whole-model
buffer (whose fresh pages each cost a fault). The updates are read as memory maps of one window of
`chunk_elems` coordinates at a time, unmapped after it, and the blocks of a window are shared by
{res["threads"]} threads that each take the next block when free. Before these changes (same machine, one
thread, the reference at 99.5 ms): FedMedian 340 ms, FedTrimmedAvg 231 ms, Krum 442 ms, MultiKrum 418 ms.
See `docs/strategies.md` for precision and memory.
"""


def report(res: dict[str, Any]) -> str:
    rows = [
        [
            LABELS[name],
            f"{res['median_s'][name] * 1e3:.1f}",
            f"{res['throughput_bytes_per_s'][name] / 1e9:.2f}",
            f"{res['throughput_bytes_per_s'][name] / res['throughput_bytes_per_s']['reference']:.2f}",
        ]
        for name in LABELS
        if name in res["median_s"]
    ]
    return common.table(["method", "median ms", "GB/s of updates", "x reference"], rows)


def doc_section(res: dict[str, Any], info: dict[str, Any], plot_name: str) -> str:
    ratio, vs_flower = res["ratio_vs_reference"], res["ratio_vs_flower"]
    writes = res["output_write_median_s"]
    flower = res["flower"]
    same = "bit-identical to" if res["fedavg_bit_identical_to_reference"] else "NOT identical to"
    load = ", ".join(f"{v:.1f}" for v in res["load_average"])
    write_note = (
        "" if writes["write_save_state"] <= writes["write_save_file"] else " (the slower of the two in this run)"
    )
    profile = "\n".join(f"  - `{p['function']}`: {p['share']:.0%}" for p in res["profile_fedavg"])
    floor_ms = (res["median_s"]["reference"] + writes["write_save_state"]) * 1e3
    map_ms = res["map_updates_median_s"] * 1e3
    flower_ms = min((v for k, v in res["median_s"].items() if k.startswith("flwr_")), default=0.0) * 1e3
    flower_text = (
        f"fedloom FedAvg is **{vs_flower:.2f}x** the faster of Flower's two functions (flwr {flower['version']}; "
        f"its result differs from fedloom's by at most {flower['max_abs_diff_vs_fedloom']:.2e}, float32 rounding): "
        f"target at least 3x, **{'met' if vs_flower >= 3 else 'not met'}**."
        + (
            ""
            if vs_flower >= 3
            else " What bounds it in this run: fedloom's time is the arithmetic over every update byte plus "
            f"reading the updates from the blob store and writing the {res['model_bytes'] / 1e6:.0f} MB result, "
            "while Flower's functions get their arrays in memory and write nothing. The arithmetic alone (the "
            f"reference, {res['median_s']['reference'] * 1e3:.1f} ms) plus the write alone "
            f"({writes['write_save_state'] * 1e3:.1f} ms, see below) is {floor_ms:.1f} ms, so no FedAvg that writes "
            f"its result can be more than {flower_ms / floor_ms:.2f}x Flower's {flower_ms:.1f} ms in this run; "
            f"fedloom's {res['median_s']['fedavg'] * 1e3:.1f} ms is "
            f"{res['median_s']['fedavg'] * 1e3 - floor_ms:.1f} ms above that floor; opening and mapping the updates "
            f"alone (one value read per page, no arithmetic) takes {map_ms:.1f} ms in this run. "
            "Flower's own median moves between runs on this shared machine, and this ratio with it."
        )
        if vs_flower
        else "Flower could not be run in this run (see the script's output)."
    )
    ref_ms = res["median_s"]["reference"] * 1e3
    reference_text = (
        ""
        if ratio >= 0.6
        else " What bounds it in this run: unlike the reference, FedAvg must also write its result. The "
        f"reference ({ref_ms:.1f} ms) plus writing the {res['model_bytes'] / 1e6:.0f} MB result alone "
        f"({writes['write_save_state'] * 1e3:.1f} ms) is {floor_ms:.1f} ms, so no FedAvg that writes its result can "
        f"reach more than {ref_ms / floor_ms:.2f} of the reference here; fedloom's "
        f"{res['median_s']['fedavg'] * 1e3:.1f} ms is {res['median_s']['fedavg'] * 1e3 - floor_ms:.1f} ms above that "
        f"floor, and opening and memory-mapping the {res['clients']} updates alone (one value read per page, no "
        f"arithmetic) takes {map_ms:.1f} ms: with both, at most {ref_ms / (floor_ms + map_ms):.2f} of the reference "
        "if none of the three overlapped. The reference reads updates that are already in its memory; the "
        "server's must come from the blob store, and on this virtual machine page faults and new page-cache "
        "pages cost more in some runs than in others, which moves this ratio between runs."
    )
    return f"""## 1. Aggregation throughput

Machine: {common.machine_line(info)}.

Workload: FedAvg over K = {res["clients"]} updates of a {res["parameters"]:,}-parameter float32 model
({res["model_bytes"] / 1e6:.1f} MB each), stored in a local blob store (sha256 sidecars) and warm in the page
cache; {res["reps"]} interleaved repetitions, medians. Throughput is update bytes per second.

{report(res)}

- Against the in-run reference (the same `add_` over the same tensors already in memory), fedloom's FedAvg
  reaches **{ratio:.2f}** of it: target at least 0.6, **{"met" if ratio >= 0.6 else "not met"}**.{reference_text}
  Its output is {same} the reference's sum (same order, same operations).
- {flower_text}
- FedAvg includes opening each update through the blob store, memory-mapping it and writing the new global
  model to disk; the reference does none of that.

![aggregation throughput]({plot_name})

{robust_section(res)}

**What the profile showed and what changed.** pyinstrument on one FedAvg run (self time, this run):

{profile}

1. A profile of the write showed `safetensors.torch.save_file` first serializing the whole model into one
   bytes object before writing it; `weights.save_state` now writes each tensor's memory straight to a
   temporary file and renames it into place, producing the same bytes (a test checks this against the
   library). Writing this run's {res["model_bytes"] / 1e6:.0f} MB result into a fresh file, medians of
   {res["reps"]}: {writes["write_save_file"] * 1e3:.1f} ms with `save_file`, {writes["write_save_state"] * 1e3:.1f} ms
   with `save_state`{write_note}.
2. `LocalBlobStore.open_local` re-hashed the whole file on every open, and a round opens each update at least
   twice (validation, then aggregation). A digest the process has verified is now remembered with the file's
   identity (device, inode, size, mtime, ctime) and re-used while none changes; files changed in the last two
   seconds are always re-hashed. The row "digest re-hashed on every open" is the old behaviour.
3. The profile's largest item is `add_` itself. An earlier version added in slices below torch's parallel
   grain size, on the calling thread, because on a heavily loaded machine (load average 10-24 on 2 cores)
   one `add_` split across torch's two intra-op threads waited for the busy second core. Measured on a
   quiet machine, that halved the throughput (the row "sliced one-thread fold"), so `aggregation.fold` is
   again one whole-tensor `add_` per tensor on torch's threads, as the reference does; `fedloom serve`
   starts its children with `OMP_WAIT_POLICY=PASSIVE`, so idle OpenMP threads sleep instead of spinning
   on a busy core. The accumulator starts as `0 + w * u` from the first update instead of zeros and then
   an add (one pass instead of two), bit-identical (a test checks it). This benchmark runs with torch's
   default threads, like the reference; the worker process runs torch on one thread unless
   `OMP_NUM_THREADS` is set (`workers/main.py`, chosen for the small evaluations of a shared embedded
   server), so a worker dedicated to aggregating large models should set `OMP_NUM_THREADS` to its
   cores. System load average during this run: {load}.
4. Updates were already read as zero-copy, copy-on-write memory maps (`weights.mapped_tensors`), one at a time.
"""


def plot(res: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    names = [n for n in LABELS if n in res["median_s"]]
    values = [res["throughput_bytes_per_s"][n] / 1e9 for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    ax.barh([LABELS[n].replace("`", "") for n in names][::-1], values[::-1], color="tab:blue")
    ax.axvline(
        0.6 * res["throughput_bytes_per_s"]["reference"] / 1e9, color="tab:red", ls="--", label="0.6 x reference"
    )
    ax.set_xlabel("GB/s of update bytes (median)")
    ax.set_title(f"Aggregation of K={res['clients']} updates of {res['model_bytes'] / 1e6:.0f} MB")
    ax.legend(loc="lower right")
    common.save_figure(fig, path)


def main() -> int:
    parser = common.base_parser(__doc__)
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--params", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--flower-child", metavar="SPEC", help=argparse_suppress())
    parser.add_argument("--peak-child", metavar="SPEC", help=argparse_suppress())
    parser.add_argument("--doc-from", type=Path, help="rewrite the docs section from a full run's JSON, no measuring")
    args = parser.parse_args()
    if args.flower_child:
        flower_child(args.flower_child)
        return 0
    if args.peak_child:
        peak_child(args.peak_child)
        return 0
    if args.doc_from:
        res = json.loads(args.doc_from.read_text())
        common.update_doc_section(NAME, doc_section(res, res["machine"], f"img/bench_{NAME}.png"))
        return 0
    clients = args.clients or (5 if args.quick else 10)
    params = args.params or (200_000 if args.quick else 11_000_000)
    # Nine: medians of five moved by a third between runs (Flower's most of all).
    reps = args.reps or (2 if args.quick else 9)
    flower = flower_python(create=not args.quick)
    res = measure(clients, params, reps, robust_reps=1 if args.quick else 5, flower=flower)
    print(report(res))
    print(
        f"FedAvg / reference = {res['ratio_vs_reference']:.2f}; FedAvg / Flower = {res['ratio_vs_flower']:.2f}"
        if res["ratio_vs_flower"]
        else "Flower not run"
    )
    print("profile (self time):", ", ".join(f"{p['function']} {p['share']:.0%}" for p in res["profile_fedavg"]))
    common.publish(args, NAME, res, plot, lambda info, image: doc_section(res, info, image))
    return 0


def argparse_suppress() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
