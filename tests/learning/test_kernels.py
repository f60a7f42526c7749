"""Streaming FedAvg: exact values, order independence, errors and bounded memory."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedloom_core.learning.kernels import UpdateFile, fedavg, fedavg_weights
from fedloom_core.learning.strategies import streaming


def _write(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _updates(tmp_path: Path, states: dict[str, tuple[int, dict[str, torch.Tensor]]]) -> list[UpdateFile]:
    """One update file per client: ``{client_id: (num_samples, state)}``, in the given (arrival) order."""
    return [
        UpdateFile(cid, _write(tmp_path / f"{cid}.safetensors", state), samples)
        for cid, (samples, state) in states.items()
    ]


def _f32(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _assert_file_matches(out: Path, result: dict[str, torch.Tensor]) -> None:
    on_disk = load_file(str(out))
    assert on_disk.keys() == result.keys()
    for name, t in result.items():
        assert on_disk[name].dtype == t.dtype, name
        assert torch.equal(on_disk[name], t), name


# --- exact values, computed by hand ------------------------------------------------------------------


def test_weighted_fedavg_exact_dyadic_weights(tmp_path: Path) -> None:
    # num_samples 1, 3, 4 -> weights 1/8, 3/8, 1/2: every product and sum below is exact in float32.
    updates = _updates(
        tmp_path,
        {
            "c3": (4, {"fc.weight": _f32(4, 2, 0, -1).reshape(2, 2), "fc.bias": _f32(5, 6)}),
            "c1": (1, {"fc.weight": _f32(8, 0, -16, 1.5).reshape(2, 2), "fc.bias": _f32(1, 2)}),
            "c2": (3, {"fc.weight": _f32(0, 8, 16, 0.5).reshape(2, 2), "fc.bias": _f32(3, 4)}),
        },
    )
    assert fedavg_weights(sorted(updates, key=lambda u: u.client_id)) == [0.125, 0.375, 0.5]
    out = tmp_path / "avg.safetensors"
    result = fedavg(updates, out)
    # fc.weight: [1, 0, -2, 0.1875] + [0, 3, 6, 0.1875] + [2, 1, 0, -0.5]
    assert torch.equal(result["fc.weight"], _f32(3, 4, 4, -0.125).reshape(2, 2))
    # fc.bias: 1/8*1 + 3/8*3 + 1/2*5 = 3.75 ; 1/8*2 + 3/8*4 + 1/2*6 = 4.75
    assert torch.equal(result["fc.bias"], _f32(3.75, 4.75))
    assert result["fc.weight"].dtype == torch.float32
    _assert_file_matches(out, result)


def test_weighted_fedavg_samples_1_2_3(tmp_path: Path) -> None:
    updates = _updates(
        tmp_path,
        {
            "a": (1, {"w": _f32(6, 12, 0)}),
            "b": (2, {"w": _f32(0, 6, 3)}),
            "c": (3, {"w": _f32(12, 0, 1)}),
        },
    )
    result = fedavg(updates, tmp_path / "avg.safetensors", weighted=True)
    # (1*6 + 2*0 + 3*12)/6 = 7 ; (1*12 + 2*6 + 3*0)/6 = 4 ; (0 + 2*3 + 3*1)/6 = 1.5
    # (1/6 and 1/3 are not exact in binary, hence the float32-epsilon tolerance)
    torch.testing.assert_close(result["w"], _f32(7, 4, 1.5), rtol=2e-7, atol=1e-6)


def test_unweighted_fedavg_ignores_num_samples(tmp_path: Path) -> None:
    updates = _updates(
        tmp_path,
        {
            "a": (1, {"w": _f32(6, 12, 0)}),
            "b": (200, {"w": _f32(0, 6, 3)}),
            "c": (3, {"w": _f32(12, 0, 1)}),
        },
    )
    result = fedavg(updates, tmp_path / "avg.safetensors", weighted=False)
    # (6+0+12)/3 = 6 ; (12+6+0)/3 = 6 ; (0+3+1)/3 = 4/3
    torch.testing.assert_close(result["w"], _f32(6, 6, 4 / 3), rtol=2e-7, atol=1e-6)

    # Four clients: weight 1/4 each is exact; the weighted mean would be (1+400+15+70)/213, not 4.
    updates = _updates(
        tmp_path,
        {"p": (1, {"w": _f32(1)}), "q": (200, {"w": _f32(2)}), "r": (5, {"w": _f32(3)}), "s": (7, {"w": _f32(10)})},
    )
    assert torch.equal(fedavg(updates, tmp_path / "avg2.safetensors", weighted=False)["w"], _f32(4))


def test_low_precision_float_and_integer_tensors(tmp_path: Path) -> None:
    # Arrival order b, c, a; canonical (sorted) order a, b, c. num_samples 1, 1, 2 -> weights a=1/4, b=1/4, c=1/2.
    def state(half, f64, steps, ints, mask, u8):
        return {
            "h": torch.tensor(half, dtype=torch.float16),
            "bf": torch.tensor(half, dtype=torch.bfloat16),
            "d": torch.tensor(f64, dtype=torch.float64),
            "bn.num_batches_tracked": torch.tensor(steps, dtype=torch.int64),
            "i32": torch.tensor(ints, dtype=torch.int32),
            "mask": torch.tensor(mask, dtype=torch.bool),
            "u8": torch.tensor(u8, dtype=torch.uint8),
        }

    updates = _updates(
        tmp_path,
        {
            "b": (1, state([3, 2], [5, 1], 20, [7, 8, 9], [False, False], [200, 201])),
            "c": (2, state([0.5, 4], [2, 2], 30, [4, 5, 6], [False, True], [100, 101])),
            "a": (1, state([1, -2], [1, 3], 10, [1, 2, 3], [True, False], [1, 2])),
        },
    )
    out = tmp_path / "avg.safetensors"
    result = fedavg(updates, out)
    # h, bf: 1/4*1 + 1/4*3 + 1/2*0.5 = 1.25 ; 1/4*(-2) + 1/4*2 + 1/2*4 = 2.0 (exact in float16 and bfloat16)
    assert torch.equal(result["h"], torch.tensor([1.25, 2.0], dtype=torch.float16))
    assert torch.equal(result["bf"], torch.tensor([1.25, 2.0], dtype=torch.bfloat16))
    # d: 1/4*1 + 1/4*5 + 1/2*2 = 2.5 ; 1/4*3 + 1/4*1 + 1/2*2 = 2.0
    assert torch.equal(result["d"], torch.tensor([2.5, 2.0], dtype=torch.float64))
    # Non-float tensors are client "a"'s (first by sorted id), not "b"'s (first to arrive).
    assert torch.equal(result["bn.num_batches_tracked"], torch.tensor(10, dtype=torch.int64))
    assert torch.equal(result["i32"], torch.tensor([1, 2, 3], dtype=torch.int32))
    assert torch.equal(result["mask"], torch.tensor([True, False]))
    assert torch.equal(result["u8"], torch.tensor([1, 2], dtype=torch.uint8))
    for name, dtype in [
        ("h", torch.float16),
        ("bf", torch.bfloat16),
        ("d", torch.float64),
        ("bn.num_batches_tracked", torch.int64),
        ("i32", torch.int32),
        ("mask", torch.bool),
        ("u8", torch.uint8),
    ]:
        assert result[name].dtype == dtype, name
    assert result["bn.num_batches_tracked"].shape == ()
    _assert_file_matches(out, result)


def test_float16_is_accumulated_in_float32(tmp_path: Path) -> None:
    # Unweighted, 4 clients: 2048/4 + 3 * (1/4) = 512.75, which rounds (ties to even) to 513 in float16.
    # A float16 accumulator would get 512 (512 + 0.25 rounds back to 512 each time).
    updates = _updates(
        tmp_path,
        {
            cid: (1, {"h": torch.tensor([v], dtype=torch.float16)})
            for cid, v in [("a", 2048.0), ("b", 1.0), ("c", 1.0), ("d", 1.0)]
        },
    )
    result = fedavg(updates, tmp_path / "avg.safetensors", weighted=False)
    assert torch.equal(result["h"], torch.tensor([513.0], dtype=torch.float16))


# --- order independence -----------------------------------------------------------------------------


def _random_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "conv.weight": torch.randn(16, 8, 3, 3, generator=gen) * 3.7,
        "conv.bias": torch.randn(16, generator=gen) * 1e-3,
        "fc.weight": torch.randn(64, 100, generator=gen),
        "fc.bias": torch.rand(64, generator=gen) * 1e4,
        "emb.weight": (torch.randn(32, 16, generator=gen) * 5).to(torch.float16),
        "norm.weight": torch.randn(48, generator=gen).to(torch.bfloat16),
        "head.double": torch.randn(10, generator=gen, dtype=torch.float64) / 3,
        "bn.num_batches_tracked": torch.randint(0, 1000, (), generator=gen),
    }


def test_bitwise_identical_for_every_arrival_order(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1234)
    clients = [("client-q", 7), ("client-b", 13), ("client-z", 1), ("client-a", 100), ("client-m", 29)]
    updates = [UpdateFile(cid, _write(tmp_path / f"{cid}.safetensors", _random_state(gen)), n) for cid, n in clients]

    # Guard against a vacuous test: with these values and weights, folding in a different order does
    # change the float32 bits, so an implementation that folded in arrival order would fail below.
    weights = fedavg_weights(updates)
    states = [load_file(str(u.path)) for u in updates]

    def fold(order: list[int]) -> torch.Tensor:
        acc = torch.zeros(64, 100)
        for i in order:
            acc.add_(states[i]["fc.weight"], alpha=weights[i])
        return acc

    assert not torch.equal(fold([0, 1, 2, 3, 4]), fold([4, 3, 2, 1, 0]))

    reference_bytes: bytes | None = None
    reference: dict[str, torch.Tensor] | None = None
    for n, perm in enumerate(itertools.permutations(updates)):
        out = tmp_path / f"out-{n}.safetensors"
        result = fedavg(list(perm), out)
        data = out.read_bytes()
        if reference_bytes is None:
            reference_bytes, reference = data, result
            continue
        assert data == reference_bytes, f"permutation {[u.client_id for u in perm]} gave different bytes"
        assert result.keys() == reference.keys()
        for name in result:
            assert torch.equal(result[name], reference[name]), (name, [u.client_id for u in perm])
        out.unlink()
    assert n == 119


# --- errors -----------------------------------------------------------------------------------------


def test_zero_updates_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="zero updates"):
        fedavg([], tmp_path / "avg.safetensors")
    with pytest.raises(ValueError, match="zero updates"):
        fedavg([], tmp_path / "avg.safetensors", weighted=False)
    assert not (tmp_path / "avg.safetensors").exists()


def test_zero_total_samples_is_an_error(tmp_path: Path) -> None:
    updates = _updates(tmp_path, {"a": (0, {"w": _f32(1)}), "b": (0, {"w": _f32(2)})})
    with pytest.raises(ValueError, match="positive number of samples"):
        fedavg(updates, tmp_path / "avg.safetensors")
    assert torch.equal(fedavg(updates, tmp_path / "avg.safetensors", weighted=False)["w"], _f32(1.5))


@pytest.mark.parametrize(
    "other",
    [
        {"w": _f32(1, 2), "c": _f32(0)},  # renamed tensor
        {"w": _f32(1, 2)},  # missing tensor
        {"w": _f32(1, 2), "b": _f32(0), "extra": _f32(9)},  # extra tensor
    ],
    ids=["renamed", "missing", "extra"],
)
@pytest.mark.parametrize("odd_one_first", [False, True])
def test_mismatched_tensor_names_is_an_error(tmp_path: Path, other: dict, odd_one_first: bool) -> None:
    base = {"w": _f32(1, 2), "b": _f32(0)}
    # The odd client sorts first or last, so both the "first update defines the names" and the
    # "later update differs" paths are exercised.
    odd_id = "a-odd" if odd_one_first else "z-odd"
    updates = _updates(tmp_path, {"m1": (1, base), odd_id: (1, other), "m2": (1, base)})
    out = tmp_path / "avg.safetensors"
    with pytest.raises(ValueError, match="different tensors"):
        fedavg(updates, out)
    assert not out.exists()


def test_mismatched_tensor_shape_is_an_error(tmp_path: Path) -> None:
    updates = _updates(tmp_path, {"a": (1, {"w": torch.ones(4, 3)}), "b": (1, {"w": torch.ones(3)})})
    with pytest.raises(ValueError):
        fedavg(updates, tmp_path / "avg.safetensors")


@pytest.mark.parametrize("int_first", [False, True])
def test_mismatched_tensor_dtype_is_an_error(tmp_path: Path, int_first: bool) -> None:
    f, i = torch.ones(2), torch.ones(2, dtype=torch.int32)
    updates = _updates(tmp_path, {"a": (1, {"w": i if int_first else f}), "b": (1, {"w": f if int_first else i})})
    with pytest.raises(ValueError):
        fedavg(updates, tmp_path / "avg.safetensors")


# --- one update at a time ---------------------------------------------------------------------------


def test_opener_materialises_one_update_at_a_time_in_canonical_order(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(7)
    ids = ["d", "b", "e", "a", "c"]
    remote = {cid: _write(tmp_path / f"remote-{cid}.safetensors", _random_state(gen)) for cid in ids}
    updates = [UpdateFile(cid, Path(f"s3://bucket/{cid}"), i + 1) for i, cid in enumerate(ids)]
    opened: list[str] = []
    live = 0
    peak_live = 0

    @contextmanager
    def opener(update: UpdateFile) -> Iterator[Path]:
        nonlocal live, peak_live
        local = tmp_path / f"local-{update.client_id}.safetensors"
        local.write_bytes(remote[update.client_id].read_bytes())  # a "download"
        live += 1
        peak_live = max(peak_live, live)
        opened.append(update.client_id)
        try:
            yield local
        finally:
            live -= 1
            local.unlink()

    via_opener = fedavg(updates, tmp_path / "a.safetensors", opener=opener)
    assert opened == sorted(ids)
    assert peak_live == 1 and live == 0
    direct = fedavg(
        [UpdateFile(u.client_id, remote[u.client_id], u.num_samples) for u in updates], tmp_path / "b.safetensors"
    )
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert all(torch.equal(via_opener[k], direct[k]) for k in direct)


# --- bounded memory ---------------------------------------------------------------------------------

# 4 Mi float32 elements = 16 MiB per update.
MODEL_SHAPES = {"layer1.weight": (2048, 1024), "layer2.weight": (1024, 1024), "layer3.weight": (512, 2048)}
MODEL_BYTES = 4 * sum(a * b for a, b in MODEL_SHAPES.values())

_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    from pathlib import Path
    import torch
    from fedloom_core.learning.kernels import UpdateFile, fedavg

    spec = json.loads(sys.argv[1])
    updates = [UpdateFile(cid, Path(p), n) for cid, p, n in spec["updates"]]

    def status(field):
        return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    # Everything the run needs is imported and set up: reset the peak RSS to the current RSS.
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = status("VmRSS")
    fedavg(updates, spec["out"])
    print(json.dumps({"base": base, "peak": status("VmHWM")}))
    """
)


def _peak_rss(*runs: tuple[list[UpdateFile], Path]) -> list[dict[str, int]]:
    """Base and peak RSS of a fresh interpreter aggregating each run (runs go in parallel processes)."""
    procs = []
    for updates, out in runs:
        spec = {"updates": [[u.client_id, str(u.path), u.num_samples] for u in updates], "out": str(out)}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _PEAK_SCRIPT, json.dumps(spec)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    found = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        found.append(json.loads(stdout.strip().splitlines()[-1]))
    return found


def test_peak_memory_does_not_grow_with_the_number_of_updates(tmp_path: Path) -> None:
    """Peak RSS for K=20 updates is within half a model of the peak for K=2.

    The streaming fold keeps one float32 accumulator plus one memory-mapped update resident (the
    previous update's map is dropped as the next one is folded), so its peak over the subprocess's
    baseline is a few models whatever K is and the K=20 - K=2 difference is ~0.

    An implementation that loads all K updates at once (``load_file`` for each, then averages)
    holds K * MODEL_BYTES at its peak, so the difference would be about 18 * MODEL_BYTES (~288 MiB),
    far above the 0.5 * MODEL_BYTES (8 MiB) bound. So would one that memory-maps all K files before
    folding, because VmHWM counts the touched file-backed pages of every live mapping. (Checked with
    a scratch naive implementation outside the repo: the difference was ~18 models.)
    """
    base = torch.randn(sum(a * b for a, b in MODEL_SHAPES.values()), generator=torch.Generator().manual_seed(0))
    updates = []
    for i in range(20):
        flat = base + i
        offset, state = 0, {}
        for name, (a, b) in MODEL_SHAPES.items():
            state[name] = flat[offset : offset + a * b].view(a, b)
            offset += a * b
        updates.append(UpdateFile(f"client-{i:02d}", _write(tmp_path / f"u{i:02d}.safetensors", state), i + 1))
    assert (tmp_path / "u00.safetensors").stat().st_size >= MODEL_BYTES
    del base, flat, state

    small, large = _peak_rss((updates[:2], tmp_path / "avg2.safetensors"), (updates, tmp_path / "avg20.safetensors"))
    growth = large["peak"] - small["peak"]
    assert growth < 0.5 * MODEL_BYTES, (
        f"peak RSS grew by {growth / 2**20:.1f} MiB from K=2 to K=20 (model is {MODEL_BYTES / 2**20:.0f} MiB); "
        f"K=2: {small}, K=20: {large}"
    )
    # And the fold itself costs a handful of models above the interpreter's baseline, not K of them.
    assert large["peak"] - large["base"] < 6 * MODEL_BYTES, large
    # Sanity: the K=20 result is the weighted mean of base + i with weights (i+1)/210.
    result = load_file(str(tmp_path / "avg20.safetensors"))
    expected_shift = sum(i * (i + 1) for i in range(20)) / 210
    first = load_file(str(updates[0].path))
    torch.testing.assert_close(result["layer2.weight"], first["layer2.weight"] + expected_shift, rtol=0, atol=1e-4)


# -- the data plane's fast paths: the output writer and the blob store's verified digests ----------

# Every dtype the streaming writer knows.
_ALL_DTYPES = tuple(streaming._DTYPES.values())


@pytest.mark.parametrize("seed", range(6))
def test_save_state_writes_the_bytes_safetensors_writes(tmp_path: Path, seed: int) -> None:
    """save_state streams tensors to the file itself; the result must equal the library's, byte for byte."""
    from fedloom_core.learning.weights import save_state

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(14):
        dtype = _ALL_DTYPES[int(torch.randint(len(_ALL_DTYPES), (1,), generator=gen))]
        shape = [int(d) for d in torch.randint(0, 5, (int(torch.randint(0, 4, (1,), generator=gen)),), generator=gen)]
        name = f"layer{int(torch.randint(50, (1,), generator=gen))}.w\u00e9{i % 3}"
        state[name] = (torch.randn(shape, generator=gen) * 40).to(dtype)
    save_file(state, str(tmp_path / "library.safetensors"))
    save_state(state, tmp_path / "ours.safetensors")
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "library.safetensors").read_bytes()
    # Overwriting replaces the file whole, and leaves no temporary file behind.
    save_state({"x": torch.ones(3)}, tmp_path / "ours.safetensors")
    assert load_file(str(tmp_path / "ours.safetensors"))["x"].tolist() == [1.0, 1.0, 1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["library.safetensors", "ours.safetensors"]


def _count_hashing(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from fedloom_core.storage.blobstore import base as blobstore

    calls: list[int] = []
    real = blobstore._copy_hashing

    def counting(src, dst):  # type: ignore[no-untyped-def]
        if dst is None:
            calls.append(1)
        return real(src, dst)

    monkeypatch.setattr(blobstore, "_copy_hashing", counting)
    return calls


def test_verified_digest_is_reused_only_for_settled_unchanged_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedloom_core.storage.blobstore import local as blobstore

    store = blobstore.LocalBlobStore(tmp_path / "blobs")
    store.put_stream("u/a", io.BytesIO(b"x" * 5000))
    hashed = _count_hashing(monkeypatch)
    # Just written: its timestamps could still repeat, so every open re-hashes it.
    for _ in range(2):
        with store.open_local("u/a"):
            pass
    assert len(hashed) == 2
    # Once settled (the ctime, which utime cannot move back, is what we pretend is old here).
    monkeypatch.setattr(blobstore, "_SETTLED_NS", 0)
    with store.open_local("u/a"):
        pass
    with store.open_local("u/a") as path:
        assert path.read_bytes() == b"x" * 5000
    assert len(hashed) == 3
    # Any change to the file (here the same size, in place) changes its identity: hashed again, and caught.
    path.write_bytes(b"y" * 5000)
    with pytest.raises(blobstore.BlobIntegrityError), store.open_local("u/a"):
        pytest.fail("open_local must not yield modified content")
    assert len(hashed) == 4
    # verify=False never hashes; another store (another process) has its own memory.
    with store.open_local("u/a", verify=False):
        pass
    assert len(hashed) == 4
    other = blobstore.LocalBlobStore(tmp_path / "blobs")
    with pytest.raises(blobstore.BlobIntegrityError), other.open_local("u/a"):
        pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_start_fold_is_bit_identical_to_zeros_then_add(dtype: torch.dtype) -> None:
    from fedloom_core.learning.kernels import start_fold

    gen = torch.Generator().manual_seed(11)
    # Above torch's parallel grain size (32768), so the multi-threaded path is the one checked.
    update = torch.randn(5 * 32768 + 99, generator=gen).to(dtype)
    update[:50] = -0.0
    update[50:60] = -1e-300 if dtype == torch.float64 else -1e-44
    for weight in (0.1, 1 / 3, 1e-30):
        expected = torch.zeros_like(update).add_(update, alpha=weight)
        got = start_fold(update.reshape(-1, 1), weight).reshape(-1)
        assert torch.equal(expected.view(torch.uint8), got.view(torch.uint8))
