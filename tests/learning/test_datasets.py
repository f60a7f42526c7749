"""Dataset loaders (MNIST IDX, CIFAR-10 batches read without unpickling, synthetic) and the partitioners."""

from __future__ import annotations

import ast
import gzip
import io
import logging
import os
import pickle
import pickletools
import shlex
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom_core.learning import dataset_files, datasets
from fedloom_core.learning.dataset_files import (
    DatasetFormatError,
    DatasetNotFoundError,
    datasets_root,
    load_cifar10,
    load_mnist,
    make_synthetic,
    parse_cifar_batch,
    parse_idx,
)
from fedloom_core.learning.datasets import (
    check_available,
    client_partition,
    dataset_info,
    iid_partition,
    load_test,
    load_train,
)
from fedloom_core.learning.partition import (
    describe_partition,
    label_summary,
    mean_label_entropy,
    partition_indices,
    strategy_label,
)

# --- file writers in the real formats ---------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of a uint8 array: magic 0x0000 08 <rank>, big-endian sizes, the values."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, gz: bool, n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder = root / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        raw = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return arrays


def cifar_images(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), [int(v) for v in rng.integers(0, 10, n)]


def py2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch laid out like CIFAR-10's own files: Python 2 cPickle, protocol 2, ``str`` as BINSTRING."""

    def s(text: bytes) -> bytes:
        return b"U" + bytes([len(text)]) + text if len(text) < 256 else b"T" + struct.pack("<i", len(text)) + text

    def i(v: int) -> bytes:
        return b"K" + bytes([v]) if v < 256 else b"M" + struct.pack("<H", v)

    n = len(labels)
    out = b"\x80\x02}q\x01(" + s(b"data") + b"q\x02cnumpy.core.multiarray\n_reconstruct\nq\x03cnumpy\nndarray\nq\x04"
    out += b"K\x00\x85" + s(b"b") + b"\x87Rq\x05(K\x01" + i(n) + i(3072) + b"\x86cnumpy\ndtype\nq\x06" + s(b"u1")
    out += b"K\x00K\x01\x87Rq\x07(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
    out += s(data.tobytes()) + b"tb" + s(b"labels") + b"q\x08]q\t(" + b"".join(i(v) for v in labels) + b"e"
    out += s(b"batch_label") + b"q\x0b" + s(b"testing batch 1 of 1") + b"q\x0c" + s(b"filenames") + b"q\r]q\x0e("
    out += b"".join(s(b"img_%d.png" % k) for k in range(n)) + b"eu."
    return out


def py3_batch(data: Any, labels: Any, protocol: int) -> bytes:
    """A batch as Python 3 would write the same dict (pickling is fine in tests; loading never unpickles)."""
    batch = {b"batch_label": b"training batch", b"labels": labels, b"data": data, b"filenames": [b"a.png"]}
    return pickle.dumps(batch, protocol=protocol)


def write_cifar(root: Path, sizes: dict[str, int]) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for k, (name, n) in enumerate(sizes.items()):
        written[name] = cifar_images(n, seed=k)
        (folder / name).write_bytes(py2_batch(*written[name]) if k % 2 == 0 else py3_batch(*written[name], 2))
    return written


CIFAR_SIZES = {**{f"data_batch_{i}": i for i in range(1, 6)}, "test_batch": 3}

# --- MNIST --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_mnist_idx_files_load_with_their_own_split(tmp_path: Path, gz: bool) -> None:
    arrays = write_mnist(tmp_path, gz)
    x, y = load_mnist(tmp_path, "train")
    assert x.shape == (6, 1, 28, 28) and x.dtype == np.float32 and y.dtype == np.int64
    assert np.array_equal(x[:, 0] * 255, arrays["train-images-idx3-ubyte"].astype(np.float32))
    assert y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert 0.0 <= x.min() and x.max() <= 1.0
    xt, yt = load_mnist(tmp_path, "test")
    assert xt.shape == (4, 1, 28, 28) and yt.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_idx_header_is_validated() -> None:
    good = idx_bytes(np.zeros((2, 28, 28), np.uint8))
    assert parse_idx(good).shape == (2, 28, 28)
    for bad, why in [
        (b"\x00\x00\x08", "magic"),
        (b"\x01" + good[1:], "magic"),
        (good[:10], "truncated"),
        (good[:-1], "promises"),
        (good + b"\x00", "promises"),
    ]:
        with pytest.raises(DatasetFormatError, match=why):
            parse_idx(bad, "f")


def test_mnist_shape_and_count_mismatches_are_rejected(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=False)
    folder = tmp_path / "mnist"
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(DatasetFormatError, match="6 images but .* 5 labels"):
        load_mnist(tmp_path, "train")
    (folder / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((4, 32, 32), np.uint8)))
    with pytest.raises(DatasetFormatError, match="28 x 28"):
        load_mnist(tmp_path, "test")
    (folder / "train-images-idx3-ubyte").unlink()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DatasetFormatError, match="gzip"):
        load_mnist(tmp_path, "train")


def test_missing_mnist_file_names_the_path(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load_mnist(tmp_path, "test")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert f"{tmp_path / 'mnist' / 't10k-labels-idx1-ubyte'}(.gz) not found" in message
    assert "FEDLOOM_DATASETS_DIR/mnist" in message and "IDX" in message


# --- CIFAR-10 -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["py2-cpickle", "p2", "p3", "p4", "p5"])
def test_cifar_batch_is_parsed_from_every_protocol(kind: str) -> None:
    data, labels = cifar_images(4, seed=3)
    raw = py2_batch(data, labels) if kind == "py2-cpickle" else py3_batch(data, labels, int(kind[1]))
    if kind == "py2-cpickle":
        pickletools.dis(raw, out=io.StringIO())  # the hand-written stream is well formed
    array, y = parse_cifar_batch(raw)
    assert array.dtype == np.uint8 and np.array_equal(array, data) and y.tolist() == labels


def test_cifar10_loads_train_and_test_split(tmp_path: Path) -> None:
    written = write_cifar(tmp_path, CIFAR_SIZES)
    x, y = load_cifar10(tmp_path, "train")
    assert x.shape == (15, 3, 32, 32) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert y.tolist() == [v for i in range(1, 6) for v in written[f"data_batch_{i}"][1]]
    data = written["data_batch_2"][0]
    # Row layout: 1024 red, 1024 green, 1024 blue values, each 32 x 32 row-major.
    assert x[1, 2, 3, 4] == pytest.approx(data[0, 2 * 1024 + 3 * 32 + 4] / 255.0)
    xt, yt = load_cifar10(tmp_path, "test")
    assert xt.shape == (3, 3, 32, 32) and yt.tolist() == written["test_batch"][1]


class RunsCode:
    """Unpickling this would run ``command`` in a shell."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("where", ["data", "labels", "extra"])
def test_cifar_batch_with_code_is_rejected_without_running_it(tmp_path: Path, protocol: int, where: str) -> None:
    marker = tmp_path / "MARKER"
    payload = RunsCode(f"touch {shlex.quote(str(marker))}")
    func, args = payload.__reduce__()
    func(*args)  # control: the payload is live
    assert marker.exists()
    marker.unlink()
    data, labels = cifar_images(2, seed=0)
    raw = {
        "data": py3_batch(payload, labels, protocol),
        "labels": py3_batch(data, [0, payload], protocol),
        "extra": pickle.dumps({b"data": data, b"labels": labels, b"x": payload}, protocol=protocol),
    }[where]
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(raw)
    with pytest.raises(DatasetFormatError, match="refused"):
        load_cifar10(tmp_path, "test")
    assert not marker.exists(), "the batch's pickle was executed"


def test_inconsistent_cifar_batches_are_rejected() -> None:
    data, labels = cifar_images(3, seed=5)
    cases = {
        "for 4 labels": py3_batch(data, labels + [1], 2),
        "is not a list of integers": py3_batch(data, np.asarray(labels), 2),
        "expected uint8": py3_batch(data.astype(np.int16), labels, 2),
        "expected uint8 ": py3_batch(data.reshape(3, 3, 1024), labels, 3),
        "outside 0-9": py3_batch(data, [0, 1, 10], 2),
        "no 'data'": pickle.dumps({b"labels": labels}, protocol=2),
        "not a dict": pickle.dumps([data, labels], protocol=2),
        "corrupt": py2_batch(data, labels)[:500],
    }
    for why, raw in cases.items():
        with pytest.raises(DatasetFormatError, match=why.strip()):
            parse_cifar_batch(raw)


def test_missing_cifar_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar10(tmp_path, "train")
    assert str(tmp_path / "cifar10" / "cifar-10-batches-py") in str(info.value)
    assert "python version" in str(info.value) and "FEDLOOM_DATASETS_DIR" in str(info.value)
    write_cifar(tmp_path, {"data_batch_1": 1, "test_batch": 1})
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_2")):
        load_cifar10(tmp_path, "train")


# --- the datasets module: setting, dispatch, digits, synthetic -------------------------------------------


def test_datasets_dir_setting_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEDLOOM_DATASETS_DIR", raising=False)
    assert datasets_root() == tmp_path / "datasets"
    monkeypatch.setenv("FEDLOOM_DATASETS_DIR", "")
    assert datasets_root() == tmp_path / "datasets"
    monkeypatch.setenv("FEDLOOM_DATASETS_DIR", str(tmp_path / "elsewhere"))
    assert datasets_root() == tmp_path / "elsewhere"


def test_file_datasets_are_read_from_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLOOM_DATASETS_DIR", str(tmp_path))
    for name, where in [("mnist", "mnist"), ("CIFAR-10", "cifar10")]:
        with pytest.raises(DatasetNotFoundError, match="digits and synthetic need no files") as info:
            check_available(name)
        assert str(tmp_path / where) in str(info.value)
    write_mnist(tmp_path, gz=True, n_train=12)
    write_cifar(tmp_path, {"test_batch": 1})
    check_available("mnist")
    with pytest.raises(DatasetNotFoundError, match="data_batch_1"):
        check_available("cifar10")
    write_cifar(tmp_path, CIFAR_SIZES)
    for name in ("mnist", "cifar10", "digits", "synthetic"):
        check_available(name)
    try:
        assert dataset_info("MNIST").input_shape == (28, 28, 1)
        assert dataset_info("CIFAR-10").input_shape == (32, 32, 3) and dataset_info("cifar10").num_classes == 10
        assert len(load_train("mnist")) == 12 and len(load_test("mnist")) == 4
        assert load_train("CIFAR-10").x.shape == (15, 3, 32, 32) and len(load_test("cifar10")) == 3
        shard = client_partition("mnist", 1, 3, seed=1, strategy="dirichlet", alpha=0.3)
        assert shard.x.shape[1:] == (1, 28, 28) and len(shard) >= 1
    finally:
        datasets._train_test.cache_clear()


def test_digits_split_is_unchanged() -> None:
    train, test = load_train("digits"), load_test("digits")
    assert (len(train), len(test)) == (1438, 359)
    assert test.y[:5].tolist() == [1, 0, 0, 1, 4] and train.y[:5].tolist() == [0, 2, 3, 4, 5]
    assert dataset_info("digits").input_shape == (8, 8, 1)
    assert iid_partition(100, 0, 3, seed=0)[:10].tolist() == [4, 5, 8, 9, 10, 11, 13, 16, 19, 20]
    shard = client_partition("digits", 1, 3, seed=7)
    assert len(shard) == 479 and shard.y[:8].tolist() == [2, 3, 5, 7, 2, 8, 3, 7]


def test_synthetic_is_deterministic_with_its_own_split() -> None:
    x1, y1 = make_synthetic(50, seed=4)
    x2, y2 = make_synthetic(50, seed=4)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(make_synthetic(50, seed=5)[0], x1)
    assert not np.array_equal(make_synthetic(50, seed=4, stream=1)[0], x1)
    x3, _ = make_synthetic(7, shape=(4, 5, 3), num_classes=3)
    assert x3.shape == (7, 3, 4, 5)
    train, test = load_train("synthetic"), load_test("synthetic")
    assert train.x.shape[1:] == (1, 8, 8) and train.x.dtype.is_floating_point and len(test) > 0
    assert np.bincount(train.y.numpy()).tolist() == [len(train) // 10] * 10
    assert dataset_info("synthetic").input_shape == dataset_files.SYNTHETIC_SHAPE
    assert np.array_equal(load_test("synthetic").x.numpy(), dataset_files.load_synthetic("test")[0])


# --- partitioners -------------------------------------------------------------------------------------------


def skewed_labels(n: int = 1200, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).choice(10, size=n, p=np.linspace(1, 3, 10) / np.linspace(1, 3, 10).sum())


@pytest.mark.parametrize("strategy", ["iid", "dirichlet", "shards"])
@pytest.mark.parametrize("count", [1, 7, 20])
def test_partitions_are_deterministic_disjoint_and_cover(strategy: str, count: int) -> None:
    labels = skewed_labels()
    parts = partition_indices(labels, count, strategy, seed=3, alpha=0.2, shards_per_client=2)
    again = partition_indices(labels, count, strategy, seed=3, alpha=0.2, shards_per_client=2)
    assert len(parts) == count and all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))  # disjoint and covering
    assert all(len(p) >= 1 for p in parts) and all(np.all(np.diff(p) > 0) for p in parts)
    if count > 1:
        other = partition_indices(labels, count, strategy, seed=4, alpha=0.2, shards_per_client=2)
        assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    labels = skewed_labels(2000)
    entropy = [
        np.mean(
            [mean_label_entropy(labels, partition_indices(labels, 10, "dirichlet", seed=s, alpha=a)) for s in (0, 1)]
        )
        for a in (100.0, 1.0, 0.1, 0.01)
    ]
    assert entropy == sorted(entropy, reverse=True) and entropy[0] > 3.0 and entropy[-1] < 1.0
    assert mean_label_entropy(labels, partition_indices(labels, 10, "iid")) > 3.0


def test_dirichlet_gives_every_client_a_sample() -> None:
    labels = np.array([0] * 8 + [1] * 4)
    for seed in range(20):
        parts = partition_indices(labels, 12, "dirichlet", seed=seed, alpha=0.01)
        assert sorted(len(p) for p in parts) == [1] * 12
        parts = partition_indices(labels, 5, "dirichlet", seed=seed, alpha=0.05)
        assert min(len(p) for p in parts) >= 1 and sum(len(p) for p in parts) == 12
    with pytest.raises(ValueError, match="only 12"):
        partition_indices(labels, 13, "dirichlet")
    with pytest.raises(ValueError, match="alpha"):
        partition_indices(labels, 2, "dirichlet", alpha=0.0)


@pytest.mark.parametrize(("clients", "k", "per_class"), [(10, 2, 100), (10, 3, 60), (5, 2, 30), (20, 1, 40)])
def test_shards_give_exactly_k_classes_when_classes_divide_evenly(clients: int, k: int, per_class: int) -> None:
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), per_class))
    for seed in range(5):
        parts = partition_indices(labels, clients, "shards", seed=seed, shards_per_client=k)
        summary = label_summary(labels, parts)
        assert [len(counts) for counts in summary] == [k] * clients
        assert {len(p) for p in parts} == {len(labels) // clients}


def test_shards_and_strategy_errors() -> None:
    with pytest.raises(ValueError, match="more than the 10 samples"):
        partition_indices(np.arange(10) % 2, 4, "shards", shards_per_client=3)
    with pytest.raises(ValueError, match="known: iid, dirichlet, shards"):
        partition_indices(np.arange(10), 2, "sorted")
    with pytest.raises(ValueError, match="out of range"):
        client_partition("digits", 3, 3)


def test_label_summary_and_description() -> None:
    labels = np.array([0, 0, 1, 2, 2, 2])
    parts = [np.array([0, 1, 3]), np.array([2, 4, 5])]
    assert label_summary(labels, parts) == [{0: 2, 2: 1}, {1: 1, 2: 2}]
    text = describe_partition(labels, parts, "dirichlet", alpha=0.3)
    assert text.startswith("dirichlet(alpha=0.3) over 2 clients: 6 samples, 3-3 per client")
    assert "client 2: 3 samples, 2 classes {1: 1, 2: 2}" in text
    assert strategy_label("SHARDS", shards_per_client=4) == "shards(per_client=4)"


# --- the client command -------------------------------------------------------------------------------------


def test_client_flags_reach_the_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedloom import cli, runtime

    seen: dict[str, Any] = {}
    monkeypatch.setattr(runtime, "run_client", lambda **kwargs: seen.update(kwargs) or 0)
    argv = ["client", "--api-key", "k", "--client-id", "c1", "--partition", "2/4", "--partition-strategy", "shards"]
    assert cli.main([*argv, "--alpha", "0.1", "--shards-per-client", "3"]) == 0
    assert seen["partition_strategy"] == "shards" and seen["alpha"] == 0.1 and seen["shards_per_client"] == 3
    assert cli.main(argv[:-2]) == 0
    assert (seen["partition_strategy"], seen["alpha"], seen["shards_per_client"]) == ("iid", 0.5, 2)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([*argv[:-1], "random"])


def test_client_runtime_logs_its_label_summary(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from fedloom import runtime

    class Stop(Exception):
        pass

    def stop(*_args: Any) -> None:
        raise Stop

    monkeypatch.setattr(runtime, "FLClient", stop)
    with caplog.at_level(logging.INFO, logger="fedloom.client"), pytest.raises(Stop):
        runtime.run_client(
            server="http://127.0.0.1:9",
            api_key="k",
            client_id="c1",
            partition="1/5",
            partition_strategy="shards",
            shards_per_client=1,
        )
    [line] = [r.getMessage() for r in caplog.records if "labels {" in r.getMessage()]
    assert "shard 1/5 of digits, shards(per_client=1)" in line
    counts = ast.literal_eval(line.split("labels ", 1)[1])
    assert sum(counts.values()) == len(client_partition("digits", 0, 5, strategy="shards", shards_per_client=1))
