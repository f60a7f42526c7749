"""Loaders for data the user already has on disk (MNIST, CIFAR-10) and a seeded synthetic dataset.

Files are read from the datasets directory: the ``FEDLOOM_DATASETS_DIR`` setting, or ``./datasets`` in the
working directory when it is unset. Nothing is ever downloaded.

* MNIST: ``<dir>/mnist/`` holds the four IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``), each plain or gzipped with a ``.gz`` suffix.
* CIFAR-10: ``<dir>/cifar10/cifar-10-batches-py/`` (or ``<dir>/cifar-10-batches-py/``) holds the "python
  version" batches ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``. These are pickles, which are never
  unpickled: :func:`parse_cifar_batch` walks their opcodes with :func:`pickletools.genops`, which executes
  nothing, and rebuilds only plain containers, strings, numbers and numpy's uint8 array layout. Any other
  global (any code a pickle could run) is rejected.

Each loader returns ``(x, y)``: float32 images ``(N, C, H, W)`` scaled to [0, 1] and int64 labels.
"""

from __future__ import annotations

import gzip
import os
import pickletools
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SETTING = "FEDLOOM_DATASETS_DIR"
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_DIRS = ("cifar10/cifar-10-batches-py", "cifar-10-batches-py")
CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR_ROW = 3 * 32 * 32
NUM_CLASSES = 10
SYNTHETIC_SEED = 20240607
SYNTHETIC_SIZES = {"train": 2000, "test": 500}
SYNTHETIC_SHAPE = (8, 8, 1)


class DatasetNotFoundError(FileNotFoundError):
    """A file a dataset loader needs is not on disk; the message names the path and the expected format."""


class DatasetFormatError(ValueError):
    """A dataset file is on disk but is not in the format its loader expects."""


def datasets_root(configured: Path | str | None = None) -> Path:
    """The absolute datasets directory: ``configured`` if given, else the setting, else ``./datasets``.

    An empty ``FEDLOOM_DATASETS_DIR`` counts as unset, like the other optional settings.
    """
    if configured is None and os.environ.get(SETTING, None) != "":
        from fedloom_core.settings import Settings

        configured = Settings().datasets_dir
    return (Path.cwd() / "datasets" if configured is None else Path(configured).expanduser()).resolve()


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


# --- MNIST: IDX files -----------------------------------------------------------------------------------

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(raw: bytes, source: str = "IDX data") -> np.ndarray:
    """Parse an IDX file: two zero bytes, a type code, the rank, big-endian uint32 sizes, then the values."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DatasetFormatError(f"{source} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    rank = raw[3]
    header = 4 + 4 * rank
    if rank == 0 or len(raw) < header:
        raise DatasetFormatError(f"{source}: truncated IDX header (rank {rank}, {len(raw)} bytes)")
    dims = struct.unpack(f">{rank}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetFormatError(
            f"{source}: IDX header promises {' x '.join(map(str, dims))} values ({expected} bytes) "
            f"but {len(raw) - header} bytes follow it"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _mnist_file(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetNotFoundError(
        f"MNIST IDX file {folder / name}(.gz) not found; put MNIST's IDX files "
        f"({', '.join(n for pair in MNIST_FILES.values() for n in pair)}, plain or .gz) in "
        f"{SETTING}/mnist, which is now {folder}. Nothing is downloaded."
    )


def _read_maybe_gzip(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetFormatError(f"{path} is not a readable gzip file: {exc}") from exc


def load_mnist(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST's own train or test split from its IDX files: images ``(N, 1, 28, 28)``, labels ``(N,)``."""
    folder = Path(root) / "mnist"
    image_name, label_name = MNIST_FILES[_check_split(split)]
    image_path, label_path = _mnist_file(folder, image_name), _mnist_file(folder, label_name)
    images = parse_idx(_read_maybe_gzip(image_path), str(image_path))
    labels = parse_idx(_read_maybe_gzip(label_path), str(label_path))
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DatasetFormatError(f"{image_path}: expected uint8 images N x 28 x 28, got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetFormatError(f"{label_path}: expected a uint8 label vector, got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise DatasetFormatError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels")
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise DatasetFormatError(f"{label_path}: label {int(labels.max())} is not a digit 0-9")
    return _to_unit(images[:, None, :, :]), labels.astype(np.int64)


def _to_unit(images: np.ndarray) -> np.ndarray:
    return np.divide(images, 255.0, dtype=np.float32)


# --- CIFAR-10: python-version batches, read without unpickling --------------------------------------------

_NUMPY_MODULES = ("numpy", *(f"numpy.{pkg}.{mod}" for pkg in ("core", "_core") for mod in ("multiarray", "numeric")))
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    *((module, name) for module in ("builtins", "__builtin__") for name in ("bytes", "bytearray")),
    *((module, name) for module in _NUMPY_MODULES for name in ("_reconstruct", "_frombuffer", "ndarray", "dtype")),
}
_MARK = object()


@dataclass(frozen=True)
class _Global:
    module: str
    name: str


@dataclass
class _Dtype:
    code: str


@dataclass
class _Array:
    shape: tuple[int, ...] = ()
    dtype: str = ""
    data: bytes | None = None
    fortran: bool = False


@dataclass
class _Walk:
    """The state of the opcode walk: the stack of rebuilt values (with MARK sentinels) and the memo."""

    source: str
    stack: list[Any] = field(default_factory=list)
    memo: dict[int, Any] = field(default_factory=dict)

    def fail(self, why: str) -> DatasetFormatError:
        return DatasetFormatError(f"{self.source} is not a CIFAR-10 python batch: {why}")

    def pop(self) -> Any:
        if not self.stack or self.stack[-1] is _MARK:
            raise self.fail("pickle stack underflow")
        return self.stack.pop()

    def pop_mark(self) -> list[Any]:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i] is _MARK:
                items = self.stack[i + 1 :]
                del self.stack[i:]
                return items
        raise self.fail("pickle MARK missing")


_STRINGS = {"SHORT_BINSTRING", "BINSTRING", "STRING"}  # Python 2 ``str``: bytes
_BYTES = {"SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8"}
_TEXT = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}
_INTS = {"BININT", "BININT1", "BININT2", "INT", "LONG", "LONG1", "LONG4"}
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}
_TUPLES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


def _reduce(walk: _Walk, func: Any, args: Any) -> Any:
    """What an allowed call would build, computed here without calling anything."""
    if not isinstance(func, _Global) or not isinstance(args, tuple):
        raise walk.fail("REDUCE of something that is not an allowed global")
    name = func.name
    if name == "encode" and len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        return args[0].encode("latin-1")
    if name in ("bytes", "bytearray") and args == ():
        return b""
    if name == "_reconstruct" and len(args) == 3 and args[0] == _Global("numpy", "ndarray"):
        return _Array()
    if name == "dtype" and len(args) == 3 and isinstance(args[0], str | bytes):
        code = args[0].decode("latin-1") if isinstance(args[0], bytes) else args[0]
        return _Dtype(code)
    if name == "_frombuffer" and len(args) == 4 and isinstance(args[0], bytes) and isinstance(args[1], _Dtype):
        shape, order = args[2], args[3]
        if not isinstance(shape, tuple) or order not in ("C", "F"):
            raise walk.fail("malformed numpy _frombuffer arguments")
        return _Array(shape, args[1].code, args[0], order == "F")
    raise walk.fail(f"unexpected call {func.module}.{name}{repr(args)[:80]}")


def _build(walk: _Walk, obj: Any, state: Any) -> None:
    """Apply numpy's ``__setstate__`` layout to an array or dtype placeholder."""
    if isinstance(obj, _Dtype) and isinstance(state, tuple):
        return
    if isinstance(obj, _Array) and isinstance(state, tuple) and len(state) == 5:
        _version, shape, dtype, fortran, raw = state
        if not isinstance(shape, tuple) or not isinstance(dtype, _Dtype) or not isinstance(raw, bytes):
            raise walk.fail("the data array's state is not a raw byte buffer")
        obj.shape, obj.dtype, obj.data, obj.fortran = shape, dtype.code, raw, bool(fortran)
        return
    raise walk.fail(f"BUILD of an unexpected object {type(obj).__name__}")


def _walk_pickle(raw: bytes, source: str) -> Any:
    """Rebuild a pickle made only of plain containers, strings, numbers and numpy uint8 arrays.

    One flat dispatch over the opcodes, kept in one function so every opcode the walker accepts is
    visible in one place: anything not listed is refused, which is what keeps unpickling out.
    """
    walk = _Walk(source)
    stack = walk.stack
    try:
        for opcode, arg, _pos in pickletools.genops(raw):
            op = opcode.name
            if op in ("PROTO", "FRAME"):
                continue
            if op == "STOP":
                if len(stack) != 1:
                    raise walk.fail("pickle stack is not a single object at STOP")
                return stack[0]
            if op in _STRINGS:
                stack.append(arg.encode("latin-1"))
            elif op in _BYTES:
                stack.append(bytes(arg))
            elif op in _TEXT or op in _INTS or op in ("BINFLOAT", "FLOAT"):
                stack.append(arg)
            elif op in _CONSTANTS:
                stack.append(_CONSTANTS[op])
            elif op == "MARK":
                stack.append(_MARK)
            elif op in _PUTS or op == "MEMOIZE":
                value = walk.pop()
                stack.append(value)
                walk.memo[len(walk.memo) if op == "MEMOIZE" else arg] = value
            elif op in _GETS:
                if arg not in walk.memo:
                    raise walk.fail(f"memo key {arg} used before it was stored")
                stack.append(walk.memo[arg])
            elif op in ("EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE"):
                stack.append({} if op == "EMPTY_DICT" else [] if op == "EMPTY_LIST" else ())
            elif op in _TUPLES:
                stack.append(tuple([walk.pop() for _ in range(_TUPLES[op])][::-1]))
            elif op in ("TUPLE", "LIST", "DICT"):
                items = walk.pop_mark()
                stack.append(tuple(items) if op == "TUPLE" else items if op == "LIST" else _pairs(walk, {}, items))
            elif op in ("APPEND", "APPENDS"):
                items = [walk.pop()] if op == "APPEND" else walk.pop_mark()
                target = walk.pop()
                if not isinstance(target, list):
                    raise walk.fail(f"{op} to a {type(target).__name__}")
                target.extend(items)
                stack.append(target)
            elif op in ("SETITEM", "SETITEMS"):
                items = [walk.pop(), walk.pop()][::-1] if op == "SETITEM" else walk.pop_mark()
                target = walk.pop()
                if not isinstance(target, dict):
                    raise walk.fail(f"{op} on a {type(target).__name__}")
                stack.append(_pairs(walk, target, items))
            elif op in ("GLOBAL", "STACK_GLOBAL"):
                if op == "GLOBAL":
                    module, _, name = str(arg).partition(" ")
                else:
                    name, module = walk.pop(), walk.pop()
                if (module, name) not in _ALLOWED_GLOBALS:
                    raise walk.fail(f"it refers to {module}.{name}, which a data batch never does; refused")
                stack.append(_Global(module, name))
            elif op == "REDUCE":
                args = walk.pop()
                stack.append(_reduce(walk, walk.pop(), args))
            elif op == "BUILD":
                state = walk.pop()
                _build(walk, stack[-1] if stack else None, state)
            else:
                raise walk.fail(f"unsupported pickle opcode {op}")
    except DatasetFormatError:
        raise
    except Exception as exc:  # genops' own errors: truncated or corrupt stream
        raise walk.fail(f"corrupt pickle stream ({exc})") from exc
    raise walk.fail("pickle stream ended without STOP")


def _pairs(walk: _Walk, target: dict[Any, Any], items: list[Any]) -> dict[Any, Any]:
    if len(items) % 2:
        raise walk.fail("odd number of dict items")
    for key, value in zip(items[::2], items[1::2], strict=True):
        if not isinstance(key, str | bytes | int):
            raise walk.fail(f"unexpected dict key {repr(key)[:80]}")
        target[key] = value
    return target


def parse_cifar_batch(raw: bytes, source: str = "CIFAR-10 batch") -> tuple[np.ndarray, np.ndarray]:
    """The ``data`` (uint8 ``(N, 3072)``) and ``labels`` (int64 ``(N,)``) of one batch, never unpickling it."""
    walk = _Walk(source)
    batch = _walk_pickle(raw, source)
    if not isinstance(batch, dict):
        raise walk.fail(f"the pickle holds a {type(batch).__name__}, not a dict")
    entries = {(k.decode("latin-1") if isinstance(k, bytes) else k): v for k, v in batch.items()}
    data, labels = entries.get("data"), entries.get("labels")
    if not isinstance(data, _Array) or data.data is None:
        raise walk.fail("no 'data' array")
    if not isinstance(labels, list) or not all(type(v) is int for v in labels):
        raise walk.fail("'labels' is not a list of integers")
    n = len(labels)
    if data.dtype not in ("u1", "|u1", "uint8", "B") or data.shape != (n, CIFAR_ROW):
        raise walk.fail(f"'data' is {data.dtype} {data.shape}, expected uint8 ({n}, {CIFAR_ROW}) for {n} labels")
    if len(data.data) != n * CIFAR_ROW:
        raise walk.fail(f"'data' holds {len(data.data)} bytes, expected {n} x {CIFAR_ROW}")
    if any(not 0 <= v < NUM_CLASSES for v in labels):
        raise walk.fail("a label is outside 0-9")
    array = np.frombuffer(data.data, dtype=np.uint8).reshape(data.shape, order="F" if data.fortran else "C")
    return array, np.asarray(labels, dtype=np.int64)


def cifar10_dir(root: Path) -> Path:
    """The folder of CIFAR-10's python batches under ``root``, or DatasetNotFoundError naming the first choice."""
    candidates = [Path(root) / sub for sub in CIFAR_DIRS]
    for folder in candidates:
        if (folder / "test_batch").is_file() or (folder / "data_batch_1").is_file():
            return folder
    raise DatasetNotFoundError(
        f"CIFAR-10 batches not found in {candidates[0]} (nor {candidates[1]}); unpack the CIFAR-10 "
        f'"python version" (data_batch_1..5, test_batch) into {SETTING}/cifar10/cifar-10-batches-py. '
        "Nothing is downloaded."
    )


def _cifar_batch(folder: Path, name: str) -> Path:
    if not (folder / name).is_file():
        raise DatasetNotFoundError(
            f'CIFAR-10 batch {folder / name} not found; expected the CIFAR-10 "python version" batch {name} '
            f"in {folder}. Nothing is downloaded."
        )
    return folder / name


def check_files(name: str, root: Path) -> None:
    """Raise DatasetNotFoundError unless every file dataset ``name`` (mnist, cifar10) needs is under ``root``.

    Only checks that the files exist; reads none of them.
    """
    if name == "mnist":
        for file_name in (n for pair in MNIST_FILES.values() for n in pair):
            _mnist_file(Path(root) / "mnist", file_name)
    elif name == "cifar10":
        folder = cifar10_dir(root)
        for file_name in (n for names in CIFAR_FILES.values() for n in names):
            _cifar_batch(folder, file_name)
    else:
        raise ValueError(f"{name!r} is not a dataset read from files")


def load_cifar10(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10's own train or test split: images ``(N, 3, 32, 32)``, labels ``(N,)``."""
    folder = cifar10_dir(root)
    images, labels = [], []
    for name in CIFAR_FILES[_check_split(split)]:
        path = _cifar_batch(folder, name)
        data, y = parse_cifar_batch(path.read_bytes(), str(path))
        images.append(data)
        labels.append(y)
    x = np.concatenate(images).reshape(-1, 3, 32, 32)
    return _to_unit(x), np.concatenate(labels)


# --- synthetic ----------------------------------------------------------------------------------------------


def make_synthetic(
    num_samples: int,
    *,
    seed: int = SYNTHETIC_SEED,
    stream: int = 0,
    shape: tuple[int, int, int] = SYNTHETIC_SHAPE,
    num_classes: int = NUM_CLASSES,
    noise: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian class clusters: balanced labels, images ``(N, C, H, W)`` in [0, 1].

    The class centres depend only on ``seed``; the samples also on ``stream``, so streams 0 and 1 of one
    seed are a train and a test set of the same task.
    """
    if num_samples < 0 or num_classes < 1 or min(shape) < 1:
        raise ValueError("num_samples must be >= 0, num_classes and every dimension of shape >= 1")
    height, width, channels = shape
    size = height * width * channels
    centres = np.random.default_rng([seed, 0]).uniform(0.2, 0.8, size=(num_classes, size))
    rng = np.random.default_rng([seed, 1 + stream])
    labels = rng.permutation(np.arange(num_samples) % num_classes)
    x = centres[labels] + rng.normal(0.0, noise, size=(num_samples, size))
    x = np.clip(x, 0.0, 1.0).astype(np.float32).reshape(num_samples, channels, height, width)
    return x, labels.astype(np.int64)


def load_synthetic(split: str, seed: int = SYNTHETIC_SEED) -> tuple[np.ndarray, np.ndarray]:
    """The synthetic dataset's train (stream 0) or test (stream 1) split."""
    stream = 0 if _check_split(split) == "train" else 1
    return make_synthetic(SYNTHETIC_SIZES[split], seed=seed, stream=stream)
