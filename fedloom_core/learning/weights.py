"""Reading, writing and checking model weight files without ever unpickling them.

Uploads are accepted as safetensors, or as a ``torch.save`` state_dict that
``torch.load(weights_only=True)`` can read (converted to safetensors at once).
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import struct
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

# torch is imported by the functions that make or read tensors: checking an upload (header, structure,
# finite values) needs numpy only, so the API process runs without torch (about 250 MB of RSS).
if TYPE_CHECKING:
    import torch

# Largest safetensors header we parse; real headers are a few KiB per hundred tensors.
MAX_HEADER_BYTES = 16 << 20
# A torch.save archive holds a few entries per tensor; far more is not a state_dict.
MAX_ZIP_ENTRIES = 100_000

# Bytes per element of each safetensors dtype we read.
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# The numpy type each dtype's bytes are viewed as (numpy has no bfloat16: its bits, as int16).
_NUMPY_VIEW = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.int16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


@cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    """Safetensors dtype name -> torch dtype."""
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }


@cache
def _dtype_names() -> dict[torch.dtype, str]:
    return {v: k for k, v in _torch_dtypes().items()}


# The order in which the safetensors library lays out tensors by dtype (then by name), so that
# save_state writes the very bytes ``safetensors.torch.save_file`` would.
_LAYOUT_ORDER = ("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "I8", "U8", "BOOL")


class WeightsFormatError(ValueError):
    """A weights file is not something we read, or is malformed; the message says why."""


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_header(path: str | Path) -> dict[str, TensorSpec]:
    """Parse and bounds-check a safetensors header, reading no tensor data."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise WeightsFormatError("file is too short to be safetensors")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or header_len + 8 > size:
            raise WeightsFormatError(f"safetensors header length {header_len} does not fit the file ({size} bytes)")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WeightsFormatError(f"safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WeightsFormatError("safetensors header is not a JSON object")
    data_size = size - 8 - header_len
    specs: dict[str, TensorSpec] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise WeightsFormatError(f"tensor {name!r}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _ITEMSIZE:
            raise WeightsFormatError(f"tensor {name!r}: unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(_is_int(d) and 0 <= d < 1 << 40 for d in shape)):
            raise WeightsFormatError(f"tensor {name!r}: invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise WeightsFormatError(f"tensor {name!r}: invalid data_offsets {offsets!r}")
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * _ITEMSIZE[dtype]
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise WeightsFormatError(
                f"tensor {name!r}: data_offsets {offsets} do not match shape {shape} and dtype {dtype} "
                f"within {data_size} data bytes"
            )
        specs[name] = TensorSpec(dtype, tuple(shape), begin + 8 + header_len, end + 8 + header_len)
    if not specs:
        raise WeightsFormatError("the file holds no tensors")
    _check_layout(specs, 8 + header_len, size)
    return specs


def _check_layout(specs: Mapping[str, TensorSpec], data_start: int, size: int) -> None:
    """The tensors tile the data section in order, as the safetensors library requires: no overlap, no gap.

    Without this, a header could point thousands of tensors at the same bytes and cost a scan of each.
    """
    position = data_start
    for name, spec in sorted(specs.items(), key=lambda item: (item[1].begin, item[1].end)):
        if spec.begin != position:
            raise WeightsFormatError(
                f"tensor {name!r}: data starts at byte {spec.begin - data_start} of the data section, "
                f"expected {position - data_start} (tensors must be contiguous and must not overlap)"
            )
        position = spec.end
    if position != size:
        raise WeightsFormatError(f"{size - position} bytes after the last tensor: the data section must end there")


@contextmanager
def mapped_tensors(path: str | Path) -> Iterator[dict[str, torch.Tensor]]:
    """Tensors of a safetensors file as zero-copy views of a private (copy-on-write) memory map.

    Each view holds a numpy array that holds the map, so a view kept past the block stays valid;
    the map is released when the last view is gone.
    """
    import torch

    specs = read_header(path)
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    tensors: dict[str, torch.Tensor] = {}
    try:
        for name, spec in specs.items():
            dtype = _torch_dtypes()[spec.dtype]
            size = _ITEMSIZE[spec.dtype]
            count = (spec.end - spec.begin) // size
            if count == 0:
                tensors[name] = torch.empty(spec.shape, dtype=dtype)
            elif spec.begin % size:  # misaligned data (not written by safetensors): copy it
                raw = bytearray(mm[spec.begin : spec.end])
                tensors[name] = torch.frombuffer(raw, dtype=dtype).reshape(spec.shape)
            else:
                raw_view = np.frombuffer(mm, dtype=_NUMPY_VIEW[spec.dtype], count=count, offset=spec.begin)
                view = torch.from_numpy(raw_view)
                tensors[name] = (view.view(dtype) if view.dtype != dtype else view).reshape(spec.shape)
        yield tensors
    finally:
        tensors = {}
        try:
            mm.close()
        except BufferError:  # views are still alive; the map closes with the last of them
            pass


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict read (copied) from a safetensors file.

    Each tensor is read with ``preadv`` straight into its own memory, not copied out of a map: mapped
    pages count in the RSS until the map closes, which doubled a 1 GB model's cost (its copy plus its map).
    """
    import torch

    specs = read_header(path)
    state: dict[str, torch.Tensor] = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, spec in specs.items():
            t = torch.empty(spec.shape, dtype=_torch_dtypes()[spec.dtype])
            if spec.end > spec.begin:
                _read_exact(fd, memoryview(t.reshape(-1).view(torch.uint8).numpy()), spec.begin)
            state[name] = t
    finally:
        os.close(fd)
    return state


def _read_exact(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` with the file's bytes from ``offset``; WeightsFormatError if the file ends first."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise WeightsFormatError("the file is shorter than its header says")
        got += n


def save_state(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write a state_dict as safetensors, tensors contiguous and on the CPU.

    The bytes are those ``safetensors.torch.save_file`` writes (same layout order, header and
    padding), but each tensor's memory goes straight to the file: the library first copies the
    whole model into one bytes object, which cost more than the aggregation itself for large
    models. The file is written beside ``path`` and renamed into place, so a reader never sees
    half a model, and replacing a large file does not pay for truncating it in place.
    """
    import torch

    tensors = {name: t.detach().cpu().contiguous() for name, t in state.items()}
    rank = {name: i for i, name in enumerate(_LAYOUT_ORDER)}
    order = sorted(tensors, key=lambda name: (rank[dtype_name(tensors[name].dtype)], name))
    header: dict[str, dict[str, object]] = {}
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as safetensors pads it
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            for name in order:
                flat = tensors[name].reshape(-1)
                if flat.numel():
                    fh.write(memoryview(flat.view(torch.uint8).numpy()))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def structure(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (dtype, shape) of a safetensors file."""
    return {name: (s.dtype, s.shape) for name, s in read_header(path).items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors spelling of a torch dtype."""
    return _dtype_names()[dtype]


def normalize_upload(src: str | Path, dst: str | Path) -> str:
    """Check an uploaded weights file and write it to ``dst`` as safetensors; return the source format.

    Safetensors files are parsed (header bounds-checked) and moved to ``dst`` as they are (renamed
    when on the same filesystem, so ``src`` is gone afterwards); zip files written by
    ``torch.save`` are read with ``weights_only=True`` and must hold a flat dict of tensors.
    Anything else raises WeightsFormatError.
    """
    with open(src, "rb") as fh:
        magic = fh.read(4)
    if magic == b"PK\x03\x04":  # a zip archive, as torch.save writes; as a safetensors length it is absurd
        _check_zip(src)
        import torch

        try:
            obj = torch.load(src, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure to read means "not a valid state_dict"
            raise WeightsFormatError(f"not a state_dict readable with weights_only=True: {exc}") from None
        if not isinstance(obj, dict) or not obj:
            raise WeightsFormatError("the PyTorch file does not hold a non-empty dict of tensors")
        tensors = {}
        for name, value in obj.items():
            if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                raise WeightsFormatError(f"entry {name!r} is not a named tensor")
            if value.dtype not in _dtype_names():
                raise WeightsFormatError(f"tensor {name!r}: unsupported dtype {value.dtype}")
            if value.layout != torch.strided:
                raise WeightsFormatError(f"tensor {name!r}: only dense tensors are accepted, not {value.layout}")
            # A copy of each: tied weights share storage, which safetensors refuses to write.
            tensors[name] = value.detach().clone()
        save_state(tensors, dst)
        return "pytorch"
    read_header(src)
    _move(src, dst)
    return "safetensors"


def _check_zip(src: str | Path) -> None:
    """Refuse a zip that would unpack to more than it weighs: torch.save stores its entries uncompressed.

    A deflated entry (a 256 MB tensor of zeros is 0.3 MB on the wire) is refused before torch.load
    reads a byte of it, and so is a directory whose entries add up to more than the file's size.
    """
    size = os.path.getsize(src)
    try:
        with zipfile.ZipFile(src) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise WeightsFormatError(f"not a state_dict readable with weights_only=True: bad zip ({exc})") from None
    if len(entries) > MAX_ZIP_ENTRIES:
        raise WeightsFormatError(f"the archive has {len(entries)} entries, more than {MAX_ZIP_ENTRIES}")
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED:
            raise WeightsFormatError(
                f"archive entry {entry.filename!r} is compressed; torch.save writes stored entries, and a "
                "compressed one could unpack far beyond the upload limit"
            )
    unpacked = sum(entry.file_size for entry in entries)
    if unpacked > size:
        raise WeightsFormatError(f"the archive's entries declare {unpacked} bytes, more than its {size}")


def _move(src: str | Path, dst: str | Path) -> None:
    """Rename ``src`` to ``dst``; copy it instead when they are on different filesystems."""
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy(src, dst)


def _copy(src: str | Path, dst: str | Path) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(1 << 20):
            fout.write(chunk)


def compare_structure(
    actual: Mapping[str, tuple[str, tuple[int, ...]]], expected: Mapping[str, tuple[str, tuple[int, ...]]]
) -> list[str]:
    """Human-readable differences between two structures; empty when they match."""
    problems = []
    for name in sorted(expected.keys() - actual.keys()):
        problems.append(f"tensor {name!r} is missing")
    for name in sorted(actual.keys() - expected.keys()):
        problems.append(f"tensor {name!r} is not in the global model")
    for name in sorted(expected.keys() & actual.keys()):
        (edt, eshape), (adt, ashape) = expected[name], actual[name]
        if tuple(eshape) != tuple(ashape):
            problems.append(f"tensor {name!r} has shape {list(ashape)}, expected {list(eshape)}")
        if edt != adt:
            problems.append(f"tensor {name!r} has dtype {adt}, expected {edt}")
    return problems


# Bytes of a file read at a time by the checks that scan whole tensors: 32768 float32 values, torch's
# parallel grain size, so each check runs on the calling thread (a parallel region stalls when the
# other cores are busy, as they are while the API receives several uploads).
SCAN_CHUNK = 128 << 10


def nonfinite_tensors(path: str | Path) -> list[str]:
    """Names of floating-point tensors holding NaN or infinity.

    The file is read ``SCAN_CHUNK`` bytes at a time into one reused buffer, not memory-mapped: every page
    read through a map counts in the process's RSS until the map closes, and the API checks
    several large uploads at once. Each piece is judged by its minimum and maximum (one pass, no
    temporary tensor; both are NaN when the piece holds a NaN), which is much faster than
    ``isfinite(t).all()``.
    """
    specs = read_header(path)
    staging = np.empty(SCAN_CHUNK, dtype=np.uint8)
    view = memoryview(staging)
    bad = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, spec in specs.items():
            if spec.dtype in _FLOATS and not _finite(fd, spec, staging, view):
                bad.append(name)
    finally:
        os.close(fd)
    return bad


_FLOATS = ("F64", "F32", "F16", "BF16")
# Half-precision formats: a value is NaN or infinite exactly when its exponent bits are all ones.
_EXPONENT_BITS = {"F16": 0x7C00, "BF16": 0x7F80}


def _finite(fd: int, spec: TensorSpec, staging: np.ndarray, view: memoryview) -> bool:
    """Whether every value of one tensor is finite, reading it ``len(view)`` bytes at a time."""
    offset = spec.begin
    bits = _EXPONENT_BITS.get(spec.dtype)
    while offset < spec.end:
        want = min(len(view), spec.end - offset)
        _read_exact(fd, view[:want], offset)
        if bits is not None:
            raw = staging[:want].view(np.uint16)
            if np.any((raw & bits) == bits):
                return False
        else:
            values = staging[:want].view(_NUMPY_VIEW[spec.dtype])
            if values.size and not (math.isfinite(values.min()) and math.isfinite(values.max())):
                return False
        offset += want
    return True
