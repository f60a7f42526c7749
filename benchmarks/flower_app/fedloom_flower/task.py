"""What the Flower App shares with fedloom: the CNN, the training and evaluation loops, the data.

The model and the loops are fedloom's own (``fedloom_core.learning``, imported from the repository
root the run config names), so both systems run the very same computation; the data and the initial
weights come from ``.npz`` files the benchmark wrote with fedloom's partitioning code.
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np


def setup(run_config: dict[str, Any]) -> Path:
    """Make fedloom's learning code importable and pin torch to one thread; the work dir."""
    root = str(run_config["repo-root"])
    if root not in sys.path:
        sys.path.insert(0, root)
    import torch

    torch.set_num_threads(1)
    return Path(str(run_config["work-dir"]))


def split(work: Path, name: str):  # type: ignore[no-untyped-def]
    """A ``Split`` (fedloom's x/y tensors) from ``<work>/data/<name>.npz``."""
    import torch

    from fedloom_core.learning.datasets import Split

    with np.load(work / "data" / f"{name}.npz") as f:
        return Split(torch.from_numpy(f["x"]), torch.from_numpy(f["y"]))


def model(work: Path):  # type: ignore[no-untyped-def]
    """fedloom's CNN for the digits (input shape and classes as the benchmark wrote them)."""
    from fedloom_core.learning.zoo import build_model

    meta = json.loads((work / "data" / "meta.json").read_text())
    return build_model("CNN", meta["input_shape"], meta["num_classes"])


def train_seed(seed: int, rnd: int, client_id: str) -> int:
    """The per-round training seed fedloom's built-in client uses (fedloom.runtime.BuiltinSite.train)."""
    return seed * 100_003 + rnd * 101 + zlib.crc32(client_id.encode()) % 9973


def record(work: Path, **event: Any) -> None:
    """Append one timestamped event to ``<work>/events.jsonl`` (read by the benchmark)."""
    with open(work / "events.jsonl", "a") as fh:
        fh.write(json.dumps({"t": time.time(), **event}) + "\n")
