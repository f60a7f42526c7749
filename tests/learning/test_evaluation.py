"""The server's evaluation: accuracy, loss and leave-one-out contribution deltas, on real digits models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from activities.aggregation import AggregationActivities
from fedloom_core.learning import training
from fedloom_core.learning.datasets import load_test
from fedloom_core.learning.kernels import UpdateFile, fedavg
from fedloom_core.learning.weights import save_state
from fedloom_core.learning.zoo import build_model
from fedloom_core.messages import EvaluateInput, EvaluationSpec, ModelRef, UpdateRef
from fedloom_core.storage.blobstore import LocalBlobStore

SHAPE = [8, 8, 1]


def _store_state(store: LocalBlobStore, key: str, state: dict[str, torch.Tensor], tmp: Path) -> None:
    local = tmp / key.replace("/", "_")
    save_state(state, local)
    store.put_file(key, local)


@pytest.fixture
def setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Four CNN updates of different quality (trained 0-3 epochs on the test split), stored as blobs."""
    store = LocalBlobStore(tmp_path / "blobs")
    test = load_test("digits")
    refs, files = [], []
    for i in range(4):
        torch.manual_seed(i)
        model = build_model("CNN", SHAPE, 10)
        training.train_local(model, test, epochs=i, batch_size=32, learning_rate=0.05, seed=i)
        key = f"updates/e1/1/c{i}.safetensors"
        _store_state(store, key, model.state_dict(), tmp_path)
        refs.append(UpdateRef(update_id=f"u{i}", client_id=f"c{i}", blob_key=key, num_samples=50 + 30 * i))
        files.append(UpdateFile(f"c{i}", store._path(key), 50 + 30 * i))
    return store, refs, files, test


def _evaluate_input(store: LocalBlobStore, refs: list[UpdateRef], key: str) -> EvaluateInput:
    return EvaluateInput(
        experiment_id="e1",
        model=ModelRef(model_id="m", blob_key=key, sha256="", round=1),
        spec=EvaluationSpec(dataset="digits", architecture="CNN", input_shape=SHAPE, num_classes=10, weighted=True),
        updates=refs,
    )


def _expected_deltas(files: list[UpdateFile], test, tmp: Path) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Leave-one-out loss deltas computed the slow, obvious way: re-average without each update."""
    model = build_model("CNN", SHAPE, 10)
    avg = fedavg(files, tmp / "avg.safetensors")
    model.load_state_dict(avg)
    base = training.evaluate(model, test)[1]
    out = {}
    for f in files:
        others = [g for g in files if g.client_id != f.client_id]
        model.load_state_dict(fedavg(others, tmp / f"without-{f.client_id}.safetensors"))
        out[f.client_id] = training.evaluate(model, test)[1] - base
    return out


@pytest.mark.parametrize("threads", ["1", "2"])
def test_leave_one_out_deltas_match_re_averaging(setup, tmp_path: Path, monkeypatch, threads: str) -> None:  # type: ignore[no-untyped-def]
    store, refs, files, test = setup
    monkeypatch.setenv("FEDLOOM_EVAL_THREADS", threads)
    fedavg(files, tmp_path / "global.safetensors")
    store.put_file("models/e1/round-1.safetensors", tmp_path / "global.safetensors")
    calls = []
    real = training.evaluate
    monkeypatch.setattr(training, "evaluate", lambda m, d: calls.append(1) or real(m, d))

    got = AggregationActivities(None, store)._evaluate(_evaluate_input(store, refs, "models/e1/round-1.safetensors"))  # type: ignore[arg-type]

    monkeypatch.setattr(training, "evaluate", real)
    expected = _expected_deltas(files, test, tmp_path)
    assert got.loo_loss_deltas.keys() == expected.keys()
    for cid, delta in expected.items():
        assert got.loo_loss_deltas[cid] == pytest.approx(delta, abs=1e-4), cid
    # The client trained longest helps most: leaving it out costs the most loss.
    assert max(got.loo_loss_deltas, key=got.loo_loss_deltas.get) == "c3"
    model = build_model("CNN", SHAPE, 10)
    model.load_state_dict(fedavg(files, tmp_path / "check.safetensors"))
    accuracy, loss = training.evaluate(model, test)
    assert got.accuracy == pytest.approx(accuracy) and got.loss == pytest.approx(loss, abs=1e-6)
    # Under FedAvg the plain average is the global model: evaluated once, plus once per update.
    assert len(calls) == 1 + len(files)


def test_a_global_model_other_than_the_average_is_evaluated_separately(setup, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    store, refs, files, test = setup
    torch.manual_seed(99)
    other = build_model("CNN", SHAPE, 10).state_dict()
    _store_state(store, "models/e1/round-1.safetensors", other, tmp_path)
    calls = []
    real = training.evaluate
    monkeypatch.setattr(training, "evaluate", lambda m, d: calls.append(1) or real(m, d))

    got = AggregationActivities(None, store)._evaluate(_evaluate_input(store, refs, "models/e1/round-1.safetensors"))  # type: ignore[arg-type]

    monkeypatch.setattr(training, "evaluate", real)
    assert len(calls) == 2 + len(files)
    model = build_model("CNN", SHAPE, 10)
    model.load_state_dict(other)
    assert got.accuracy == pytest.approx(training.evaluate(model, test)[0])
    expected = _expected_deltas(files, test, tmp_path)  # still against the plain average, not the global model
    for cid, delta in expected.items():
        assert got.loo_loss_deltas[cid] == pytest.approx(delta, abs=1e-4), cid


@pytest.mark.parametrize("threads", [1, 2])
def test_evaluate_states_keeps_order_and_takes_at_most_threads_states_ahead(monkeypatch, threads: int) -> None:  # type: ignore[no-untyped-def]
    test = load_test("digits")
    calls: list[int] = []
    done_at_yield: list[int] = []
    real = training.evaluate
    monkeypatch.setattr(training, "evaluate", lambda m, d: calls.append(1) or real(m, d))

    def states():  # type: ignore[no-untyped-def]
        for seed in range(5):
            torch.manual_seed(seed)
            done_at_yield.append(len(calls))
            yield build_model("MLP", SHAPE, 10).state_dict()

    def build():  # type: ignore[no-untyped-def]
        return build_model("MLP", SHAPE, 10)

    got = training.evaluate_states(build, states(), test, threads=threads)
    for i, done in enumerate(done_at_yield):  # state i is taken only once all but threads - 1 before it are done
        assert done >= i - threads + 1, (i, done)
    expected = []
    for seed in range(5):
        torch.manual_seed(seed)
        model = build()
        expected.append(real(model, test))
    assert got == expected and len({loss for _, loss in got}) == 5


def test_evaluation_threads_leave_room_for_torchs_own_threads(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("FEDLOOM_EVAL_THREADS", raising=False)
    monkeypatch.setattr(training.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(training.torch, "get_num_threads", lambda: 1)
    assert training.evaluation_threads() == 2  # the worker: torch on one thread, two cores
    monkeypatch.setattr(training.torch, "get_num_threads", lambda: 2)
    assert training.evaluation_threads() == 1  # torch already uses both cores
    monkeypatch.setattr(training.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(training.torch, "get_num_threads", lambda: 1)
    assert training.evaluation_threads() == 2
    monkeypatch.setenv("FEDLOOM_EVAL_THREADS", "3")
    assert training.evaluation_threads() == 3
    for bad in ("0", "-1", "two"):  # a mistyped setting falls back to the default, never breaks evaluation
        monkeypatch.setenv("FEDLOOM_EVAL_THREADS", bad)
        assert training.evaluation_threads() == 2


def test_an_evaluation_activity_checks_each_fresh_blob_once(setup, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The updates were stored just now, so the digest cache cannot vouch for them; within one heavy
    activity (a ``read_once`` block) each is still hashed once, not once per read."""
    from collections import Counter

    from fedloom_core.storage.blobstore import base as blobstore
    from fedloom_core.storage.blobstore import local

    # "Just now" however slow the machine: a loaded run took over the 2 s after which digests are cached.
    monkeypatch.setattr(local, "_SETTLED_NS", 10**15)
    store, refs, files, test = setup
    fedavg(files, tmp_path / "global.safetensors")
    store.put_file("models/e1/round-1.safetensors", tmp_path / "global.safetensors")
    checked: Counter[str] = Counter()
    real = blobstore._check_digest
    monkeypatch.setattr(blobstore, "_check_digest", lambda k, e, a: checked.update([k]) or real(k, e, a))
    acts = AggregationActivities(None, store)  # type: ignore[arg-type]
    inp = _evaluate_input(store, refs, "models/e1/round-1.safetensors")
    unscoped = acts._evaluate(inp)
    assert all(checked[r.blob_key] >= 2 for r in refs)  # the average, then each leave-one-out model
    checked.clear()
    scoped = acts.evaluate_model(inp)
    assert checked == Counter([r.blob_key for r in refs] + ["models/e1/round-1.safetensors"])
    assert (scoped.accuracy, scoped.loss, scoped.loo_loss_deltas) == (
        unscoped.accuracy,
        unscoped.loss,
        unscoped.loo_loss_deltas,
    )
