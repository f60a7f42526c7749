"""Issue 13's acceptance on a live ``fedloom serve``: sites that bring their own model, data and training.

The sites' model class and data live only in a script written to the test's tmp dir and run as
separate processes; the server never imports it. The test loads the same file to make the initial
weights and to load the final global model into the site's class.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from safetensors.torch import load_file

from fedloom import FLClient
from fedloom_tools.launch import spawn_client
from tests.conftest import LiveServer, small_run_body, start_serve, stop_serve

pytestmark = pytest.mark.e2e

SITE_SCRIPT = '''
"""A site of a federated run: its own model class, its own data, its own training loop."""
import argparse, os, sys

import torch
from torch import nn

import fedloom

FEATURES = 8


class SiteNet(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.body = nn.Linear(FEATURES, hidden)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def site_data(site: int, n: int = 400):
    """This site's samples of one shared rule (the sign of a fixed projection), drawn from its own seed."""
    rule = torch.Generator().manual_seed(1234)
    w = torch.randn(FEATURES, generator=rule)
    gen = torch.Generator().manual_seed(site)
    x = torch.randn(n, FEATURES, generator=gen) + 0.3 * site
    y = (x @ w > 0.3 * site * w.sum()).long()
    return (x[: n * 3 // 4], y[: n * 3 // 4]), (x[n * 3 // 4 :], y[n * 3 // 4 :])


def make_fns(site: int):
    (x, y), (tx, ty) = site_data(site)

    def train(model, config):
        opt = torch.optim.SGD(model.parameters(), lr=float(config.get("learning_rate", 0.1)))
        model.train()
        for _ in range(int(config.get("local_epochs", 1))):
            for i in range(0, len(x), 32):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
                loss.backward()
                opt.step()
        return {"data_samples": len(x), "local_loss": loss.item()}

    @torch.no_grad()
    def evaluate(model, config):
        model.eval()
        logits = model(tx)
        return {
            "data_samples": len(tx),
            "loss": float(nn.functional.cross_entropy(logits, ty)),
            "accuracy": float((logits.argmax(1) == ty).float().mean()),
        }

    return train, evaluate


if __name__ == "__main__":
    args = argparse.ArgumentParser()
    args.add_argument("--server")
    args.add_argument("--client-id")
    args.add_argument("--site", type=int)
    args.add_argument("--hidden", type=int, default=16)
    opts = args.parse_args()
    train, evaluate = make_fns(opts.site)
    torch.manual_seed(opts.site)
    try:
        trained = fedloom.run_client(
            opts.server, os.environ["SITE_KEY"], opts.client_id, SiteNet(opts.hidden), train, evaluate
        )
    except fedloom.ModelMismatchError as exc:
        print(f"site refused the global model: {exc}", file=sys.stderr)
        sys.exit(3)
    print(f"trained {trained} rounds")
'''


# One server per test: a site that has left stays registered and eligible for selection.
@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    live = start_serve(tmp_path_factory.mktemp("sdk") / "data")
    yield live
    stop_serve(live)


def _site_module(path: Path) -> ModuleType:
    path.write_text(SITE_SCRIPT)
    spec = importlib.util.spec_from_file_location(f"site_{os.getpid()}_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _site(server: LiveServer, script: Path, client_id: str, site: int, key: str, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDLOOM_")} | {"SITE_KEY": key}
    cmd = [sys.executable, str(script), "--server", server.url, "--client-id", client_id, "--site", str(site), *extra]
    log = open(script.parent / f"{client_id}.log", "wb")  # noqa: SIM115 - the process writes it
    return subprocess.Popen(cmd, cwd=script.parent, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_clients(http: httpx.Client, ids: list[str], procs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while any(http.get(f"/clients/{cid}").status_code != 200 for cid in ids):
        assert time.monotonic() < deadline, "sites did not register in time"
        assert all(p.poll() is None for p in procs), "a site died"
        time.sleep(0.3)


def _wait_ended(http: httpx.Client, exp_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while (status := http.get("/training/status").json())["status"] in ("running", "created"):
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert status["experiment_id"] == exp_id, status
    return status


def _custom_body(name: str, sites: int, rounds: int, dataset: str = "blobs") -> dict:
    return {
        "name": name,
        "dataset_config": {"name": dataset, "clients_count": sites},
        "model_config": {"architecture": "custom"},
        "training_config": {"rounds": rounds, "local_epochs": 2, "learning_rate": 0.1},
        "policy_config": {"min_clients": sites},
    }


def test_three_sites_federate_a_model_the_server_cannot_import(server: LiveServer, tmp_path: Path) -> None:
    http = httpx.Client(base_url=server.api, headers=server.headers(), timeout=30)
    site = _site_module(tmp_path / "site.py")
    ids = ["lab1", "lab2", "lab3"]
    procs = [_site(server, tmp_path / "site.py", cid, i, server.admin_key) for i, cid in enumerate(ids, 1)]
    try:
        _wait_clients(http, ids, procs)
        api = FLClient(server.url, server.admin_key)
        exp = api.create_experiment(_custom_body("own-model", 3, 3), initial_model=site.SiteNet().state_dict())
        exp_id = exp["experiment_id"]
        started = http.post("/training/start", json={"experiment_config": {"experiment_id": exp_id}})
        assert started.status_code == 200, started.text
        assert _wait_ended(http, exp_id)["status"] == "completed"
        rounds = api.get_training_metrics(exp_id)["rounds"]
        assert [r["round"] for r in rounds] == [1, 2, 3]
        assert all(r["global_accuracy"] is None for r in rounds), "the server has no data of its own"
        final = rounds[-1]["federated_metrics"]
        assert final is not None and final["accuracy"] >= 0.8 and final["data_samples"] == 3 * 100, final
        model_id = api.get_global_model(experiment_id=exp_id)["model_id"]
        api.download_model(model_id, tmp_path / "final.safetensors")
        site.SiteNet().load_state_dict(load_file(tmp_path / "final.safetensors"), strict=True)
        for p in procs:
            assert p.wait(timeout=60) == 0, (tmp_path / f"{ids[procs.index(p)]}.log").read_text()
    finally:
        for p in procs:
            p.kill()


def test_guards_a_site_whose_model_does_not_fit_and_a_digits_client_on_mnist(
    server: LiveServer, tmp_path: Path
) -> None:
    """Both are told before they train: which tensor differs, and which dataset the task is for."""
    http = httpx.Client(base_url=server.api, headers=server.headers(), timeout=30)
    site = _site_module(tmp_path / "site.py")
    odd = _site(server, tmp_path / "site.py", "odd1", 1, server.admin_key, "--hidden", "8")
    digits = spawn_client(server.url, server.admin_key, "dig1", "1/1", tmp_path / "dig1.log", "--dataset", "digits")
    exp_id = None
    try:
        _wait_clients(http, ["odd1", "dig1"], [odd, digits])
        api = FLClient(server.url, server.admin_key)
        body = _custom_body("guards", 2, 1, dataset="mnist")
        exp_id = api.create_experiment(body, initial_model=site.SiteNet(16).state_dict())["experiment_id"]
        assert http.post("/training/start", json={"experiment_config": {"experiment_id": exp_id}}).status_code == 200
        assert odd.wait(timeout=120) == 3 and digits.wait(timeout=120) == 2
        log = (tmp_path / "odd1.log").read_text()
        assert "tensor 'body.weight' has shape (16, 8) in model_" in log and "but (8, 8) in this model" in log, log
        log = (tmp_path / "dig1.log").read_text()
        assert f"dig1 holds dataset 'digits' but experiment {exp_id} trains on 'mnist'" in log, log
        for cid in ("odd1", "dig1"):
            assert http.get(f"/clients/{cid}").json()["performance_metrics"]["data_size"] == 0, "it never uploaded"
    finally:
        odd.kill()
        digits.kill()
        if exp_id:
            http.post("/training/stop", json={"reason": "test over"})
            _wait_ended(http, exp_id)


def test_fedloom_client_runs_on_the_key_its_registration_returned(server: LiveServer, tmp_path: Path) -> None:
    http = httpx.Client(base_url=server.api, headers=server.headers(), timeout=30)
    keys = {}
    for cid in ("own1", "own2"):
        resp = http.post("/clients/register", json={"client_id": cid})
        assert resp.status_code == 200, resp.text
        keys[cid] = resp.json()["api_key"]
    procs = [
        spawn_client(server.url, key, cid, f"{i}/2", tmp_path / f"{cid}.log")
        for i, (cid, key) in enumerate(keys.items(), 1)
    ]
    try:
        body = small_run_body("own-keys", 2, 2)
        body["experiment_config"]["round_timeout_s"] = 60
        # The spec's flow: the operator hands each site its key; the sites join a run and stay to its end.
        assert http.post("/training/start", json=body).status_code == 200
        assert _wait_ended(http, "own-keys")["status"] == "completed"
        for cid, p in zip(keys, procs, strict=True):
            assert p.wait(timeout=60) == 0, (tmp_path / f"{cid}.log").read_text()
            log = (tmp_path / f"{cid}.log").read_text()
            assert "is registered; continuing with the given key" in log and "round 2: acc" in log, log
    finally:
        for p in procs:
            p.kill()
