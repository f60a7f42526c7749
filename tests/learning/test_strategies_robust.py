"""The fast robust rules against simple references: comparator networks, FedMedian and FedTrimmedAvg
against a sort along the clients, Krum's Gram-matrix distances against direct float64 ones."""

from __future__ import annotations

import itertools
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedloom_core.learning.kernels import UpdateFile
from fedloom_core.learning.strategies import blocks as blocks_module
from fedloom_core.learning.strategies import make_strategy
from fedloom_core.learning.strategies.base import AggregationContext
from fedloom_core.learning.strategies.krum import pairwise_sq_distances
from fedloom_core.learning.strategies.networks import merge_exchange, run_plan, selection_plan, sorting_networks
from fedloom_core.learning.strategies.streaming import floor_fraction


@pytest.mark.parametrize("n", range(1, 13))
def test_sorting_networks_sort_every_zero_one_input(n: int) -> None:
    # The 0-1 principle: a comparator network sorts every input iff it sorts every input of 0s and 1s.
    bits = torch.tensor(list(itertools.product((0, 1), repeat=n)), dtype=torch.int8).T.contiguous()
    networks = sorting_networks(n)
    assert networks[0] == merge_exchange(n) and len(networks) == (2 if n == 10 else 1)
    for network in networks:
        rows = list(bits)
        for i, j in network:
            rows[i], rows[j] = torch.minimum(rows[i], rows[j]), torch.maximum(rows[i], rows[j])
        assert torch.equal(torch.stack(rows), torch.sort(bits, dim=0).values)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10, 11, 16, 23])
def test_selection_plans_sum_the_wanted_sorted_positions(n: int) -> None:
    # Small integers: every sum is exact, so any order of additions must give the sorted positions' sum.
    values = torch.randint(-4, 5, (n, 300), generator=torch.Generator().manual_seed(n)).float()
    ordered = torch.sort(values, dim=0).values
    for lo, hi in {(0, n), (n // 2, n // 2 + 1), ((n - 1) // 2, n // 2 + 1), (n // 5, n - n // 5), (0, 1)}:
        plan = selection_plan(n, lo, hi)
        out = torch.empty(300)
        spare = torch.empty(n + 2, 300)
        run_plan(plan, [r.numpy() for r in values], [r.numpy() for r in spare], out.numpy())
        assert torch.equal(out, ordered[lo:hi].sum(0)), (n, lo, hi)


def test_pruning_drops_what_the_sum_does_not_need() -> None:
    full = 2 * len(merge_exchange(10))
    median = sum(s.low + s.high for s in selection_plan(10, 4, 6).steps)
    trimmed = sum(s.low + s.high for s in selection_plan(10, 1, 9).steps)
    assert trimmed < median < full
    assert (median, trimmed) == (48, 24)  # Waksman's network pruned (Batcher's: 50 and 34)
    assert selection_plan(10, 0, 10).steps == ()  # a plain sum needs no comparator


def _model(gen: torch.Generator, shift: float) -> dict[str, torch.Tensor]:
    return {
        "a.weight": torch.randn(37, 11, generator=gen) + shift,
        "a.bias": torch.randn(11, generator=gen) * 1e3,
        "b.half": (torch.randn(5, 7, generator=gen) * 4).to(torch.float16),
        "b.brain": torch.randn(19, generator=gen).to(torch.bfloat16),
        "c.double": torch.randn(23, generator=gen, dtype=torch.float64),
        "c.empty": torch.empty(0, 3),
        "steps": torch.tensor(int(shift) % 7),
    }


@pytest.fixture(scope="module")
def round_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[UpdateFile], list[dict]]:
    tmp = tmp_path_factory.mktemp("robust")
    gen = torch.Generator().manual_seed(11)
    save_file(_model(gen, 0.0), str(tmp / "global.safetensors"))
    states, updates = [], []
    for i in range(10):
        state = _model(gen, float(i % 4))
        if i == 3:  # an outlier the robust rules must shrug off
            state["a.weight"] = state["a.weight"] * 1e6
        save_file(state, str(tmp / f"u{i}.safetensors"))
        states.append(state)
        updates.append(UpdateFile(f"client-{i:02d}", tmp / f"u{i}.safetensors", 10 + i))
    return tmp, updates, states


def _coordinatewise_reference(states: list[dict], name: str, lo: int, hi: int, scale: float) -> torch.Tensor:
    stacked = torch.stack(
        [s[name].to(torch.float64 if s[name].dtype == torch.float64 else torch.float32) for s in states]
    )
    return (torch.sort(stacked, dim=0).values[lo:hi].sum(0) * scale).to(states[0][name].dtype)


@pytest.mark.parametrize("chunk", [5, 64, None])
@pytest.mark.parametrize("rule", ["FedMedian", "FedTrimmedAvg"])
def test_coordinate_wise_rules_match_a_sort_along_the_clients(round_files, rule: str, chunk: int | None) -> None:
    tmp, updates, states = round_files
    params = {"chunk_elems": chunk} if chunk else {}
    if rule == "FedTrimmedAvg":
        params["trim_fraction"] = 0.2
    out = tmp / f"{rule}-{chunk}.safetensors"
    make_strategy(rule, params).aggregate(AggregationContext(1, tmp / "global.safetensors", updates, out))
    got = load_file(str(out))
    t = floor_fraction(0.2, 10)
    lo, hi, scale = (4, 6, 0.5) if rule == "FedMedian" else (t, 10 - t, 1 / (10 - 2 * t))
    for name, value in got.items():
        assert value.dtype == states[0][name].dtype and value.shape == states[0][name].shape, name
        if not value.is_floating_point():
            assert torch.equal(value, states[0][name])  # integer tensors: the first update's
            continue
        expected = _coordinatewise_reference(states, name, lo, hi, scale)
        if rule == "FedMedian":  # the two middle values and one exact halving: the same bits
            assert torch.equal(value, expected), name
        else:  # the kept values are added in another order than the sort's
            torch.testing.assert_close(value, expected, rtol=2e-6, atol=1e-6)
    assert got["a.weight"].abs().max() < 10  # the outlier's 1e6-scaled weights are gone


def test_krum_distances_match_direct_float64_ones(round_files) -> None:
    tmp, updates, states = round_files
    global_state = load_file(str(tmp / "global.safetensors"))

    def flat(state: dict) -> torch.Tensor:
        return torch.cat(
            [
                (state[n].double() - global_state[n].double()).reshape(-1)
                for n in sorted(state)
                if state[n].is_floating_point()
            ]
        )

    deltas = torch.stack([flat(s) for s in states])
    direct = ((deltas[:, None, :] - deltas[None, :, :]) ** 2).sum(-1)  # one float64 pass per pair
    for chunk in (7, 1 << 20):
        dist = pairwise_sq_distances(updates, lambda u: nullcontext(u.path), tmp / "global.safetensors", chunk)
        got = torch.tensor(dist, dtype=torch.float64)
        assert torch.equal(got, got.T) and torch.all(got.diagonal() == 0)
        torch.testing.assert_close(got, direct, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("rule", ["FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum"])
def test_thread_count_does_not_change_the_bytes(round_files, rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp, updates, _ = round_files
    params = {"chunk_elems": 64} if rule.startswith("Fed") else {"num_byzantine": 1, "chunk_elems": 64}
    outputs = []
    for threads in (1, 3):
        monkeypatch.setattr(blocks_module, "worker_count", lambda threads=threads: threads)
        out = tmp / f"{rule}-threads-{threads}.safetensors"
        info = (
            make_strategy(rule, params).aggregate(AggregationContext(1, tmp / "global.safetensors", updates, out)).info
        )
        outputs.append((out.read_bytes(), info))
    assert outputs[0] == outputs[1]


def test_streamed_output_writes_the_bytes_of_save_state(tmp_path: Path) -> None:
    from fedloom_core.learning.strategies.blocks import flat_spaces
    from fedloom_core.learning.strategies.output import StreamedOutput
    from fedloom_core.learning.weights import save_state, structure

    state = _model(torch.Generator().manual_seed(5), 2.0)
    save_state(state, tmp_path / "whole.safetensors")
    expected = structure(tmp_path / "whole.safetensors")
    with StreamedOutput(tmp_path / "streamed.safetensors", expected) as output:
        for name, value in state.items():
            if not value.is_floating_point():
                output.tensor(name, value)
        for space in flat_spaces(expected):
            work = torch.cat([state[name].to(space.work).reshape(-1) for name, _, _ in space.tensors])
            # windows of 13 coordinates, last first: each lands at its tensors' offsets whatever the order
            for start in reversed(range(0, space.total, 13)):
                output.window(space, start, work[start : start + 13].numpy())
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))
