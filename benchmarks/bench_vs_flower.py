"""End to end against Flower: the same federated job on Flower's deployment engine and on fedloom.

The job is the digits experiment of ``make demo``: fedloom's CNN (``fedloom_core.learning.zoo``),
FedAvg weighted by samples, 5 clients on fedloom's IID partition of scikit-learn's digits (seed 0),
SGD (momentum 0.9), 2 local epochs of batch 32 at learning rate 0.05, fedloom's per-client per-round
training seeds, the same seeded initial weights and the server evaluating the global model on the
test split after each round; 10 rounds.

- **Flower** (its own virtualenv, as in ``bench_aggregation.py``, with flwr 1.42 and the CPU build
  of torch): ``flower-superlink``, one ``flower-supernode`` per client and ``flwr run`` of the Flower
  App in ``benchmarks/flower_app`` (which trains with fedloom's own loop, so the work is identical).
- **fedloom**, in both layouts of ``fedloom serve``: the default (the API process runs the worker
  too) and ``--separate-worker`` (the API and the worker as two processes); one ``fedloom client``
  process per client.

Every process is started at t0. Start-up is t0 to round 1's training being sent (Flower: the
strategy's ``configure_train`` of round 1; fedloom: round 1 recorded as open); wall time is t0 to
the end of the last round (Flower: ``strategy.start`` returned; fedloom: the experiment recorded as
finished). CPU seconds come from each process tree's rusage (and per-process /proc samples, the
larger of the two); peak RSS is the largest sum, over one sample, of the peaks (VmHWM) of a side's
live processes. Clients run torch on one thread on both sides (``OMP_NUM_THREADS=1`` and
``torch.set_num_threads(1)``); so do both servers' evaluations. Runs alternate Flower, fedloom,
fedloom ``--separate-worker``.

    .venv/bin/python benchmarks/bench_vs_flower.py [--quick] [--out DIR] [--runs 3]
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from benchmarks._common import base_parser, machine_line, median, publish, pyplot, save_figure, table  # noqa: E402
from benchmarks._control_plane import _epoch, db_round_times, db_rows  # noqa: E402
from benchmarks._flower_venv import FLWR_VERSION, flower_bin  # noqa: E402
from fedloom_tools.demo import DEMO_TRAINING, start_body  # noqa: E402
from fedloom_tools.launch import GENEROUS_LIMITS, free_port, spawn_client  # noqa: E402
from fedloom_tools.serve import wait_for_port  # noqa: E402

NAME = "vs_flower"
APP = Path(__file__).resolve().parent / "flower_app"
ROOT = Path(__file__).resolve().parent.parent
CLIENT_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TICK = os.sysconf("SC_CLK_TCK")


def client_id(i: int) -> str:
    return f"bench-client-{i}"


def prepare_data(work: Path, clients: int) -> None:
    """fedloom's shards, test split and seeded initial CNN as .npz files, for the Flower App."""
    import numpy as np

    from fedloom_core.learning.datasets import client_partition, dataset_info, load_test
    from fedloom_core.learning.zoo import build_model

    out = work / "data"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(1, clients + 1):
        shard = client_partition("digits", i - 1, clients, seed=0)
        np.savez(out / f"{client_id(i)}.npz", x=shard.x.numpy(), y=shard.y.numpy())
    test = load_test("digits")
    np.savez(out / "test.npz", x=test.x.numpy(), y=test.y.numpy())
    info = dataset_info("digits")
    (out / "meta.json").write_text(json.dumps({"input_shape": list(info.input_shape), "num_classes": info.num_classes}))
    # The round-0 model fedloom's workflow builds for an experiment with seed 0.
    state = build_model("CNN", info.input_shape, info.num_classes, seed=0).state_dict()
    np.savez(out / "initial.npz", **{k: v.numpy() for k, v in state.items()})


# -- processes, their CPU and memory -------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds so far) for every process."""
    found: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
                found[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK)
            except (OSError, IndexError, ValueError):
                continue
    return found


def _status(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _label(pid: int) -> str:
    """A process's role: the word after ``-m`` (``fedloom.cli worker``), else its program's name."""
    try:
        words = [w.decode(errors="replace") for w in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if w]
    except OSError:
        return "?"
    if "-m" in words:
        return " ".join(words[words.index("-m") + 1 :][:2])
    names = [Path(w).name for w in words[:2]]
    if not names:  # a zombie: no command line any more
        return "?"
    return names[1] if names[0].startswith("python") and len(names) > 1 else names[0]


class Sampler(threading.Thread):
    """Every ``period`` s: each group's process trees, their CPU and the sum of their live processes' peaks."""

    def __init__(self, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.period, self.groups, self.stop_event = period, {}, threading.Event()
        self.peak: dict[str, int] = {}
        self.cpu: dict[str, dict[int, float]] = {}
        self.by_label: dict[str, dict[str, int]] = {}
        self.seen: dict[int, str] = {}

    def add(self, group: str, pid: int) -> None:
        self.groups.setdefault(group, set()).add(pid)

    def sample(self) -> None:
        table_ = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table_.items():
            children.setdefault(ppid, []).append(pid)
        for group, roots in list(self.groups.items()):
            tree, todo = set(), [r for r in roots if r in table_]
            while todo:
                pid = todo.pop()
                if pid not in tree:
                    tree.add(pid)
                    todo += children.get(pid, [])
            total = 0
            for pid in tree:
                hwm = _status(pid, "VmHWM")
                total += hwm
                self.cpu.setdefault(group, {})[pid] = table_[pid][1]
                labels = self.by_label.setdefault(group, {})
                label = self.seen.get(pid) or _label(pid)
                if label != "?":
                    self.seen[pid] = label
                labels[label] = max(labels.get(label, 0), hwm)
            self.peak[group] = max(self.peak.get(group, 0), total)

    def run(self) -> None:
        while not self.stop_event.wait(self.period):
            self.sample()

    def finish(self) -> None:
        self.stop_event.set()
        self.join()

    def kill_leftovers(self) -> None:
        """SIGKILL any process seen in a tree that outlived its reaped root (e.g. Flower's SuperExec)."""
        for group in self.cpu.values():
            for pid in group:
                if pid in self.seen and _label(pid) == self.seen[pid]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass


def wait_for_exit(proc: subprocess.Popen, timeout: float = 30) -> bool:
    """Reap ``proc`` with wait4 once it ends (within ``timeout`` s), keeping its rusage; whether it ended."""
    deadline = time.monotonic() + timeout
    while proc.returncode is None:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode, proc.rusage = os.waitstatus_to_exitcode(status), usage  # type: ignore[attr-defined]
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def reap(proc: subprocess.Popen, timeout: float = 30) -> float:
    """Stop ``proc`` (SIGTERM, then SIGKILL); the CPU seconds of it and its reaped descendants."""
    if proc.returncode is None:
        proc.terminate()
        if not wait_for_exit(proc, timeout):
            proc.kill()
            wait_for_exit(proc, 30)
    usage = getattr(proc, "rusage", None)
    return (usage.ru_utime + usage.ru_stime) if usage else 0.0


def launch(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def side_figures(sampler: Sampler, cpu: dict[str, float]) -> dict[str, Any]:
    sampled = {g: sum(v.values()) for g, v in sampler.cpu.items()}
    server = max(cpu["server"], sampled.get("server", 0.0))
    clients = sum(max(cpu[g], sampled.get(g, 0.0)) for g in cpu if g.startswith("client"))
    return {
        "cpu_server_s": server,
        "cpu_clients_s": clients,
        "cpu_total_s": server + clients,
        "cpu_rusage": cpu,
        "cpu_sampled": sampled,
        "rss_server_bytes": sampler.peak.get("server", 0),
        "rss_client_bytes": sampler.peak.get("client-1", 0),
        "rss_server_by_process": sampler.by_label.get("server", {}),
        "rss_client_by_process": sampler.by_label.get("client-1", {}),
    }


# -- Flower --------------------------------------------------------------------------------------


def run_flower(work: Path, clients: int, rounds: int) -> dict[str, Any]:
    bin_dir = flower_bin(create=True)
    assert bin_dir is not None
    work.mkdir(parents=True)
    prepare_data(work, clients)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDLOOM_", "VIRTUAL_ENV"))}
    env |= {"FLWR_HOME": str(work / "flwr-home"), "PATH": f"{bin_dir}:{env.get('PATH', '')}"}
    port = free_port()  # flwr 1.42 serves its runtime, fleet and control APIs on one HTTP port
    (work / "flwr-home").mkdir()
    (work / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    config = (
        f'work-dir="{work}" repo-root="{ROOT}" num-server-rounds={rounds} num-clients={clients} '
        f"local-epochs={DEMO_TRAINING['local_epochs']} batch-size={DEMO_TRAINING['batch_size']} "
        f'learning-rate={DEMO_TRAINING["learning_rate"]} optimizer="{DEMO_TRAINING["optimizer"]}" seed=0'
    )
    sampler = Sampler()
    t0 = time.time()
    superlink = launch(
        [f"{bin_dir}/flower-superlink", "--insecure", "--database", str(work / "superlink.db"),
         "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"],
        env, work / "superlink.log",
    )  # fmt: skip
    sampler.add("server", superlink.pid)
    nodes = []
    for i in range(1, clients + 1):
        cmd = [f"{bin_dir}/flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}"]
        cmd += ["--port", str(free_port()), "--node-config", f'client-id="{client_id(i)}"']
        nodes.append(launch(cmd, env | CLIENT_ENV, work / f"supernode-{i}.log"))
        sampler.add(f"client-{i}", nodes[-1].pid)
    sampler.start()
    try:
        wait_for_port("127.0.0.1", port, 120, superlink)
        run = launch([f"{bin_dir}/flwr", "run", str(APP), "bench", "--stream", "--run-config", config], env,
                     work / "flwr-run.log")  # fmt: skip
        deadline = time.monotonic() + 1800
        while not (events := _events(work)) or events[-1]["event"] != "end":
            if wait_for_exit(run, 0) or time.monotonic() > deadline:  # ended (or hung) without the end event
                raise RuntimeError(f"Flower's run did not finish; see {work}/*.log")
            time.sleep(0.2)
    finally:
        sampler.finish()
        cpu = {f"client-{i}": reap(p) for i, p in enumerate(nodes, 1)}
        cpu["server"] = reap(superlink)
        if "run" in locals():
            cpu["flwr_run_cli"] = reap(run)
        sampler.kill_leftovers()
    starts = {e["round"]: e["t"] for e in events if e["event"] == "round_start"}
    accuracy = {e["round"]: e["accuracy"] for e in events if e["event"] == "evaluated" and e["round"] > 0}
    end = next(e["t"] for e in events if e["event"] == "end")
    cli_cpu = cpu.pop("flwr_run_cli", 0.0)
    return {
        "wall_s": end - t0,
        "startup_s": starts[1] - t0,
        "accuracy": accuracy,
        "final_accuracy": accuracy[max(accuracy)],
        "cpu_flwr_run_cli_s": cli_cpu,
        **side_figures(sampler, cpu),
    }


def _events(work: Path) -> list[dict[str, Any]]:
    """What the ServerApp recorded so far (complete lines only)."""
    path = work / "events.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("\n")]


# -- fedloom -------------------------------------------------------------------------------------


def run_fedloom(work: Path, clients: int, rounds: int, separate_worker: bool = False) -> dict[str, Any]:
    data_dir = work / "data"
    data_dir.mkdir(parents=True)
    port, admin = free_port(), secrets.token_urlsafe(32)
    base = {k: v for k, v in os.environ.items() if not k.startswith("FEDLOOM_")}
    env = base | GENEROUS_LIMITS | {"FEDLOOM_DATA_DIR": str(data_dir), "FEDLOOM_ADMIN_API_KEY": admin}
    cmd = [sys.executable, "-m", "fedloom.cli", "serve", "--port", str(port), "--temporal-port", str(free_port())]
    cmd += ["--temporal-ui-port", str(free_port()), "--temporal-headless"]
    cmd += ["--separate-worker"] if separate_worker else []
    url = f"http://127.0.0.1:{port}"
    sampler = Sampler()
    t0 = time.time()
    serve = launch(cmd, env, work / "serve.log")
    sampler.add("server", serve.pid)
    procs = []
    for i in range(1, clients + 1):
        procs.append(spawn_client(url, admin, client_id(i), f"{i}/{clients}", work / f"client-{i}.log",
                                  env=base | CLIENT_ENV))  # fmt: skip
        sampler.add(f"client-{i}", procs[-1].pid)
    sampler.start()
    try:
        with httpx.Client(base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {admin}"}, timeout=10) as api:
            exp_id = _start_when_registered(api, serve, procs, clients, rounds)
            final = _wait_finished(api, exp_id)
        if final["status"] != "completed":
            raise RuntimeError(f"fedloom's experiment ended {final['status']}: {final.get('error')}")
        for proc in procs:
            wait_for_exit(proc, 60)
    finally:
        sampler.finish()
        cpu = {f"client-{i}": reap(p) for i, p in enumerate(procs, 1)}
        cpu["server"] = reap(serve)
        sampler.kill_leftovers()
    ((finished,),) = db_rows(data_dir, "SELECT finished_at FROM experiment WHERE experiment_id = ?", exp_id)
    times = db_round_times(data_dir, exp_id)
    rows = db_rows(data_dir, "SELECT round, global_accuracy FROM round_metrics WHERE experiment_id = ?", exp_id)
    accuracy = {int(r): float(a) for r, a in rows}
    return {
        "wall_s": _epoch(finished) - t0,
        "startup_s": times[1]["opened"] - t0,
        "accuracy": accuracy,
        "final_accuracy": accuracy[max(accuracy)],
        **side_figures(sampler, cpu),
    }


def _start_when_registered(api: httpx.Client, serve, procs, clients: int, rounds: int) -> str:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if wait_for_exit(serve, 0) or any(wait_for_exit(p, 0) for p in procs):
            raise RuntimeError("fedloom serve or a client exited before the experiment started")
        try:
            if api.get("/status").json().get("registered_clients", 0) >= clients:
                started = api.post("/training/start", json=start_body(rounds, clients))
                started.raise_for_status()
                return started.json()["experiment_id"]
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.1)
    raise TimeoutError("fedloom's clients did not register in time")


def _wait_finished(api: httpx.Client, exp_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        status = api.get("/training/status", params={"experiment_id": exp_id}).json()
        if status.get("status") not in ("running", "pending", "starting", None):
            return status
        time.sleep(0.25)
    raise TimeoutError("fedloom's experiment did not finish in time")


# -- the report ----------------------------------------------------------------------------------

METRICS = (
    ("wall_s", "wall time (t0 to the last round's end)", "{:.1f} s", 1),
    ("cpu_total_s", "CPU, server side and clients", "{:.1f} s", 1),
    ("cpu_server_s", "CPU, server side", "{:.1f} s", 1),
    ("cpu_clients_s", "CPU, all clients", "{:.1f} s", 1),
    ("startup_s", "start-up to round 1", "{:.1f} s", 1),
    ("rss_server_bytes", "peak RSS, server side (summed over its processes)", "{:.0f} MB", 1e6),
    ("rss_client_bytes", "peak RSS, one client (summed over its processes)", "{:.0f} MB", 1e6),
    ("final_accuracy", "final accuracy (test split)", "{:.4f}", 1),
)


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {key: median([r[key] for r in runs]) for key, *_ in METRICS}


# fedloom's two layouts of ``fedloom serve``, by their key in the results.
LAYOUTS = {"fedloom": "fedloom serve", "fedloom_sep": "fedloom serve --separate-worker"}
COLOURS = {"flower": "C0", "fedloom": "C1", "fedloom_sep": "C2"}


def rows(res: dict[str, Any]) -> list[list[str]]:
    fl = res["median"]["flower"]
    out = []
    for key, label, fmt, scale in METRICS:
        row = [label, fmt.format(fl[key] / scale)]
        for side in LAYOUTS:
            fe = res["median"][side]
            row += [fmt.format(fe[key] / scale), f"{fe[key] / fl[key]:.2f}" if fl.get(key) else "-"]
        out.append(row)
    return out


def checks(fl: dict[str, float], fe: dict[str, float]) -> dict[str, bool]:
    """The issue's targets for one fedloom layout against Flower's medians."""
    return {
        "start-up to round 1 no worse than Flower's": fe["startup_s"] <= fl["startup_s"],
        "server-side peak RSS no worse than Flower's": fe["rss_server_bytes"] <= fl["rss_server_bytes"],
        "wall time at most 0.1 of Flower's": fe["wall_s"] <= 0.1 * fl["wall_s"],
        "CPU at most 0.1 of Flower's": fe["cpu_total_s"] <= 0.1 * fl["cpu_total_s"],
    }


def plot(res: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for side, runs in res["runs"].items():
        for i, run in enumerate(runs):
            rr = sorted(run["accuracy"], key=int)
            axes[0].plot([int(r) for r in rr], [run["accuracy"][r] for r in rr], marker=".",
                         label=side if i == 0 else None, color=COLOURS[side])  # fmt: skip
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("test accuracy")
    axes[0].legend()
    keys = ["startup_s", "wall_s"]
    for j, side in enumerate(COLOURS):
        axes[1].bar([k + j * 0.27 for k in range(len(keys))], [res["median"][side][k] for k in keys], 0.27, label=side)
    axes[1].set_xticks([k + 0.27 for k in range(len(keys))], ["start-up to round 1", "wall time"])
    axes[1].set_ylabel("seconds (median)")
    axes[1].legend()
    save_figure(fig, path)


def breakdown(res: dict[str, Any], side: str) -> str:
    run = res["runs"][side][0]
    parts = sorted(run["rss_server_by_process"].items(), key=lambda kv: -kv[1])
    return ", ".join(f"{name} {b / 1e6:.0f} MB" for name, b in parts)


def section(res: dict[str, Any], info: dict[str, Any], image: str) -> str:
    fl = res["median"]["flower"]
    verdicts = "\n".join(
        f"- `{name}`: "
        + "; ".join(f"{k}: **{'met' if ok else 'NOT met'}**" for k, ok in checks(fl, res["median"][side]).items())
        for side, name in LAYOUTS.items()
    )
    same = all(
        abs(a["accuracy"][r] - b["accuracy"][r]) < 0.02
        for side in LAYOUTS
        for a, b in zip(res["runs"]["flower"], res["runs"][side], strict=True)
        for r in a["accuracy"]
    )
    return f"""## End to end against Flower

The same federated job on Flower {res["flwr"]}'s deployment engine (`flower-superlink`, one
`flower-supernode` per client, `flwr run`; subprocess isolation, in Flower's own virtualenv with torch
{res["flower_torch"]}) and on fedloom (`fedloom serve`, one `fedloom client` per client): fedloom's
digits CNN, FedAvg weighted by samples, {res["clients"]} clients on fedloom's IID partition (seed 0), SGD
(momentum 0.9), {DEMO_TRAINING["local_epochs"]} local epochs of batch {DEMO_TRAINING["batch_size"]} at learning
rate {DEMO_TRAINING["learning_rate"]}, fedloom's training seeds and seeded initial weights, {res["rounds"]} rounds,
the global model evaluated on the test split after each round. The Flower App
(`benchmarks/flower_app`) trains and evaluates with fedloom's own loops. fedloom runs in both layouts of
`fedloom serve`: the default, where the API process runs the worker too, and `--separate-worker`, where
the API and the worker are two processes (for heavy aggregation; `docs/running.md`). Every client
process runs torch on one thread (`OMP_NUM_THREADS=1`, `torch.set_num_threads(1)`), and so does each
server's evaluation.
Medians of {res["runs_per_side"]} interleaved runs. {machine_line(info)}; load average
{res["load_average"][0]:.1f} at the start, {res["load_average"][1]:.1f} at the end.

{table(["", "Flower", "fedloom", "/ Flower", "fedloom --separate-worker", "/ Flower"], rows(res))}

{verdicts}

Per-round accuracy {
        "agrees within 0.02 in every round of every run"
        if same
        else "differs by more than 0.02 in some round (see the JSON result)"
    }.

- t0 is when the first process is launched (every process starts at once; fedloom starts the experiment
  when its {res["clients"]} clients have registered, Flower's strategy waits for {res["clients"]} nodes). Start-up
  ends when round 1's training is handed out; wall time when the last round's model is evaluated and the
  run recorded as finished.
- CPU is user + system time of every process tree (rusage at reaping, or /proc samples when larger).
  Flower's `flwr run` client took a further {
        median([r["cpu_flwr_run_cli_s"] for r in res["runs"]["flower"]]):.1f} s (not counted).
- Peak RSS is the largest sum of the live processes' peaks seen in one sample (every 0.2 s). Server side,
  first run: Flower: {breakdown(res, "flower")}; fedloom: {breakdown(res, "fedloom")};
  fedloom --separate-worker: {breakdown(res, "fedloom_sep")}. fedloom's `serve` process becomes a small
  standard-library supervisor once its children are planned (`fedloom_tools/supervisor.py`).
- Flower starts a fresh `flwr-clientapp` process (importing torch) for each message on each node, which
  is where most of its wall time and CPU go; a fedloom client stays up across rounds.

![fedloom vs Flower]({image})
"""


def main() -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--runs", type=int, default=3, help="runs per side, interleaved")
    args = parser.parse_args()
    clients, rounds, runs = (2, 2, 1) if args.quick else (5, 10, args.runs)
    have_flower = flower_bin(create=not args.quick) is not None
    load = [os.getloadavg()[0]]
    results: dict[str, list[dict[str, Any]]] = {"flower": [], "fedloom": [], "fedloom_sep": []}
    with tempfile.TemporaryDirectory(prefix="fedloom-bench-vs-flower-") as tmp:
        for i in range(runs):
            if have_flower:
                results["flower"].append(run_flower(Path(tmp) / f"flower-{i}", clients, rounds))
                print("flower", {k: results["flower"][-1][k] for k, *_ in METRICS}, flush=True)
            for side in LAYOUTS:
                work = Path(tmp) / f"{side}-{i}"
                results[side].append(run_fedloom(work, clients, rounds, separate_worker=side == "fedloom_sep"))
                print(side, {k: results[side][-1][k] for k, *_ in METRICS}, flush=True)
    load.append(os.getloadavg()[0])
    res: dict[str, Any] = {
        "quick": args.quick, "clients": clients, "rounds": rounds, "runs_per_side": runs,
        "flwr": FLWR_VERSION if have_flower else None, "flower_torch": "2.13.0+cpu",
        "runs": results, "load_average": load,
        "median": {side: medians(r) for side, r in results.items() if r},
    }  # fmt: skip
    if have_flower:
        print(table(["", "Flower", "fedloom", "ratio", "fedloom --separate-worker", "ratio"], rows(res)))
    elif not args.quick:
        raise SystemExit("Flower's virtualenv could not be made")
    publish(args, NAME, res, plot if have_flower else _plot_fedloom, lambda info, img: section(res, info, img))
    return 0


def _plot_fedloom(res: dict[str, Any], path: Path) -> None:
    """--quick without Flower's venv: the fedloom run's accuracy alone."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    run = res["runs"]["fedloom"][0]
    ax.plot(sorted(run["accuracy"]), [run["accuracy"][r] for r in sorted(run["accuracy"])], marker=".")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
