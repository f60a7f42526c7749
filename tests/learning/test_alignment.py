"""update_alignment: each update's cosine with the round's step, from files, streaming."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedloom_core.learning.evaluation import update_alignment
from fedloom_core.learning.kernels import UpdateFile
from fedloom_core.learning.weights import save_state


def _save(tmp: Path, name: str, w: list[float]) -> Path:
    path = tmp / f"{name}.safetensors"
    save_state({"w": torch.tensor(w), "steps": torch.tensor([3])}, path)
    return path


def test_cosine_with_the_step_from_previous_to_new_model(tmp_path: Path) -> None:
    previous = _save(tmp_path, "prev", [0.0, 0.0])
    new = _save(tmp_path, "new", [1.0, 0.0])
    updates = [
        UpdateFile("along", _save(tmp_path, "a", [2.0, 0.0]), 10),
        UpdateFile("diagonal", _save(tmp_path, "d", [1.0, 1.0]), 10),
        UpdateFile("against", _save(tmp_path, "x", [-1.0, 0.0]), 10),
        UpdateFile("still", _save(tmp_path, "s", [0.0, 0.0]), 10),
    ]
    cosines = update_alignment(previous, new, updates)
    assert cosines["along"] == pytest.approx(1.0)
    assert cosines["diagonal"] == pytest.approx(2**-0.5)
    assert cosines["against"] == pytest.approx(-1.0)
    # No movement has no direction: 0, not NaN.
    assert cosines["still"] == 0.0


def test_a_round_that_did_not_move_gives_zero(tmp_path: Path) -> None:
    previous = _save(tmp_path, "prev", [1.0, 2.0])
    cosines = update_alignment(previous, previous, [UpdateFile("a", _save(tmp_path, "a", [2.0, 0.0]), 1)])
    assert cosines == {"a": 0.0}
