"""The robust rules give the same bytes for any arrival order, thread count and run, on a model large
enough to span many blocks and windows (the four-update, all-permutations case is in test_strategies)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedloom_core.learning.kernels import UpdateFile
from fedloom_core.learning.strategies import blocks as blocks_module
from fedloom_core.learning.strategies import make_strategy
from fedloom_core.learning.strategies.base import AggregationContext

RULES = {
    "FedMedian": {"chunk_elems": 1 << 14},
    "FedTrimmedAvg": {"trim_fraction": 0.1, "chunk_elems": 1 << 14},
    "Krum": {"num_byzantine": 2, "chunk_elems": 1 << 14},
    "MultiKrum": {"num_byzantine": 2, "chunk_elems": 1 << 14},
}


@pytest.fixture(scope="module")
def updates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[UpdateFile]]:
    tmp = tmp_path_factory.mktemp("arrival")
    gen = torch.Generator().manual_seed(3)
    shapes = {"conv.weight": (64, 32, 3, 3), "fc.weight": (300, 256), "fc.bias": (300,), "head.weight": (10, 300)}
    base = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    save_file({**base, "steps": torch.tensor(0)}, str(tmp / "global.safetensors"))
    found = []
    for i in range(11):
        # Client updates near the global model, two of them far off; ids not in file order.
        scale = 50.0 if i in (2, 7) else 0.01
        state = {name: t + scale * torch.randn(t.shape, generator=gen) for name, t in base.items()}
        state["steps"] = torch.tensor(i)
        save_file(state, str(tmp / f"u{i}.safetensors"))
        found.append(UpdateFile(f"site-{(i * 7) % 11:02d}", tmp / f"u{i}.safetensors", 100 + i))
    return tmp, found


@pytest.mark.parametrize("rule", list(RULES))
def test_same_bytes_for_shuffled_arrivals_and_thread_counts(
    updates: tuple[Path, list[UpdateFile]], rule: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp, ups = updates
    shuffler = random.Random(rule)
    seen, selected = set(), []
    for attempt in range(4):
        arrival = list(ups)
        shuffler.shuffle(arrival)
        threads = 1 + attempt % 3
        monkeypatch.setattr(blocks_module, "worker_count", lambda threads=threads: threads)
        out = tmp / f"{rule}-{attempt}.safetensors"
        ctx = AggregationContext(1, tmp / "global.safetensors", arrival, out)
        info = make_strategy(rule, RULES[rule]).aggregate(ctx).info
        seen.add((out.read_bytes(), repr(sorted(info.items()))))
        selected = info.get("selected", [])
    assert len(seen) == 1
    assert not {"site-03", "site-05"} & set(selected)  # the two far-off updates are never kept
