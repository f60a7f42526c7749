"""The operator CLI against a live ``fedloom serve``: create from a file, start, watch a real run to its end,
list and show as the API does, download a global model, rotate and revoke keys, and the spec's errors.

One server and one two-round run (2 real client processes, digits MLP) serve the whole module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load

from fedloom import FLClient, cli
from tests.conftest import LiveServer, spawn_clients, start_serve, stop_serve, wait_registered

pytestmark = pytest.mark.e2e
ROUNDS = 2
CLIENTS = 2


def create_body(name: str, rounds: int = ROUNDS) -> dict[str, Any]:
    """The spec's POST /experiments body of a short digits MLP run that waits for both clients."""
    return {
        "name": name,
        "description": "operator CLI test",
        "dataset_config": {"name": "digits", "clients_count": CLIENTS},
        "model_config": {"architecture": "MLP"},
        "training_config": {"rounds": rounds, "local_epochs": 1, "batch_size": 32, "learning_rate": 0.05},
        "policy_config": {"min_clients": CLIENTS},
    }


START_OVERRIDES = {"experiment_config": {"round_timeout_s": 120}, "aggregation_config": {"min_updates": CLIENTS}}


def cli_env(server: LiveServer) -> dict[str, str]:
    """The environment of a CLI process: server and key from FEDLOOM_SERVER and FEDLOOM_API_KEY."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDLOOM_")}
    return {**env, "FEDLOOM_SERVER": server.url, "FEDLOOM_API_KEY": server.admin_key}


def run_cli(server: LiveServer, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "fedloom.cli", *argv]
    return subprocess.run(cmd, env=cli_env(server), capture_output=True, text=True, timeout=timeout)


def in_process(capsys: pytest.CaptureFixture[str], server: LiveServer, *argv: str) -> tuple[int, str, str]:
    """``fedloom <argv> --server ... --api-key ...`` run in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main([*argv, "--server", server.url, "--api-key", server.admin_key])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_serve(tmp_path_factory.mktemp("cli") / "data")
    yield live
    stop_serve(live)


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.api, headers=server.headers(), timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def run(server: LiveServer, http: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Create from a file and start with the CLI while two watchers follow; the run's ids and outputs."""
    tmp = tmp_path_factory.mktemp("cli-run")
    procs = spawn_clients(server, CLIENTS, tmp, "cli")
    try:
        (tmp / "create.json").write_text(json.dumps(create_body("cli-run")))
        (tmp / "start.json").write_text(json.dumps(START_OVERRIDES))
        created = run_cli(server, "experiments", "create", "--file", str(tmp / "create.json"), "--json")
        assert created.returncode == 0, created.stderr
        exp_id = json.loads(created.stdout)["experiment_id"]
        assert http.get(f"/experiments/{exp_id}").json()["status"] == "created"
        cmd = [sys.executable, "-m", "fedloom.cli", "experiments", "watch", exp_id, "--timeout", "240"]
        # Both watchers start before the run does: they wait on a created experiment.
        watchers = {
            fmt: subprocess.Popen(
                [*cmd, *extra], env=cli_env(server), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for fmt, extra in (("text", []), ("json", ["--json"]))
        }
        wait_registered(http, CLIENTS, procs)
        wait_listening(server, len(watchers), watchers.values())
        started = run_cli(server, "experiments", "start", exp_id, "--file", str(tmp / "start.json"), "--json")
        assert started.returncode == 0, started.stderr
        outputs = {fmt: (*w.communicate(timeout=270), w.returncode) for fmt, w in watchers.items()}
        for p in procs:
            p.wait(timeout=60)
        return {"experiment_id": exp_id, "started": json.loads(started.stdout), "watch": outputs}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def wait_listening(server: LiveServer, count: int, procs: Any, timeout: float = 90) -> None:
    """Wait until ``count`` event-stream listeners are subscribed (the API's listener gauge): a watcher
    process still importing when the run starts would begin at the record, not at the run's first event."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=30) as metrics:
        while True:
            families = text_string_to_metric_families(metrics.get("/metrics").text)
            listening = sum(s.value for f in families for s in f.samples if s.name == "fedloom_websocket_listeners")
            if listening >= count:
                return
            assert all(p.poll() is None for p in procs), "a watcher exited before the run started"
            assert time.monotonic() < deadline, f"{listening} of {count} watchers connected after {timeout}s"
            time.sleep(0.2)


def test_watch_follows_the_run_to_its_end(run: dict[str, Any], http: httpx.Client) -> None:
    exp_id = run["experiment_id"]
    assert run["started"]["experiment_id"] == exp_id and run["started"]["total_rounds"] == ROUNDS
    out, err, code = run["watch"]["text"]
    assert code == 0, err
    rounds = http.get("/metrics/training", params={"experiment_id": exp_id}).json()["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    for r in rounds:
        assert f"round {r['round']} completed: accuracy {r['global_accuracy']:.4f}" in out, out
        assert f"round {r['round']} started: {CLIENTS} clients selected" in out, out
    assert "round 1: update from cli1" in out and "round 1: update from cli2" in out, out
    assert f"experiment {exp_id} completed after {ROUNDS} rounds" in out, out
    assert f"final accuracy {rounds[-1]['global_accuracy']:.4f}" in out, out
    assert f"{ROUNDS}/{ROUNDS}" in out  # the progress bar's last state


def test_watch_json_prints_the_events_then_the_record(run: dict[str, Any], http: httpx.Client) -> None:
    exp_id = run["experiment_id"]
    out, err, code = run["watch"]["json"]
    assert code == 0, err
    *events, last = [json.loads(line) for line in out.splitlines()]
    assert last == http.get(f"/experiments/{exp_id}").json()
    assert all(e["experiment_id"] == exp_id for e in events)
    ids = [e["event_id"] for e in events]
    assert ids == sorted(set(ids))
    completed = [e["round"] for e in events if e["type"] == "round_completed"]
    uploads = {(e["round"], e["client_id"]) for e in events if e["type"] == "client_update"}
    assert completed == list(range(1, ROUNDS + 1))
    assert uploads == {(r, f"cli{i}") for r in range(1, ROUNDS + 1) for i in range(1, CLIENTS + 1)}
    assert events[-1]["type"] == "training_completed" and events[-1]["rounds_completed"] == ROUNDS
    assert [e["round"] for e in events if e["type"] == "round_started"] == list(range(1, ROUNDS + 1))
    assert [e["type"] for e in events].count("training_started") == 1


def test_list_and_show_match_the_api(
    run: dict[str, Any], server: LiveServer, http: httpx.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    exp_id = run["experiment_id"]
    code, out, _ = in_process(capsys, server, "experiments", "list", "--json")
    assert code == 0 and json.loads(out) == http.get("/experiments").json()
    code, out, _ = in_process(capsys, server, "experiments", "show", exp_id, "--json")
    assert code == 0 and json.loads(out) == http.get(f"/experiments/{exp_id}").json()
    code, out, _ = in_process(capsys, server, "experiments", "list", "--status", "completed")
    assert code == 0 and exp_id in out and "cli-run" in out and "100%" in out
    code, out, _ = in_process(capsys, server, "experiments", "show", exp_id)
    assert code == 0 and "completed" in out and "rounds" in out, out
    clients = http.get("/clients").json()
    code, out, _ = in_process(capsys, server, "clients", "list", "--json")
    listed = json.loads(out)
    assert code == 0 and {k: v for k, v in listed.items() if k != "timestamp"} == {
        k: v for k, v in clients.items() if k != "timestamp"
    }
    code, out, _ = in_process(capsys, server, "clients", "list", "--round", "1", "--experiment", exp_id)
    assert code == 0 and "cli1" in out and "cli2" in out and "2 clients" in out, out
    code, out, _ = in_process(capsys, server, "clients", "show", "cli1", "--json")
    assert code == 0 and json.loads(out) == http.get("/clients/cli1").json()
    code, out, _ = in_process(capsys, server, "clients", "show", "cli2")
    assert code == 0 and "cli2" in out and "trust_score" in out


def test_models_download_writes_the_api_bytes(
    run: dict[str, Any],
    server: LiveServer,
    http: httpx.Client,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exp_id = run["experiment_id"]
    dest = tmp_path / "round1.safetensors"
    argv = ["models", "download", exp_id, "--round", "1", "-o", str(dest), "--json"]
    code, out, err = in_process(capsys, server, *argv)
    assert code == 0, err
    meta = json.loads(out)
    assert meta["round"] == 1 and meta["path"] == str(dest) and meta["experiment_id"] == exp_id
    sent = http.get(f"/model/download/{meta['model_id']}")
    assert dest.read_bytes() == sent.content and meta["sha256"] == sent.headers["x-model-sha256"]
    assert meta["bytes"] == len(sent.content)
    # The latest round as a torch.save file, named after the model (exported per request: compared by tensors).
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    code, out, err = in_process(capsys, server, "models", "download", exp_id, "--format", "pytorch")
    assert code == 0, err
    latest = http.get("/model/global", params={"experiment_id": exp_id}).json()
    [written] = list((tmp_path / "cwd").iterdir())
    assert written.name == f"{latest['model_id']}.pt" and latest["round"] == ROUNDS and latest["model_id"] in out
    exported = torch.load(written, weights_only=True)
    reference = load(http.get(f"/model/download/{latest['model_id']}").content)
    assert exported.keys() == reference.keys()
    assert all(torch.equal(exported[k], reference[k]) for k in reference)


def test_errors_print_the_spec_code_and_exit_non_zero(
    run: dict[str, Any], server: LiveServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = in_process(capsys, server, "experiments", "show", "exp_missing")
    assert code == 1 and "NOT_FOUND (404)" in err and "exp_missing" in err, err
    code, _, err = in_process(capsys, server, "experiments", "stop", run["experiment_id"])
    assert code == 1 and "EXPERIMENT_NOT_ACTIVE (409)" in err, err
    code, _, err = in_process(capsys, server, "clients", "show", "../experiments")
    assert code == 2 and "client id '../experiments' is invalid" in err, err
    (tmp_path / "bad.json").write_text(json.dumps({"name": "x", "model_config": {"architecture": "MLP"}}))
    code, _, err = in_process(capsys, server, "experiments", "create", "--file", str(tmp_path / "bad.json"))
    assert code == 1 and "INVALID_REQUEST (400)" in err and "dataset_config" in err, err
    (tmp_path / "list.json").write_text("[1, 2]")
    code, _, err = in_process(capsys, server, "experiments", "create", "--file", str(tmp_path / "list.json"))
    assert code == 2 and "must hold a JSON object" in err
    bad_key = cli.main(["experiments", "list", "--server", server.url, "--api-key", "not-a-key"])
    assert bad_key == 1 and "UNAUTHORIZED (401)" in capsys.readouterr().err
    done = run_cli(server, "experiments", "watch", run["experiment_id"], "--api-key", "not-a-key")
    assert done.returncode == 1 and "UNAUTHORIZED" in done.stderr, done.stderr


def test_start_watch_exits_non_zero_when_the_run_is_stopped(
    run: dict[str, Any], server: LiveServer, http: httpx.Client, tmp_path: Path
) -> None:
    # The clients have left after the first run; the round opens and waits for them until stopped.
    (tmp_path / "create.json").write_text(json.dumps(create_body("cli-stopped", rounds=5)))
    created = run_cli(server, "experiments", "create", "--file", str(tmp_path / "create.json"), "--json")
    exp_id = json.loads(created.stdout)["experiment_id"]
    cmd = [sys.executable, "-m", "fedloom.cli", "experiments", "start", exp_id, "--watch", "--timeout", "120"]
    watcher = subprocess.Popen(cmd, env=cli_env(server), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while http.get(f"/experiments/{exp_id}").json()["status"] != "running":
        assert time.monotonic() < deadline and watcher.poll() is None, watcher.communicate()
        time.sleep(0.2)
    stopped = run_cli(server, "experiments", "stop", exp_id, "--reason", "operator_test", "--json")
    assert stopped.returncode == 0 and json.loads(stopped.stdout)["experiment_id"] == exp_id, stopped.stderr
    out, err = watcher.communicate(timeout=150)
    assert watcher.returncode == 4, (out, err)
    assert "started: 5 rounds" in out and "round 1 started: 2 clients selected (cli1, cli2)" in out, out
    assert f"experiment {exp_id} stopped" in out and "operator_test" in out, out


def test_rotate_and_revoke_keys(server: LiveServer, http: httpx.Client, capsys: pytest.CaptureFixture[str]) -> None:
    if not hasattr(FLClient, "rotate_client_key") or not hasattr(FLClient, "revoke_client"):
        pytest.skip("FLClient.rotate_client_key / revoke_client are not in this tree yet")
    old = http.post("/clients/register", json={"client_id": "cli-rot", "client_config": {}}).json()["api_key"]
    as_client = {"Authorization": f"Bearer {old}"}
    assert http.get("/clients/cli-rot", headers=as_client).status_code == 200
    code, out, err = in_process(capsys, server, "clients", "rotate-key", "cli-rot", "--yes", "--json")
    assert code == 0, err
    new = json.loads(out)["api_key"]
    assert new != old
    assert http.get("/clients/cli-rot", headers=as_client).status_code == 401
    assert http.get("/clients/cli-rot", headers={"Authorization": f"Bearer {new}"}).status_code == 200
    code, out, err = in_process(capsys, server, "clients", "rotate-key", "cli-rot", "--yes")
    assert code == 0 and "shown once" in out, err
    newest = out.rsplit(": ", 1)[1].strip()
    assert http.get("/clients/cli-rot", headers={"Authorization": f"Bearer {newest}"}).status_code == 200
    code, out, err = in_process(capsys, server, "clients", "revoke", "cli-rot", "--yes")
    assert code == 0, err
    assert http.get("/clients/cli-rot", headers={"Authorization": f"Bearer {newest}"}).status_code == 401
