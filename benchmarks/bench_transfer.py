"""Transfer: one 44 MB model upload and one download through the real API on loopback, and 10 at once.

    .venv/bin/python benchmarks/bench_transfer.py [--quick] [--out DIR] [--params 11000000] [--reps 5]

A real ``fedloom serve`` (embedded Temporal dev server, worker, API) runs on a temporary data dir.
The benchmark registers clients, starts a one-round FedAvg experiment that selects them all (plus
one that never uploads, so the round stays open), and then:

- replaces the round's global model (the built-in architectures are far below 1 MB) by a
  ``--params`` float32 model: the blob is written into the server's blob store under the model's
  key with its digest, and the model's row gets the new size and digest. Uploads are then checked
  against this model, tensor for tensor, as any upload is;
- **download**: ``GET /model/global`` (metadata), then ``GET /model/download/{model_id}`` streamed
  to the end (``--reps`` times, medians);
- **upload**: ``POST /model/update/{client_id}`` with the multipart body (model file + metrics) of a
  different client each time, answered once the update is validated and stored;
- **10 concurrent uploads** by 10 more clients, while the API process's RSS is sampled from
  ``/proc/<pid>/status`` (its peak reset through ``/proc/<pid>/clear_refs`` just before);
- **reference**: the same number of bytes through a plain loopback TCP socket in this run, the
  ceiling any HTTP transfer on this machine can reach.

The client side is kept thin so the server is what is measured: the multipart body is built once
and sent as raw bytes, and downloads are read with ``iter_raw`` in 1 MiB pieces.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402
import bench_aggregation as agg  # noqa: E402
from _control_plane import RssSampler, Server, start_profiler, start_server, stop_profiler  # noqa: E402

from fedloom_tools.launch import memory_bytes  # noqa: E402

NAME = "transfer"
CONCURRENT = 10
PROFILED = 3
BOUNDARY = "fedloom-bench-boundary-7d1f0c"
TARGET_UPLOAD = 200e6
TARGET_DOWNLOAD = 500e6
TARGET_RSS_GROWTH = 100e6


def register(http: httpx.Client, client_id: str) -> str:
    resp = http.post("/clients/register", json={"client_id": client_id, "capabilities": {}, "location": {}})
    resp.raise_for_status()
    return resp.json()["api_key"]


def open_round(http: httpx.Client, ids: list[str]) -> str:
    """Start a one-round FedAvg experiment over every registered client; return the round's model id."""
    body = {
        "experiment_config": {
            "experiment_id": "bench_transfer",
            "rounds": 1,
            "min_clients": len(ids),
            "client_fraction": 1.0,
            "dataset": "digits",
            "model_architecture": "MLP",
            "round_timeout_s": 3600,
        },
        "aggregation_config": {"strategy": "FedAvg", "weighted": True, "min_updates": len(ids)},
    }
    http.post("/training/start", json=body).raise_for_status()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        task = http.get(f"/clients/{ids[0]}/task").json()
        if task.get("status") == "train":
            return task["model_id"]
        time.sleep(0.2)
    raise RuntimeError("the round did not open in 120 s")


def install_global_model(server: Server, model_id: str, params: int, scratch: Path) -> Path:
    """Replace the round's global model blob by a ``params`` float32 model; return a matching update file."""
    import sqlite3

    import torch

    from fedloom_core.learning.weights import save_state
    from fedloom_core.storage.blobstore import LocalBlobStore

    gen = torch.Generator().manual_seed(0)
    model = {name: torch.randn(shape, generator=gen) for name, shape in agg.model_shapes(params).items()}
    db = sqlite3.connect(server.data_dir / "fedloom.db")
    (key,) = db.execute("SELECT blob_key FROM global_model WHERE model_id = ?", (model_id,)).fetchone()
    local = scratch / "global.safetensors"
    save_state(model, local)
    info = LocalBlobStore(server.data_dir / "blobs").put_file(key, local)
    n_params = sum(t.numel() for t in model.values())
    with db:
        db.execute(
            "UPDATE global_model SET sha256 = ?, size_bytes = ?, parameters_count = ? WHERE model_id = ?",
            (info.sha256, info.size, n_params, model_id),
        )
    db.close()
    update = scratch / "update.safetensors"
    save_state({name: t + 0.01 for name, t in model.items()}, update)
    return update


def multipart(payload: bytes) -> bytes:
    """The upload's multipart body: the model file, then the metrics field."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model_file"; filename="update.safetensors"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = (
        f'\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name="metrics"\r\n\r\n'
        f'{{"data_samples": 100}}\r\n--{BOUNDARY}--\r\n'
    ).encode()
    return head + payload + tail


def upload_headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


# -- the measurements ----------------------------------------------------------------------------


def time_download(http: httpx.Client, model_id: str) -> tuple[float, float, int]:
    """Seconds for the metadata call and for streaming the model file; and the bytes received."""
    start = time.perf_counter()
    meta = http.get("/model/global", params={"format": "safetensors"})
    meta.raise_for_status()
    middle = time.perf_counter()
    received = 0
    with http.stream("GET", f"/model/download/{model_id}", params={"format": "safetensors"}) as resp:
        resp.raise_for_status()
        for chunk in resp.iter_raw(1 << 20):
            received += len(chunk)
    return middle - start, time.perf_counter() - middle, received


def time_upload(http: httpx.Client, client_id: str, key: str, body: bytes) -> float:
    start = time.perf_counter()
    resp = http.post(f"/model/update/{client_id}", content=body, headers=upload_headers(key))
    elapsed = time.perf_counter() - start
    if resp.status_code != 200:
        raise RuntimeError(f"upload of {client_id} failed: {resp.status_code} {resp.text[:300]}")
    return elapsed


async def concurrent_uploads(api: str, clients: dict[str, str], body: bytes) -> list[float]:
    async with httpx.AsyncClient(base_url=api, timeout=600) as http:

        async def one(cid: str) -> float:
            start = time.perf_counter()
            resp = await http.post(f"/model/update/{cid}", content=body, headers=upload_headers(clients[cid]))
            if resp.status_code != 200:
                raise RuntimeError(f"upload of {cid} failed: {resp.status_code} {resp.text[:300]}")
            return time.perf_counter() - start

        return list(await asyncio.gather(*(one(cid) for cid in clients)))


def _drain(conn: socket.socket, nbytes: int) -> None:
    """Receive ``nbytes`` (or until the peer closes) into a reused buffer."""
    buffer = bytearray(1 << 20)
    got = 0
    while got < nbytes:
        n = conn.recv_into(buffer)
        if not n:
            return
        got += n


def loopback_reference(nbytes: int, reps: int) -> list[float]:
    """Seconds to push ``nbytes`` through a loopback TCP connection (sender and receiver threads)."""
    payload = memoryview(bytearray(os.urandom(1 << 20)) * max(1, nbytes >> 20))
    times = []
    for _ in range(reps):
        with socket.create_server(("127.0.0.1", 0)) as listener:
            port = listener.getsockname()[1]
            sender = socket.create_connection(("127.0.0.1", port))
            receiver, _ = listener.accept()
            reader = threading.Thread(target=_drain, args=(receiver, len(payload)))
            start = time.perf_counter()
            reader.start()
            sender.sendall(payload)
            reader.join()
            times.append(time.perf_counter() - start)
            sender.close()
            receiver.close()
    return times


def server_side_floor(update: Path, directory: Path, reps: int) -> dict[str, float]:
    """Medians of the work every upload must do on this machine, outside the API: the floor under its time.

    Writing the body to disk and fsyncing it (the update is durable before the answer), hashing it,
    and the content check (header, structure and finite values).
    """
    import hashlib

    from fedloom_core.learning import weights

    data = update.read_bytes()
    parts: dict[str, list[float]] = {"write_fsync": [], "sha256": [], "finite_check": []}
    for i in range(reps):
        path = directory / f"floor-{i}"
        start = time.perf_counter()
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        parts["write_fsync"].append(time.perf_counter() - start)
        parts["sha256"].append(timed(lambda: hashlib.sha256(data).hexdigest()))
        parts["finite_check"].append(timed(lambda p=path: weights.nonfinite_tensors(p)))
        path.unlink()
    return {name: common.median(ts) for name, ts in parts.items()}


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


PROFILE_FUNCTIONS = {
    "receive_form": "receiving the multipart body (parse, write, hash)",
    "H11Protocol.data_received": "uvicorn/h11: reading the request from the socket",
    "store_update": "store_update: checks, blob store, database",
    "nonfinite_tensors": "finite-value check",
    "LocalBlobStore.adopt_file": "fsync and rename into the blob store",
    "StreamingResponse.stream_response": "download: streaming the response",
    "LocalBlobStore.iter_bytes.<locals>.chunks": "download: reading the blob",
    "H11Protocol.send": "uvicorn/h11: writing the response",
}
IDLE = ("Condition.wait", "EpollSelector.select", "_worker (concurrent/futures/thread.py:81)")


def py_spy_summary(raw: Path) -> dict[str, Any]:
    """Share of the API's busy samples spent under each function of PROFILE_FUNCTIONS, from py-spy's raw output."""
    busy = 0
    under = dict.fromkeys(PROFILE_FUNCTIONS, 0)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not frames or frames[-1].startswith(IDLE):
            continue
        busy += int(count)
        names = {frame.split(" (")[0] for frame in frames}
        for name in under:
            if name in names:
                under[name] += int(count)
    return {"busy_samples": busy, "shares": {k: v / busy for k, v in under.items()} if busy else {}}


def profile_api(server: Server, admin: httpx.Client, model_id: str, clients: dict[str, str], body: bytes) -> Any:
    """py-spy on the API process during a few uploads and downloads (after the timed runs: it costs CPU)."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return None
    raw = server.data_dir.parent / "api-profile.txt"
    proc = start_profiler(server.child_pid("api"), raw, rate=250)
    time.sleep(1.0)
    for cid, key in clients.items():
        time_upload(admin, cid, key, body)
        time_download(admin, model_id)
    stop_profiler(proc)
    return py_spy_summary(raw) if raw.exists() else None


def measure(params: int, reps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedloom-bench-transfer-") as tmp:
        scratch = Path(tmp)
        server = start_server(scratch / "data")
        try:
            return _measure(server, params, reps, scratch)
        finally:
            server.stop()


def _measure(server: Server, params: int, reps: int, scratch: Path) -> dict[str, Any]:
    admin = httpx.Client(base_url=server.api, headers={"Authorization": f"Bearer {server.admin_key}"}, timeout=600)
    single = [f"single-{i:02d}" for i in range(reps + 1)]  # one warm-up upload
    together = [f"together-{i:02d}" for i in range(CONCURRENT)]
    profiled = [f"profiled-{i}" for i in range(PROFILED)]
    keys = {cid: register(admin, cid) for cid in [*single, *together, *profiled, "idle"]}
    model_id = open_round(admin, list(keys))
    update = install_global_model(server, model_id, params, scratch)
    model_bytes = update.stat().st_size
    body = multipart(update.read_bytes())
    pid = server.child_pid("api")
    print(f"model {model_bytes / 1e6:.1f} MB; API pid {pid}; {reps} reps", flush=True)

    downloads, metadata, uploads = [], [], []
    time_download(admin, model_id)  # warm-up
    for i in range(reps + 1):
        upload_s = time_upload(admin, single[i], keys[single[i]], body)
        meta_s, download_s, received = time_download(admin, model_id)
        if received != model_bytes:
            raise RuntimeError(f"downloaded {received} bytes, expected {model_bytes}")
        if i:  # the first of each is a warm-up
            uploads.append(upload_s)
            downloads.append(download_s)
            metadata.append(meta_s)
    loopback = loopback_reference(model_bytes, reps)

    before = memory_bytes(pid) or 0
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    sampler = RssSampler(lambda: {"api": pid}, every=0.01)
    sampler.start()
    started = time.perf_counter()
    latencies = asyncio.run(concurrent_uploads(server.api, {c: keys[c] for c in together}, body))
    wall = time.perf_counter() - started
    samples = [(t, rss["api"]) for t, rss in sampler.stop() if "api" in rss]
    peak = max(memory_bytes(pid, "VmHWM") or 0, max(rss for _, rss in samples))
    profile = profile_api(server, admin, model_id, {c: keys[c] for c in profiled}, body)
    floor = server_side_floor(update, server.data_dir, reps)
    admin.close()
    med = {"upload": common.median(uploads), "download": common.median(downloads), "loopback": common.median(loopback)}
    return {
        "load_average": os.getloadavg(),
        "model_bytes": model_bytes,
        "reps": reps,
        "upload_s": uploads,
        "download_s": downloads,
        "metadata_s": metadata,
        "loopback_s": loopback,
        "median_s": {**med, "metadata": common.median(metadata)},
        "upload_bytes_per_s": model_bytes / med["upload"],
        "download_bytes_per_s": model_bytes / med["download"],
        "loopback_bytes_per_s": model_bytes / med["loopback"],
        "upload_floor_s": floor,
        "api_profile": profile,
        "concurrent": {
            "uploads": CONCURRENT,
            "wall_s": wall,
            "latency_s": latencies,
            "rss_before_bytes": before,
            "rss_peak_bytes": peak,
            "rss_growth_bytes": peak - before,
            "aggregate_bytes_per_s": CONCURRENT * model_bytes / wall,
            "rss_samples": samples[:: max(1, len(samples) // 400)],
        },
    }


def report(res: dict[str, Any]) -> str:
    loop = res["loopback_bytes_per_s"]
    rows = [
        ["upload (POST /model/update)", f"{res['median_s']['upload'] * 1e3:.0f}", res["upload_bytes_per_s"]],
        ["download (GET /model/download)", f"{res['median_s']['download'] * 1e3:.0f}", res["download_bytes_per_s"]],
        ["reference: loopback TCP socket", f"{res['median_s']['loopback'] * 1e3:.0f}", loop],
    ]
    return common.table(
        ["transfer", "median ms", "MB/s", "x loopback"],
        [[name, ms, f"{rate / 1e6:.0f}", f"{rate / loop:.2f}"] for name, ms, rate in rows],
    )


def verdict(ok: bool) -> str:
    return "met" if ok else "not met"


def doc_section(res: dict[str, Any], info: dict[str, Any], plot_name: str) -> str:
    up, down, con = res["upload_bytes_per_s"], res["download_bytes_per_s"], res["concurrent"]
    floor = res["upload_floor_s"]
    floor_total = sum(floor.values()) + res["median_s"]["loopback"]
    profile = res["api_profile"]
    profile_text = (
        f"py-spy on the API process during {PROFILED} more uploads and downloads ({profile['busy_samples']} busy "
        "samples; shares of them under each part):\n\n"
        + "\n".join(f"- {PROFILE_FUNCTIONS[name]}: {share:.0%}" for name, share in profile["shares"].items())
        if profile
        else "(py-spy was not available in this run, so no profile.)"
    )
    return f"""## 3. Transfer

Machine: {common.machine_line(info)}.

Workload: a real `fedloom serve` on loopback; one {res["model_bytes"] / 1e6:.1f} MB float32 safetensors model
(the round's global model is replaced by one of this size, since the built-in architectures are tiny). Upload:
`POST /api/v1/model/update/{{client_id}}` (multipart, answered once the update is validated and stored), a new
client each time; download: `GET /api/v1/model/download/{{model_id}}` streamed to the end (the metadata call
`GET /api/v1/model/global` before it took {res["median_s"]["metadata"] * 1e3:.1f} ms). Medians of {res["reps"]}
after one warm-up; the reference is the same bytes through a plain loopback TCP socket in the same run.

{report(res)}

- Upload: **{up / 1e6:.0f} MB/s**, target at least 200 MB/s: **{verdict(up >= TARGET_UPLOAD)}**.
- Download: **{down / 1e6:.0f} MB/s**, target at least 500 MB/s: **{verdict(down >= TARGET_DOWNLOAD)}**.
- {con["uploads"]} concurrent uploads took {con["wall_s"]:.2f} s in all ({con["aggregate_bytes_per_s"] / 1e6:.0f} MB/s
  together); the API process's RSS went from {con["rss_before_bytes"] / 1e6:.0f} MB to a peak of
  {con["rss_peak_bytes"] / 1e6:.0f} MB, a growth of **{con["rss_growth_bytes"] / 1e6:.1f} MB**, target under 100 MB:
  **{verdict(con["rss_growth_bytes"] < TARGET_RSS_GROWTH)}**.

**What bounds the upload, measured in this run** (medians, outside the API, same file, same disk): writing
it and fsyncing it (an update is durable before it is acknowledged) {floor["write_fsync"] * 1e3:.0f} ms, its
sha256 {floor["sha256"] * 1e3:.0f} ms, the finite-value check {floor["finite_check"] * 1e3:.0f} ms, and moving
the bytes over loopback {res["median_s"]["loopback"] * 1e3:.0f} ms: at least {floor_total * 1e3:.0f} ms, i.e. at
most {res["model_bytes"] / floor_total / 1e6:.0f} MB/s for this machine before any HTTP or Python overhead,
against the measured {res["median_s"]["upload"] * 1e3:.0f} ms.

{profile_text}

**What changed** (each from a py-spy profile of the API during uploads and downloads):

1. The upload body is parsed as it streams in (`api.multipart.receive_form`, python-multipart's parser driven
   by hand): the model file is written once, to `<data dir>/tmp` beside the blobs, and hashed as it
   arrives. Before, the generic form parser spooled it to a temporary file (handing every piece to a
   worker thread), the route copied it to `<data dir>/tmp`, and it was hashed again afterwards.
2. The checked file is renamed into the blob store (`BlobStore.adopt_file`: fsync, rename, digest
   sidecar) instead of copied and re-hashed; `normalize_upload` renames rather than copies too.
3. The finite-value check reads each tensor 128 KiB at a time (torch's parallel grain size, so it runs on
   one thread instead of stalling in parallel regions while other uploads keep the other core busy) and
   judges each piece by its `aminmax` (NaN propagates) instead of mapping the whole file and building an
   `isfinite` mask: a mapped file counts in the API's RSS until it is closed, which with 10 concurrent
   uploads was several models.
4. Downloads go out in 4 MiB pieces (each piece is one hop to a worker thread), and the blob's
   digest, once verified by this process for this very file, is not recomputed for every client.

![transfer]({plot_name})
"""


def plot(res: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = ["upload", "download", "loopback"]
    rates = [res["upload_bytes_per_s"] / 1e6, res["download_bytes_per_s"] / 1e6, res["loopback_bytes_per_s"] / 1e6]
    left.bar(names, rates, color=["tab:blue", "tab:green", "tab:gray"])
    left.axhline(TARGET_UPLOAD / 1e6, color="tab:blue", ls="--", label="upload target")
    left.axhline(TARGET_DOWNLOAD / 1e6, color="tab:green", ls="--", label="download target")
    left.set_yscale("log")
    left.set_ylabel("MB/s (median)")
    left.set_title(f"{res['model_bytes'] / 1e6:.0f} MB model on loopback")
    left.legend()
    samples = res["concurrent"]["rss_samples"]
    right.plot([t for t, _ in samples], [rss / 1e6 for _, rss in samples])
    right.axhline((res["concurrent"]["rss_before_bytes"] + TARGET_RSS_GROWTH) / 1e6, color="tab:red", ls="--")
    right.set_xlabel("seconds")
    right.set_ylabel("API RSS (MB)")
    right.set_title(f"{res['concurrent']['uploads']} concurrent uploads")
    common.save_figure(fig, path)


def main() -> int:
    parser = common.base_parser(__doc__)
    parser.add_argument("--params", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    params = args.params or (250_000 if args.quick else 11_000_000)
    reps = args.reps or (2 if args.quick else 5)
    res = measure(params, reps)
    print(report(res))
    con = res["concurrent"]
    print(
        f"{con['uploads']} concurrent uploads: {con['wall_s']:.2f} s; API RSS {con['rss_before_bytes'] / 1e6:.0f} -> "
        f"peak {con['rss_peak_bytes'] / 1e6:.0f} MB (growth {con['rss_growth_bytes'] / 1e6:.1f} MB)"
    )
    common.publish(args, NAME, res, plot, lambda info, image: doc_section(res, info, image))
    return 0


if __name__ == "__main__":
    sys.exit(main())
