"""run_client against a fake server: the three kinds of key, train and evaluate tasks, the model check, retries."""

from __future__ import annotations

import functools
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load, save

from fedloom import ClientApp, FLClient, ModelMismatchError, RegistrationError, _retry, app, run_client
from tests.sdk.fake_server import ADMIN, FakeServer, done, error, evaluate_task, train_task

pytestmark = pytest.mark.unit
SERVER = "http://fake"


class Net(torch.nn.Module):
    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.body = torch.nn.Linear(3, hidden)
        self.head = torch.nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    server = FakeServer(enrollment_token="enroll")
    monkeypatch.setattr(app, "FLClient", functools.partial(FLClient, transport=server.transport))
    sleeps: list[float] = []
    monkeypatch.setattr(_retry.time, "sleep", sleeps.append)
    monkeypatch.setattr(app.time, "sleep", sleeps.append)
    server.sleeps = sleeps  # type: ignore[attr-defined]
    return server


def _global(fake: FakeServer, model_id: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {k: torch.full_like(v, 0.5) for k, v in module.state_dict().items()}
    fake.models[model_id] = save(state)
    return state


def _trainer(calls: list[dict[str, Any]]):  # type: ignore[no-untyped-def]
    def train(model: torch.nn.Module, config: dict[str, Any]) -> dict[str, Any]:
        calls.append({"config": config, "state": {k: v.clone() for k, v in model.state_dict().items()}})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        return {"data_samples": torch.tensor(12), "local_loss": 0.25}

    return train


def test_own_key_trains_evaluates_and_ends_without_registering(fake: FakeServer) -> None:
    key = fake.register("site1")
    model = Net()
    sent = _global(fake, "m1", model)
    fake.models["m2"] = save({k: v + 2 for k, v in sent.items()})
    fake.tasks.extend([{"status": "wait"}, train_task(1, "m1", mu=0.1), evaluate_task(1, "m2"), done()])
    calls: list[dict[str, Any]] = []
    seen_eval: list[torch.Tensor] = []

    def evaluate(model: torch.nn.Module, config: dict[str, Any]) -> dict[str, Any]:
        seen_eval.append(model.body.bias.detach().clone())
        return {"data_samples": 5, "loss": 0.5, "accuracy": 0.8}

    assert run_client(SERVER, key, "site1", model, _trainer(calls), evaluate) == 1
    assert fake.registered == [] and {k for _, _, k in fake.requests} == {key}
    [call] = calls
    assert call["config"] == {"local_epochs": 1, "learning_rate": 0.1, "mu": 0.1}
    assert all(torch.equal(call["state"][k], sent[k]) for k in sent), "global weights were loaded before training"
    [update] = fake.updates
    assert update["experiment_id"] == "exp_1", "the update names the experiment whose task it answers"
    assert update["metrics"]["data_samples"] == 12 and update["metrics"]["local_loss"] == 0.25
    assert torch.equal(load(update["model"])["head.weight"], sent["head.weight"] + 1)
    assert torch.equal(seen_eval[0], sent["body.bias"] + 2), "the evaluated model is the task's new global model"
    assert fake.evaluations == [
        {
            "client_id": "site1",
            "experiment_id": "exp_1",
            "round": 1,
            "metrics": {"data_samples": 5, "loss": 0.5, "accuracy": 0.8},
        }
    ]


@pytest.mark.parametrize("given", [ADMIN, "enroll"], ids=["admin key", "enrollment token"])
def test_admin_key_or_enrollment_token_registers_then_uses_the_own_key(fake: FakeServer, given: str) -> None:
    model = Net()
    _global(fake, "m1", model)
    fake.tasks.extend([train_task(1, "m1"), done()])
    options = {"client_config": {"site": "a"}, "capabilities": {"data_samples": 12}}
    assert run_client(SERVER, given, "site2", model, _trainer([]), **options) == 1
    assert fake.registered == ["site2"]
    at = next(i for i, (_, path, _) in enumerate(fake.requests) if path == "/clients/register")
    assert fake.requests[at][2] == given
    assert {key for _, _, key in fake.requests[at + 1 :]} == {fake.keys["site2"]}, "then it uses its own key"


def test_keys_that_cannot_act_for_the_client_fail_clearly(fake: FakeServer) -> None:
    fake.register("site3")
    other = fake.register("other")
    with pytest.raises(RegistrationError, match="may not act for client 'site3'"):
        run_client(SERVER, other, "site3", Net(), _trainer([]))
    with pytest.raises(RegistrationError, match="already registered: run it with the API key"):
        run_client(SERVER, "enroll", "site3", Net(), _trainer([]))
    with pytest.raises(RegistrationError, match="refused this API key"):
        run_client(SERVER, "bogus", "site4", Net(), _trainer([]))


def test_admin_key_on_a_registered_client_continues_with_it(fake: FakeServer) -> None:
    fake.register("site5")
    fake.tasks.append(done())
    assert run_client(SERVER, ADMIN, "site5", Net(), _trainer([]), max_idle_s=0) == 0
    assert fake.registered == []


def test_a_model_that_does_not_fit_is_refused_before_training(fake: FakeServer) -> None:
    key = fake.register("site6")
    _global(fake, "m1", Net(hidden=5))
    fake.tasks.extend([train_task(1, "m1"), done()])
    calls: list[dict[str, Any]] = []
    with pytest.raises(ModelMismatchError, match=r"tensor 'body.weight' has shape \(5, 3\) in m1 but \(4, 3\)"):
        run_client(SERVER, key, "site6", Net(hidden=4), _trainer(calls))
    assert calls == [] and fake.updates == []


def test_check_fits_names_missing_extra_and_dtype() -> None:
    local = Net().state_dict()
    with pytest.raises(ModelMismatchError, match="has no tensor 'head.bias'"):
        app.check_fits({k: v for k, v in local.items() if k != "head.bias"}, local)
    with pytest.raises(ModelMismatchError, match="has a tensor 'extra'"):
        app.check_fits({**local, "extra": torch.zeros(1)}, local)
    with pytest.raises(ModelMismatchError, match="'head.bias' is torch.float64"):
        app.check_fits({**local, "head.bias": local["head.bias"].double()}, local)
    app.check_fits(local, local)


def test_without_evaluate_fn_it_reports_that_it_cannot_evaluate(fake: FakeServer) -> None:
    key = fake.register("site7")
    fake.tasks.extend([evaluate_task(2, "m9"), evaluate_task(2, "m9"), done()])
    assert run_client(SERVER, key, "site7", Net(), _trainer([])) == 0
    assert [e["metrics"] for e in fake.evaluations] == [{"data_samples": 0, "loss": 0.0}], "reported once"
    assert not any(p.startswith("/model/download") for _, p, _ in fake.requests)


def test_train_fn_must_report_data_samples(fake: FakeServer) -> None:
    key = fake.register("site8")
    _global(fake, "m1", Net())
    fake.tasks.extend([train_task(1, "m1"), done()])
    with pytest.raises(ValueError, match="train_fn must return data_samples"):
        run_client(SERVER, key, "site8", Net(), lambda model, config: {"loss": 1.0})


def test_transient_errors_are_retried_and_permanent_ones_raise(fake: FakeServer) -> None:
    key = fake.register("site9")
    model = Net()
    _global(fake, "m1", model)
    fake.tasks.extend([train_task(1, "m1"), done()])
    fake.failures.extend(
        [
            (r"/clients/site9/task", error(503, "SERVICE_UNAVAILABLE")),
            (r"/clients/site9/task", error(429, "RATE_LIMITED", headers={"Retry-After": "7"})),
            (r"/model/download/m1", error(502, "HTTP_ERROR")),
            (r"/model/update/site9", error(409, "ROUND_NOT_ACTIVE")),
        ]
    )
    assert run_client(SERVER, key, "site9", model, _trainer([])) == 0, "the 409 skipped the round"
    sleeps = fake.sleeps  # type: ignore[attr-defined]
    assert len(sleeps) == 3 and sleeps[1] == 7.0 and 0 <= sleeps[0] <= 0.5 and 0 <= sleeps[2] <= 0.5
    fake.tasks.extend([train_task(2, "m1"), done()])
    fake.failures.append((r"/model/download/m1", error(404, "NOT_FOUND")))
    with pytest.raises(app.FLAPIError, match="404 NOT_FOUND"):
        run_client(SERVER, key, "site9", model, _trainer([]))


def test_connection_errors_retry_within_the_time_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(_retry.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(_retry.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    attempts = []

    def refuse() -> None:
        attempts.append(clock[0])
        raise httpx.ConnectError("refused")

    with pytest.raises(httpx.ConnectError):
        _retry.with_retries(refuse, _retry.Backoff(base_s=1, cap_s=8, max_elapsed_s=60), "poll")
    assert len(attempts) > 5 and attempts[-1] <= 60
    backoff = _retry.Backoff(base_s=1, cap_s=8)
    assert all(0 <= backoff.delay(a, OSError()) <= min(8, 2**a) for a in range(10) for _ in range(20))
    assert not _retry.transient(app.FLAPIError(400, "INVALID_REQUEST", "")) and _retry.transient(ConnectionError())
    assert _retry.transient(app.FLAPIError(408, "INVALID_REQUEST", "Upload timed out"))


def test_client_app_runs_with_its_own_client_id(fake: FakeServer) -> None:
    key = fake.register("site10")
    fake.tasks.append(done())
    client_app = ClientApp(Net(), _trainer([]), client_id="site10", options={"max_idle_s": 0})
    assert client_app.run(SERVER, key) == 0
    with pytest.raises(ValueError, match="client id is needed"):
        ClientApp(Net(), _trainer([])).run(SERVER, key)
