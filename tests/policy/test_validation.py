"""Delta norms and similarity to the other updates, checked against hand-computed numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedloom_core.learning.kernels import UpdateFile
from fedloom_core.learning.weights import save_state
from fedloom_core.policy.validation import measure_updates


def _write(tmp: Path, name: str, w: list[float], step: int = 7) -> Path:
    path = tmp / f"{name}.safetensors"
    save_state({"w": torch.tensor(w), "steps": torch.tensor([step])}, path)
    return path


def test_norms_ratios_and_cosines(tmp_path: Path) -> None:
    glob = _write(tmp_path, "global", [1.0, 1.0])
    ups = [
        UpdateFile("a", _write(tmp_path, "a", [4.0, 5.0]), 10),  # delta (3, 4), norm 5
        UpdateFile("b", _write(tmp_path, "b", [4.0, 5.0]), 10),  # delta (3, 4), norm 5
        UpdateFile("c", _write(tmp_path, "c", [-5.0, -7.0]), 10),  # delta (-6, -8), norm 10
    ]
    stats = measure_updates(glob, ups)
    assert stats["a"].norm == pytest.approx(5.0) and stats["c"].norm == pytest.approx(10.0)
    assert stats["a"].norm_ratio == pytest.approx(1.0) and stats["c"].norm_ratio == pytest.approx(2.0)
    # Others of a: b + c = (-3, -4): opposite direction.
    assert stats["a"].cosine_similarity == pytest.approx(-1.0)
    # Others of c: a + b = (6, 8): opposite as well.
    assert stats["c"].cosine_similarity == pytest.approx(-1.0)


def test_orthogonal_and_aligned(tmp_path: Path) -> None:
    glob = _write(tmp_path, "global", [0.0, 0.0])
    ups = [
        UpdateFile("x", _write(tmp_path, "x", [1.0, 0.0]), 1),
        UpdateFile("y", _write(tmp_path, "y", [0.0, 1.0]), 1),
        UpdateFile("z", _write(tmp_path, "z", [1.0, 1.0]), 1),
    ]
    stats = measure_updates(glob, list(reversed(ups)))
    # Others of x: (0,1)+(1,1) = (1,2): cos = 1/sqrt(5).
    assert stats["x"].cosine_similarity == pytest.approx(1 / math.sqrt(5))
    # Others of z: (1,0)+(0,1) = (1,1): aligned.
    assert stats["z"].cosine_similarity == pytest.approx(1.0)
    assert stats["z"].norm_ratio == pytest.approx(math.sqrt(2))


def test_single_update_is_similar_to_itself(tmp_path: Path) -> None:
    glob = _write(tmp_path, "global", [0.0, 0.0])
    stats = measure_updates(glob, [UpdateFile("only", _write(tmp_path, "o", [2.0, 0.0]), 1)])
    assert stats["only"].cosine_similarity == 1.0 and stats["only"].norm_ratio == 1.0
