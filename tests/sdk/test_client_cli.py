"""FLClient's experiment calls, ``fedloom client --app`` and the built-in client's dataset guard, on a fake server."""

from __future__ import annotations

import functools
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save

from fedloom import FLClient, _retry, app, cli, runtime
from tests.sdk.fake_server import ADMIN, FakeServer, done, train_task

pytestmark = pytest.mark.unit
SERVER = "http://fake"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    server = FakeServer()
    client = functools.partial(FLClient, transport=server.transport)
    monkeypatch.setattr(app, "FLClient", client)
    monkeypatch.setattr(runtime, "FLClient", client)
    monkeypatch.setattr(_retry.time, "sleep", lambda _s: None)
    return server


def test_create_experiment_sends_the_initial_model(fake: FakeServer, tmp_path: Path) -> None:
    api = FLClient(SERVER, ADMIN, transport=fake.transport)
    linear = torch.nn.Linear(3, 2)
    tied = {"w": linear.weight, "w_view": linear.weight.t(), "b": linear.bias}
    created = api.create_experiment({"name": "x", "model_config": {"architecture": "custom"}}, initial_model=tied)
    assert created["experiment_id"] == "exp_1"
    [(exp_id, body, content_type)] = fake.uploads
    assert exp_id == "exp_1" and content_type == "application/octet-stream"
    sent = load(body)
    assert torch.equal(sent["w"], linear.weight.detach()) and torch.equal(sent["w_view"], linear.weight.detach().t())
    # A file goes as it is, whichever format it holds; bytes too.
    torch.save(linear.state_dict(), tmp_path / "init.pt")
    api.upload_initial_model("exp_2", tmp_path / "init.pt")
    api.upload_initial_model("exp_3", save(linear.state_dict()))
    assert fake.uploads[1][1] == (tmp_path / "init.pt").read_bytes()
    assert fake.uploads[2][1] == save(linear.state_dict())
    assert api.create_experiment({"name": "y"}) == {"experiment_id": "exp_1", "name": "y"} and len(fake.uploads) == 3
    assert api.continue_experiment("exp_1", 3) == {"experiment_id": "exp_1", "rounds": 3}
    api.upload_evaluation("c1", "exp_1", 2, {"data_samples": 4, "loss": 0.1})
    assert fake.evaluations == [
        {"client_id": "c1", "experiment_id": "exp_1", "round": 2, "metrics": {"data_samples": 4, "loss": 0.1}}
    ]


APP_MODULE = """
import torch
from fedloom import ClientApp

def train(model, config):
    return {"data_samples": 3}

def make_app():
    return ClientApp(torch.nn.Linear(2, 2), train, client_id="from-app", options={"max_idle_s": 0})
"""


def test_cli_runs_a_client_app(fake: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_site_app.py").write_text(textwrap.dedent(APP_MODULE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])  # cli adds the cwd
    state = torch.nn.Linear(2, 2).state_dict()
    fake.models["m1"] = save(state)
    fake.tasks.extend([train_task(1, "m1"), done()])
    assert cli.main(["client", "--server", SERVER, "--api-key", ADMIN, "--app", "my_site_app:make_app"]) == 0
    assert fake.registered == ["from-app"] and len(fake.updates) == 1
    assert cli.main(["client", "--server", SERVER, "--api-key", ADMIN, "--app", "my_site_app:nothing"]) == 2
    assert cli.main(["client", "--server", SERVER, "--api-key", ADMIN, "--app", "my_site_app"]) == 2


@pytest.mark.parametrize(
    ("dataset", "architecture", "hint"),
    [("mnist", "MLP", "join it with --dataset mnist"), ("blobs", "custom", "fedloom client --app")],
    ids=["mnist", "custom"],
)
def test_a_digits_client_refuses_a_task_for_other_data(
    fake: FakeServer, capsys: pytest.CaptureFixture[str], dataset: str, architecture: str, hint: str
) -> None:
    key = fake.register("d1")
    task = {**train_task(1, "m1"), "dataset": dataset, "model_architecture": architecture}
    task["model_config"] = {"input_shape": [28, 28, 1], "num_classes": 10}
    fake.tasks.extend([task, done()])
    argv = ["client", "--server", SERVER, "--api-key", key, "--client-id", "d1", "--dataset", "digits"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"d1 holds dataset 'digits' but experiment exp_1 trains on '{dataset}'" in err and hint in err, err
    assert not any(p.startswith("/model/download") for _, p, _ in fake.requests) and fake.updates == []


def test_the_built_in_client_trains_and_evaluates_through_run_client(fake: FakeServer) -> None:
    from fedloom_core.learning.zoo import build_model

    key = fake.register("d2")
    model = build_model("MLP", [8, 8, 1], 10)
    fake.models["m1"] = save(model.state_dict())
    task = {**train_task(1, "m1"), "dataset": "digits", "model_architecture": "MLP"}
    task["model_config"] = {"input_shape": [8, 8, 1], "num_classes": 10}
    fake.tasks.extend([task, {**task, "status": "evaluate"}, done()])
    trained = runtime.run_client(server=SERVER, api_key=key, client_id="d2", partition="2/3")
    assert trained == 1
    [update] = fake.updates
    assert update["metrics"]["data_samples"] > 0
    assert {"local_accuracy", "local_loss", "training_time", "epochs_completed"} <= set(update["metrics"])
    [evaluation] = fake.evaluations
    assert evaluation["metrics"]["data_samples"] == update["metrics"]["data_samples"]
    assert 0 <= evaluation["metrics"]["accuracy"] <= 1 and evaluation["metrics"]["loss"] > 0
