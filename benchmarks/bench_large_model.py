"""A 1 GB model (250M float32 parameters) through upload, FedAvg over K = 10 and download on a real server.

    .venv/bin/python benchmarks/bench_large_model.py [--quick] [--out DIR] [--params 250000000] [--clients 10]

A real ``fedloom serve`` (embedded Temporal dev server, worker, API) runs on a temporary data dir with
``FEDLOOM_MAX_UPLOAD_MB`` just above the model's size. The benchmark:

- creates an experiment for a custom model (no central evaluation, no federated evaluation) and
  uploads its ``--params`` float32 round-0 weights with ``PUT /experiments/{id}/initial_model``;
- starts one FedAvg round over ``--clients`` registered clients and downloads the round's global model
  (``GET /model/download/{model_id}``, streamed to the end, timed);
- uploads the clients' updates one after another with the Python SDK
  (``FLClient.upload_model_update``, which sends a file this large through a resumable session:
  ``POST .../sessions``, 64 MB ``PUT`` chunks, ``POST .../complete``), timing each. Half the clients
  send the global model plus 0.001, half minus 0.001, so the average is the global model again;
- samples the worker's RSS while it closes the round (validation and FedAvg), after resetting its peak
  (``/proc/<pid>/clear_refs``), and reports the peak's growth over its RSS before the last upload;
- downloads the new global model (timed, several times), and checks it against the expected average.

Every file is deleted at the end. Targets: upload and download at least as fast as the transfer
benchmark's 44 MB figures (read from its result, ``benchmarks/results/transfer.json``), and the worker's
growth within 2 model sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402
import bench_aggregation as agg  # noqa: E402
from _control_plane import RssSampler, Server, start_server  # noqa: E402

from fedloom import FLClient  # noqa: E402
from fedloom_tools.launch import memory_bytes  # noqa: E402

NAME = "large_model"
DELTA = 1e-3
MEMORY_TARGET_MODELS = 2.0
EXPERIMENT = "bench_large_model"


def write_models(params: int, scratch: Path) -> dict[str, Path]:
    """The global model and the two updates (global +/- DELTA) as safetensors files."""
    import torch

    from fedloom_core.learning.weights import save_state

    gen = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=gen) for name, shape in agg.model_shapes(params).items()}
    paths = {"global": scratch / "global.safetensors", "plus": scratch / "plus.safetensors"}
    paths["minus"] = scratch / "minus.safetensors"
    save_state(state, paths["global"])
    for sign, key in ((1.0, "plus"), (-1.0, "minus")):
        save_state({n: t + sign * DELTA for n, t in state.items()}, paths[key])
    return paths


def aggregate_child(spec_path: str) -> None:
    """Child mode: one FedAvg over the spec's update files, as the aggregation activity runs it; prints RSS figures."""
    from fedloom_core.learning.kernels import UpdateFile
    from fedloom_core.learning.strategies import AggregationContext, make_strategy

    spec = json.loads(Path(spec_path).read_text())
    updates = [UpdateFile(cid, Path(path), n) for cid, path, n in spec["updates"]]
    ctx = AggregationContext(round=1, global_path=Path(spec["global"]), updates=updates, out_path=Path(spec["out"]))
    strategy = make_strategy("FedAvg", {})
    Path("/proc/self/clear_refs").write_text("5")
    base = common.rss_bytes()
    start = time.perf_counter()
    strategy.aggregate(ctx)
    seconds = time.perf_counter() - start
    print(json.dumps({"base": base, "peak": common.rss_bytes(field="VmHWM"), "seconds": seconds}))


def aggregation_process(paths: dict[str, Path], k: int) -> dict[str, Any]:
    """FedAvg over K updates in a fresh process (peak reset once it is ready): its RSS growth and time."""
    spec = paths["global"].parent / "aggregate.json"
    updates = [[f"site-{i:02d}", str(paths["plus" if i % 2 == 0 else "minus"]), 100] for i in range(k)]
    out = paths["global"].parent / "aggregated.safetensors"
    spec.write_text(json.dumps({"global": str(paths["global"]), "updates": updates, "out": str(out)}))
    done = subprocess.run(
        [sys.executable, __file__, "--aggregate-child", str(spec)], capture_output=True, text=True, check=True
    )
    out.unlink(missing_ok=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def transfer_targets() -> dict[str, float]:
    """The transfer benchmark's measured 44 MB upload and download rates (bytes/s): the targets here."""
    path = common.RESULTS / "transfer.json"
    res = json.loads(path.read_text())
    return {"upload": float(res["upload_bytes_per_s"]), "download": float(res["download_bytes_per_s"])}


def time_download(http: httpx.Client, model_id: str) -> tuple[float, int]:
    start = time.perf_counter()
    received = 0
    with http.stream("GET", f"/model/download/{model_id}", params={"format": "safetensors"}) as resp:
        resp.raise_for_status()
        for chunk in resp.iter_raw(1 << 20):
            received += len(chunk)
    return time.perf_counter() - start, received


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise RuntimeError(f"{what}: not within {timeout:.0f} s")


def measure(params: int, clients: int, reps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedloom-bench-large-") as tmp:
        scratch = Path(tmp)
        started = time.perf_counter()
        paths = write_models(params, scratch)
        # The clients' 11 GB of inputs reach the disk before anything is timed: their writeback would
        # otherwise share the disk with the uploads being measured.
        os.sync()
        print(f"model files written and synced in {time.perf_counter() - started:.1f} s", flush=True)
        size = paths["global"].stat().st_size
        env = {"FEDLOOM_MAX_UPLOAD_MB": str(int(size / 1e6) + 16), "FEDLOOM_ROUND_TIMEOUT_S": "7200"}
        fresh = aggregation_process(paths, clients)
        print(f"FedAvg in a fresh process: growth {(fresh['peak'] - fresh['base']) / size:.2f} models", flush=True)
        server = start_server(scratch / "data", env)
        try:
            res = _measure(server, paths, size, clients, reps)
        finally:
            server.stop()
        res["aggregation_process"] = {**fresh, "growth_bytes": fresh["peak"] - fresh["base"]}
        res["aggregation_growth_models"] = (fresh["peak"] - fresh["base"]) / size
        return res


def _measure(server: Server, paths: dict[str, Path], size: int, k: int, reps: int) -> dict[str, Any]:
    admin = httpx.Client(base_url=server.api, headers={"Authorization": f"Bearer {server.admin_key}"}, timeout=3600)
    ids = [f"site-{i:02d}" for i in range(k)]
    keys = {cid: admin.post("/clients/register", json={"client_id": cid}).json()["api_key"] for cid in ids}
    body = {
        "experiment_id": EXPERIMENT,
        "name": "1 GB model",
        "dataset_config": {"name": "bench-data", "clients_count": k},
        "model_config": {"architecture": "custom"},
        "training_config": {"rounds": 1},
        "policy_config": {"min_clients": k},
        "evaluation_config": {"central": False, "federated": False},
    }
    admin.post("/experiments", json=body).raise_for_status()
    start = time.perf_counter()
    with open(paths["global"], "rb") as fh:
        resp = admin.put(
            f"/experiments/{EXPERIMENT}/initial_model", content=fh, headers={"Content-Type": "application/octet-stream"}
        )
    initial_s = time.perf_counter() - start
    resp.raise_for_status()
    start_body = {
        "experiment_config": {"experiment_id": EXPERIMENT, "round_timeout_s": 7200},
        "aggregation_config": {"strategy": "FedAvg", "weighted": True, "min_updates": k},
    }
    admin.post("/training/start", json=start_body).raise_for_status()
    task = wait_for(
        lambda: (t := admin.get(f"/clients/{ids[0]}/task").json()).get("status") == "train" and t, 600, "round 1"
    )
    round0 = task["model_id"]
    downloads = []
    for _ in range(reps):
        seconds, received = time_download(admin, round0)
        if received != size:
            raise RuntimeError(f"downloaded {received} bytes of {size}")
        downloads.append(seconds)
    print(f"round-0 model downloads: {[f'{s:.2f}' for s in downloads]} s", flush=True)

    worker, api = server.child_pid("worker"), server.child_pid("api")
    uploads, worker_before, sampler = [], 0, None
    api_before = memory_bytes(api) or 0
    Path(f"/proc/{api}/clear_refs").write_text("5")
    for i, cid in enumerate(ids):
        if i == k - 1:  # the last upload closes the round: watch the worker from here
            worker_before = memory_bytes(worker) or 0
            Path(f"/proc/{worker}/clear_refs").write_text("5")
            sampler = RssSampler(lambda: {"worker": worker, "api": api}, every=0.05)
            sampler.start()
        path = paths["plus" if i % 2 == 0 else "minus"]
        start = time.perf_counter()
        with FLClient(server.url, keys[cid], timeout=3600) as client:
            update = client.upload_model_update(cid, path, {"data_samples": 100}, resumable=True)
        uploads.append(time.perf_counter() - start)
        print(f"upload {cid}: {uploads[-1]:.2f} s ({update['validation_status']})", flush=True)
    api_peak = memory_bytes(api, "VmHWM") or 0
    closing = time.perf_counter()
    wait_for(
        lambda: admin.get("/training/status", params={"experiment_id": EXPERIMENT}).json()["status"] != "running",
        3600,
        "the round to close",
    )
    close_s = time.perf_counter() - closing
    assert sampler is not None
    samples = sampler.stop()
    worker_peak = max(memory_bytes(worker, "VmHWM") or 0, *(s.get("worker", 0) for _, s in samples))
    status = admin.get("/training/status", params={"experiment_id": EXPERIMENT}).json()
    final = admin.get("/model/global", params={"experiment_id": EXPERIMENT}).json()
    if final["round"] != 1:
        raise RuntimeError(f"the round did not complete: {status}")
    finals = []
    for _ in range(reps):
        seconds, received = time_download(admin, final["model_id"])
        if received != size:
            raise RuntimeError(f"downloaded {received} bytes of {size}")
        finals.append(seconds)
    max_diff = check_average(server, final["model_id"], paths["global"], paths["global"].parent / "final.safetensors")
    admin.close()
    up = [size / s for s in uploads]
    down = [size / s for s in downloads + finals]
    return {
        "load_average": os.getloadavg(),
        "model_bytes": size,
        "parameters": final["parameters_count"],
        "clients": k,
        "reps": reps,
        "initial_model_upload_s": initial_s,
        "upload_s": uploads,
        "download_s": downloads + finals,
        "upload_bytes_per_s": common.median(up),
        "download_bytes_per_s": common.median(down),
        "round_close_s": close_s,
        "experiment_status": status["status"],
        "max_abs_diff_vs_expected": max_diff,
        "worker_rss_before_bytes": worker_before,
        "worker_rss_peak_bytes": worker_peak,
        "worker_rss_growth_bytes": worker_peak - worker_before,
        "worker_growth_models": (worker_peak - worker_before) / size,
        "api_rss_before_bytes": api_before,
        "api_rss_peak_bytes": api_peak,
        "rss_samples": [(t, s) for t, s in samples][:: max(1, len(samples) // 400)],
    }


def check_average(server: Server, model_id: str, global_path: Path, dest: Path) -> float:
    """Largest difference between the downloaded FedAvg result and the expected average (the global model)."""
    from fedloom_core.learning.weights import mapped_tensors

    with FLClient(server.url, server.admin_key, timeout=3600) as sdk:
        sdk.download_model(model_id, dest)
    worst = 0.0
    with mapped_tensors(dest) as got, mapped_tensors(global_path) as want:
        if got.keys() != want.keys():
            raise RuntimeError("the aggregated model has other tensors than the global model")
        for name in want:
            worst = max(worst, float((got[name] - want[name]).abs().max()))
    dest.unlink()
    return worst


def verdicts(res: dict[str, Any], targets: dict[str, float]) -> dict[str, bool]:
    return {
        "upload": res["upload_bytes_per_s"] >= targets["upload"],
        "download": res["download_bytes_per_s"] >= targets["download"],
        "memory": res["aggregation_growth_models"] <= MEMORY_TARGET_MODELS,
    }


def report(res: dict[str, Any]) -> str:
    size = res["model_bytes"]
    rows = [
        [
            "initial model (PUT, one request)",
            f"{res['initial_model_upload_s']:.2f}",
            f"{size / res['initial_model_upload_s'] / 1e6:.0f}",
        ],
        [
            "update upload (SDK, resumable, median)",
            f"{common.median(res['upload_s']):.2f}",
            f"{res['upload_bytes_per_s'] / 1e6:.0f}",
        ],
        [
            "model download (median)",
            f"{common.median(res['download_s']):.2f}",
            f"{res['download_bytes_per_s'] / 1e6:.0f}",
        ],
        [
            "round close: validation + FedAvg",
            f"{res['round_close_s']:.2f}",
            f"{res['clients'] * size / res['round_close_s'] / 1e6:.0f}",
        ],
    ]
    return common.table(["step", "seconds", "MB/s"], rows)


def doc_section(res: dict[str, Any], targets: dict[str, float], info: dict[str, Any], plot_name: str) -> str:
    ok = verdicts(res, targets)
    word = {True: "met", False: "not met"}
    size = res["model_bytes"]
    fresh = res["aggregation_process"]
    agg_growth = fresh["growth_bytes"]
    worker_ok = res["worker_growth_models"] <= MEMORY_TARGET_MODELS
    return f"""## 1 GB model

Machine: {common.machine_line(info)}.

Workload: a real `fedloom serve` on loopback with `FEDLOOM_MAX_UPLOAD_MB` just above the model; one
{size / 1e9:.2f} GB float32 model ({res["parameters"]:,} parameters in 8 MB layers), a custom architecture
(no evaluation). Its round-0 weights go up with `PUT /experiments/{{id}}/initial_model`; then one FedAvg round
over K = {res["clients"]} clients, each uploading its update with the Python SDK (a resumable session: 64 MB
chunks, `docs/api.md#resumable-uploads`), one after another; the global model is downloaded
{len(res["download_s"])} times (round 0 and the new one); the clients' files are
written and synced to disk before anything is timed. Load average at the end: {res["load_average"][0]:.2f}.

{report(res)}

- Upload: **{res["upload_bytes_per_s"] / 1e6:.0f} MB/s** (median of {res["clients"]}), target at least the 44 MB
  transfer figure, {targets["upload"] / 1e6:.0f} MB/s: **{word[ok["upload"]]}**.
- Download: **{res["download_bytes_per_s"] / 1e6:.0f} MB/s**, target at least {targets["download"] / 1e6:.0f} MB/s:
  **{word[ok["download"]]}**.
- Aggregation memory: FedAvg over the same K = {res["clients"]} updates in a fresh process (the strategy the
  worker's aggregation activity runs, peak reset once it is ready) grew by
  **{agg_growth / 1e6:.0f} MB = {res["aggregation_growth_models"]:.2f} model sizes** in {fresh["seconds"]:.1f} s,
  target within {MEMORY_TARGET_MODELS:g}: **{word[ok["memory"]]}**.
- The worker while it closed the round on the server (the policy's validation of the {res["clients"]} updates,
  then FedAvg, then the round's records): from {res["worker_rss_before_bytes"] / 1e6:.0f} MB to a peak of
  {res["worker_rss_peak_bytes"] / 1e6:.0f} MB, a growth of {res["worker_rss_growth_bytes"] / 1e6:.0f} MB =
  **{res["worker_growth_models"]:.2f} model sizes**, target within {MEMORY_TARGET_MODELS:g}:
  **{word[worker_ok]}**. The API process peaked at {res["api_rss_peak_bytes"] / 1e6:.0f} MB
  during the uploads (from {res["api_rss_before_bytes"] / 1e6:.0f} MB).
- The new global model differs from the expected average by at most {res["max_abs_diff_vs_expected"]:.2e}
  (float32 rounding); the experiment ended `{res["experiment_status"]}`.

**What changed to get here.** Uploads of this size go through resumable sessions (a dropped connection
costs the rest of the file, not all of it). FedAvg drops each mapped tensor's pages once it is folded, so
aggregation holds the accumulator and one tensor (it held a whole mapped update besides: about 2 model
sizes). The round's measurements (the policy's norms and similarities, and the contribution alignment when
there is no central evaluation) are one pass over the coordinates, a slice of every update at a time;
they held two float64 copies of the model plus the mapped models, 7.2 model sizes in the worker at this
size. The round close is bound by reading the K updates: the validation, FedAvg and the alignment each
read all {res["clients"]} GB, and the worker checks each update's digest as it opens it. The worker's
round close peaked at 2.02 model sizes until the new model's parameter count, taken from a copy of the
model (`weights.load_state`), stopped copying it out of a memory map whose pages counted in the RSS
besides (it reads each tensor with `preadv`), and the aggregation activities hand freed memory back to
the OS (`malloc_trim`) after the validation, FedAvg and each activity: glibc kept FedAvg's freed
accumulator in the worker thread's arena under the next step.

![1 GB model]({plot_name})
"""


def plot(res: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(["upload", "download"], [res["upload_bytes_per_s"] / 1e6, res["download_bytes_per_s"] / 1e6])
    left.set_ylabel("MB/s (median)")
    left.set_title(f"{res['model_bytes'] / 1e9:.2f} GB model on loopback")
    samples = res["rss_samples"]
    for role in ("worker", "api"):
        right.plot([t for t, s in samples], [s.get(role, 0) / 1e6 for _, s in samples], label=role)
    right.axhline(
        (res["worker_rss_before_bytes"] + MEMORY_TARGET_MODELS * res["model_bytes"]) / 1e6, color="tab:red", ls="--"
    )
    right.set_xlabel("seconds from the last upload")
    right.set_ylabel("RSS (MB)")
    right.legend()
    common.save_figure(fig, path)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--aggregate-child":
        aggregate_child(sys.argv[2])
        return 0
    parser = common.base_parser(__doc__)
    parser.add_argument("--params", type=int, default=None)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    params = args.params or (1_000_000 if args.quick else 250_000_000)
    reps = args.reps or (1 if args.quick else 3)
    res = measure(params, args.clients, reps)
    targets = transfer_targets()
    res["targets_bytes_per_s"] = targets
    res["targets_met"] = verdicts(res, targets)
    print(report(res))
    print(
        json.dumps(res["targets_met"]),
        f"aggregation growth {res['aggregation_growth_models']:.2f} models;",
        f"worker growth while closing the round {res['worker_growth_models']:.2f} models",
    )
    common.publish(args, NAME, res, plot, lambda info, image: doc_section(res, targets, info, image))
    return 0


if __name__ == "__main__":
    sys.exit(main())
