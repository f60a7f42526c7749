"""An output model written a window at a time, straight into its safetensors file.

The block-wise rules compute the result a window of coordinates at a time. Writing each window
into the file as soon as it is done (``os.pwrite`` at the tensor's offset) needs one window-sized
buffer, reused, instead of a whole-model buffer whose fresh pages each cost a fault and which
``save_state`` would then copy into the file. The bytes are those ``weights.save_state`` writes
for the same tensors (same layout order, header and padding); the file is written beside the
target and renamed into place when complete.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from types import TracebackType

import numpy as np
import torch

from fedloom_core.learning.strategies.blocks import FlatSpace
from fedloom_core.learning.strategies.streaming import Structure, torch_dtype
from fedloom_core.learning.weights import _LAYOUT_ORDER


class StreamedOutput:
    """The safetensors file of a model with structure ``expected``, filled in any order, then committed."""

    def __init__(self, path: str | Path, expected: Structure) -> None:
        rank = {name: i for i, name in enumerate(_LAYOUT_ORDER)}
        order = sorted(expected, key=lambda name: (rank[expected[name][0]], name))
        header: dict[str, dict[str, object]] = {}
        self.offsets: dict[str, tuple[int, int]] = {}  # name -> (first byte in the file, bytes per element)
        offset = 0
        for name in order:
            dtype_text, shape = expected[name]
            itemsize = torch.empty((), dtype=torch_dtype(dtype_text)).element_size()
            nbytes = math.prod(shape) * itemsize
            header[name] = {"dtype": dtype_text, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.offsets[name] = (offset, itemsize)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as safetensors pads it
        self.data_start = 8 + len(raw)
        self.expected = expected
        self.target = Path(path)
        self.tmp = self.target.with_name(f".{self.target.name}.{os.getpid()}.tmp")
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._write(struct.pack("<Q", len(raw)) + raw, 0)
        os.ftruncate(self._fd, self.data_start + offset)

    def __enter__(self) -> StreamedOutput:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        os.close(self._fd)
        if kind is None:
            os.replace(self.tmp, self.target)
        else:
            self.tmp.unlink(missing_ok=True)

    def _write(self, data: memoryview | bytes, at: int) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = os.pwrite(self._fd, view, at)
            view, at = view[written:], at + written

    def tensor(self, name: str, value: torch.Tensor) -> None:
        """Write a whole tensor (of its structure's dtype and size)."""
        flat = value.detach().contiguous().reshape(-1)
        if flat.numel():
            self._write(flat.view(torch.uint8).numpy(), self.data_start + self.offsets[name][0])

    def window(self, space: FlatSpace, start: int, values: np.ndarray) -> None:
        """Write ``values``, the results for coordinates ``[start, start + len(values))`` of ``space``,
        each tensor's part in its own dtype."""
        for name, begin, end, at in space.pieces(start, start + len(values)):
            part = torch.from_numpy(values[at - start : at - start + end - begin])
            dtype = torch_dtype(self.expected[name][0])
            if dtype != space.work:
                part = part.to(dtype)
            first, itemsize = self.offsets[name]
            self._write(part.view(torch.uint8).numpy(), self.data_start + first + begin * itemsize)
