"""The aggregation and leave-one-out evaluation plans, on files, without Temporal or a blob store."""

from __future__ import annotations

from pathlib import Path

import torch

from fedloom_core.learning.aggregation import aggregate_files, jsonable
from fedloom_core.learning.datasets import load_test
from fedloom_core.learning.evaluation import evaluate_round, plan_evaluation
from fedloom_core.learning.kernels import UpdateFile, fedavg
from fedloom_core.learning.weights import load_state, save_state
from fedloom_core.learning.zoo import build_model


def _files(tmp: Path, count: int) -> tuple[Path, list[UpdateFile]]:
    global_path = tmp / "global.safetensors"
    save_state(build_model("MLP", (8, 8, 1), 10, seed=0).state_dict(), global_path)
    files = []
    for i in range(count):
        path = tmp / f"u{i}.safetensors"
        save_state(build_model("MLP", (8, 8, 1), 10, seed=i + 1).state_dict(), path)
        files.append(UpdateFile(f"c{i}", path, 10 * (i + 1)))
    return global_path, files


def test_aggregate_files_runs_the_named_strategy(tmp_path: Path) -> None:
    global_path, files = _files(tmp_path, 3)
    outcome = aggregate_files(
        strategy="fedavg",
        params={},
        weighted=True,
        round=1,
        seed=0,
        global_path=global_path,
        updates=files,
        out=tmp_path / "out.safetensors",
        state_path=None,
        state_out=tmp_path / "state.safetensors",
    )
    expected = fedavg(files, tmp_path / "expected.safetensors", weighted=True)
    got = load_state(tmp_path / "out.safetensors")
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert outcome.parameters_count == sum(t.numel() for t in expected.values() if t.is_floating_point())
    assert not outcome.wrote_state


def test_jsonable_turns_tensor_numbers_into_plain_ones() -> None:
    info = jsonable({"scale": torch.tensor(0.5), "nested": {"k": torch.tensor(2)}, "list": [torch.tensor(1.0), 3]})
    assert info == {"scale": 0.5, "nested": {"k": 2}, "list": [1.0, 3]}
    assert type(info["scale"]) is float


def test_leave_one_out_plan_under_fedavg_evaluates_the_average_once(tmp_path: Path) -> None:
    _, files = _files(tmp_path, 3)
    state = fedavg(files, tmp_path / "new.safetensors", weighted=True)
    plan = plan_evaluation(state, files, tmp_path, weighted=True)
    assert plan.average_is_global
    states = list(plan.states())
    assert len(states) == 1 + len(files)  # the global model, then one model without each update
    # Without c0 the weighted average is the average of c1 and c2 alone.
    alone = fedavg(files[1:], tmp_path / "without-c0.safetensors", weighted=True)
    assert all(torch.allclose(states[1][n], alone[n], atol=1e-6) for n in alone)
    build = lambda: build_model("MLP", (8, 8, 1), 10)  # noqa: E731
    result = evaluate_round(plan, build, load_test("digits"))
    assert set(result.loo_loss_deltas) == {"c0", "c1", "c2"}
    assert 0.0 <= result.accuracy <= 1.0 and result.loss is not None


def test_a_single_update_gets_no_leave_one_out(tmp_path: Path) -> None:
    _, files = _files(tmp_path, 1)
    plan = plan_evaluation(load_state(files[0].path), files, tmp_path, weighted=True)
    assert len(list(plan.states())) == 1 and plan.loss_deltas([(0.5, 1.0)]) == {}
