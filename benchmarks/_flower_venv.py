"""Flower's own virtualenv for the end-to-end comparison: flwr and the CPU build of torch.

The same directory as ``bench_aggregation.py``'s (``~/.cache/fedloom-bench/flwr-venv``, or the one
holding ``FEDLOOM_BENCH_FLWR_PYTHON``): Flower's pins conflict with fedloom's, so it cannot share
fedloom's venv. torch is asked for with its ``+cpu`` local version, which only the CPU wheel carries,
so pip never brings in a CUDA build.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

FLWR_VERSION = "1.42.0"
TORCH_SPEC = "torch==2.13.0+cpu"
FLWR_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedloom-bench" / "flwr-venv"


def _python() -> Path:
    given = os.environ.get("FEDLOOM_BENCH_FLWR_PYTHON")
    return Path(given) if given else FLWR_VENV / "bin" / "python"


def _ready(python: Path) -> bool:
    probe = "import flwr, torch; print(flwr.__version__, torch.__version__)"
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    versions = done.stdout.split()
    return done.returncode == 0 and versions[:1] == [FLWR_VERSION] and versions[1:2] == [TORCH_SPEC.split("==")[1]]


def flower_bin(create: bool) -> Path | None:
    """The venv's ``bin`` directory (``flower-superlink``, ``flower-supernode``, ``flwr``), made when ``create``."""
    python = _python()
    if python.exists() and _ready(python):
        return python.parent
    if not create:
        return None
    if not python.exists():
        print(f"creating {python.parent.parent} (Flower cannot share fedloom's venv) ...", flush=True)
        python.parent.parent.parent.mkdir(parents=True, exist_ok=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(python.parent.parent)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", TORCH_SPEC, f"flwr=={FLWR_VERSION}"], check=True)
    return python.parent if _ready(python) else None
