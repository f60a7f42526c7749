"""What keeps a round's close in the worker near one model size: no mapped copies, freed memory returned."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedloom_core.learning import weights
from fedloom_core.learning.weights import load_state, save_state


def test_load_state_reads_without_mapping_the_file(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A mapped file's pages count in the RSS on top of the copy: load_state reads the bytes instead."""
    state = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(4).to(torch.bfloat16),
        "i64": torch.tensor([1, -2, 3]),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "state.safetensors"
    save_state(state, path)

    def no_map(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("load_state mapped the file")

    monkeypatch.setattr(weights.mmap, "mmap", no_map)
    back = load_state(path)
    assert back.keys() == state.keys()
    for name, t in state.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape and torch.equal(back[name], t), name


_FREED_ON_A_THREAD = """
import re, threading, torch
from fedloom_core.learning.kernels import return_free_memory

def rss():
    return int(re.search(r"RssAnon:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

def churn():
    torch.empty(1 << 21).fill_(1.0)  # freeing one 8 MB block raises glibc's mmap threshold past it
    held = [torch.empty(1 << 21).fill_(1.0) for _ in range(48)]
    del held

before = rss()
worker = threading.Thread(target=churn)
worker.start()
worker.join()
return_free_memory()
print(rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_memory_freed_on_a_thread_goes_back_to_the_os() -> None:
    """384 MB of tensors freed on a worker thread no longer count in the RSS once return_free_memory ran.

    Without the trim glibc keeps them in the thread's arena (about 400 MB here).
    """
    done = subprocess.run([sys.executable, "-c", _FREED_ON_A_THREAD], capture_output=True, text=True, check=True)
    assert int(done.stdout.strip()) < 64 << 20
