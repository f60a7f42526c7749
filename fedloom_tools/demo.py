"""``fedloom demo``: serve in a temporary data dir, N client processes, one experiment to the end."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from fedloom._client import FLAPIError, FLClient
from fedloom_tools.launch import free_port, spawn_client, start_serve

DEMO_TRAINING = {"local_epochs": 2, "batch_size": 32, "learning_rate": 0.05, "optimizer": "SGD"}


def start_body(rounds: int, clients: int, experiment_id: str | None = None, seed: int = 0) -> dict:
    """The ``POST /training/start`` body the demo (and its test) uses."""
    return {
        "experiment_config": {
            **({"experiment_id": experiment_id} if experiment_id else {}),
            "rounds": rounds,
            "min_clients": clients,
            "client_fraction": 1.0,
            "dataset": "digits",
            "model_architecture": "CNN",
            "seed": seed,
        },
        "training_config": dict(DEMO_TRAINING),
        "aggregation_config": {"strategy": "FedAvg", "weighted": True, "min_updates": clients},
    }


def _wait_clients(api: FLClient, count: int, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"a client process exited early with {dead[0].returncode}")
        if api.get_status()["registered_clients"] >= count:
            return
        time.sleep(0.3)
    raise TimeoutError(f"fewer than {count} clients registered in time")


def _follow(api: FLClient, experiment_id: str, rounds: int) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[metrics]}"),
        TimeElapsedColumn(),
    ) as progress:
        task = progress.add_task("rounds", total=rounds, metrics="waiting for round 1")
        while True:
            try:
                status = api.get_training_status()
            except FLAPIError as exc:  # e.g. 429 on a long run: wait as told, then look again
                time.sleep(exc.retry_after or 1.0)
                continue
            metrics = status.get("round_metrics")
            done = round(status["progress"] * rounds)
            text = (
                f"round {done}: accuracy {metrics['accuracy']:.3f} loss {metrics['loss'] or float('nan'):.3f}"
                if metrics
                else f"round {status['current_round']} training"
            )
            progress.update(task, completed=done, metrics=text)
            if status["status"] != "running":
                return status
            time.sleep(1.0)  # well inside the admin key's general rate limit


def run_demo(clients: int = 5, rounds: int = 10, port: int = 0) -> int:
    """Run the demo; print one summary line and return the exit code."""
    port = port or free_port()
    server_url = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="fedloom-demo-") as data_dir:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDLOOM_")}
        env["FEDLOOM_DATA_DIR"] = data_dir
        logs = Path(data_dir) / "demo-logs"
        logs.mkdir()
        try:
            print(f"demo: starting fedloom serve in {data_dir}", flush=True)
            serve = start_serve(
                Path(data_dir), port=port, log_path=logs / "serve.log", generous_limits=False, headless=False
            )
            procs.append(serve.proc)
            admin_key = serve.admin_key
            api = FLClient(server_url, admin_key)
            print(f"demo: server ready at {server_url}; starting {clients} clients", flush=True)
            for i in range(1, clients + 1):
                log = logs / f"client-{i}.log"
                procs.append(spawn_client(server_url, admin_key, f"demo-client-{i}", f"{i}/{clients}", log, env=env))
            _wait_clients(api, clients, procs[1:])
            started = api.start_training(start_body(rounds, clients))
            exp_id = started["experiment_id"]
            print(
                f"demo: experiment {exp_id} started with {clients} clients, {rounds} rounds of FedAvg on digits",
                flush=True,
            )
            final = _follow(api, exp_id, rounds)
            if final["status"] != "completed":
                print(f"demo: experiment {exp_id} ended as {final['status']}: {final.get('error')}", flush=True)
                return 1
            acc = final["round_metrics"]["accuracy"]
            print(
                f"demo: experiment {exp_id} completed: {final['current_round']} rounds, {clients} clients, "
                f"final accuracy {acc:.4f}",
                flush=True,
            )
            return 0
        except KeyboardInterrupt:
            print("demo: interrupted; stopping everything", flush=True)
            return 130
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in reversed(procs):
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
