"""Weight files: hostile and malformed uploads are rejected, good ones are accepted and round-trip."""

from __future__ import annotations

import json
import os
import pickle
import random
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedloom_core.errors import InvalidRequest, ModelValidationFailed
from fedloom_core.learning import weights
from fedloom_core.learning.weights import (
    MAX_HEADER_BYTES,
    WeightsFormatError,
    compare_structure,
    load_state,
    mapped_tensors,
    nonfinite_tensors,
    normalize_upload,
    read_header,
    save_state,
    structure,
)
from fedloom_core.learning.zoo import build_model
from fedloom_core.storage.uploads import check_upload, parse_metrics

EXPECTED = {"fc.weight": ("F32", (4, 3)), "fc.bias": ("F32", (4,))}


def _good_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"fc.weight": torch.randn(4, 3, generator=gen), "fc.bias": torch.randn(4, generator=gen)}


def _raw_safetensors(path: Path, header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def _reject(path: Path, tmp_path: Path, expected: dict = EXPECTED) -> ModelValidationFailed:
    """``path`` fails validation as an upload; the normalised output is not left behind."""
    out = tmp_path / "normalized.safetensors"
    with pytest.raises(ModelValidationFailed) as info:
        check_upload(path, out, expected)
    exc = info.value
    assert exc.status == 400 and exc.code == "MODEL_VALIDATION_FAILED"
    assert exc.details and exc.details != exc.message
    return exc


# --- code-executing pickles ---------------------------------------------------------------------------


class RunsCode:
    """Unpickling this runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _touch(marker: Path) -> RunsCode:
    return RunsCode(f"touch {shlex.quote(str(marker))}")


def _pickle_payloads(marker: Path, dest: Path) -> dict[str, Path]:
    payloads = {
        "pickle-p2": pickle.dumps(_touch(marker), protocol=2),
        "pickle-p0": pickle.dumps(_touch(marker), protocol=0),
        "pickle-p5": pickle.dumps({"fc.weight": _touch(marker)}, protocol=5),
    }
    files = {}
    for name, data in payloads.items():
        files[name] = dest / f"{name}.bin"
        files[name].write_bytes(data)
    files["torch-save-zip"] = dest / "torch-zip.pt"
    torch.save(_touch(marker), files["torch-save-zip"])
    files["torch-save-zip-in-state-dict"] = dest / "torch-zip-dict.pt"
    torch.save({**_good_state(), "hook": _touch(marker)}, files["torch-save-zip-in-state-dict"])
    files["torch-save-legacy"] = dest / "torch-legacy.pt"
    torch.save(_touch(marker), files["torch-save-legacy"], _use_new_zipfile_serialization=False)
    return files


PAYLOAD_KINDS = [
    "pickle-p2",
    "pickle-p0",
    "pickle-p5",
    "torch-save-zip",
    "torch-save-zip-in-state-dict",
    "torch-save-legacy",
]


def test_pickle_payloads_are_live(tmp_path: Path) -> None:
    """Control: the payloads below really do run code when loaded the unsafe way."""
    marker = tmp_path / "CONTROL_MARKER"
    files = _pickle_payloads(marker, tmp_path)
    pickle.loads(files["pickle-p2"].read_bytes())  # noqa: S301 - deliberately unsafe control
    assert marker.exists()
    marker.unlink()
    torch.load(files["torch-save-zip"], weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", PAYLOAD_KINDS)
def test_code_executing_pickle_is_rejected_without_running(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "MARKER"
    path = _pickle_payloads(marker, tmp_path)[kind]
    with pytest.raises(WeightsFormatError):
        normalize_upload(path, tmp_path / "direct.safetensors")
    exc = _reject(path, tmp_path)
    assert "state_dict" in exc.details or "safetensors" in exc.details
    assert not marker.exists(), "the upload's pickle was executed"
    assert not (tmp_path / "direct.safetensors").exists()


# --- malformed safetensors ----------------------------------------------------------------------------


def _valid_file(tmp_path: Path) -> Path:
    path = tmp_path / "valid.safetensors"
    save_file(_good_state(), str(path))
    return path


@pytest.mark.parametrize("keep", ["4", "8", "header/2", "header", "half-data", "minus-1"])
def test_truncated_safetensors_is_rejected(tmp_path: Path, keep: str) -> None:
    data = _valid_file(tmp_path).read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    cut = {
        "4": 4,
        "8": 8,
        "header/2": 8 + header_len // 2,
        "header": 8 + header_len,
        "half-data": 8 + header_len + (len(data) - 8 - header_len) // 2,
        "minus-1": len(data) - 1,
    }[keep]
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[:cut])
    with pytest.raises(WeightsFormatError):
        read_header(path)
    exc = _reject(path, tmp_path)
    reason = {"4": "too short", "8": "header length", "header/2": "header length"}.get(keep, "data_offsets")
    assert reason in exc.details
    if reason == "data_offsets":
        assert "fc." in exc.details  # names the tensor whose data is missing


@pytest.mark.parametrize("header_len", [2**64 - 1, 2**63, 10**12, MAX_HEADER_BYTES + 8])
def test_header_claiming_a_huge_length_is_rejected(tmp_path: Path, header_len: int) -> None:
    path = _raw_safetensors(tmp_path / "huge.safetensors", b'{"a": {}}', header_len=header_len)
    exc = _reject(path, tmp_path)
    assert "header length" in exc.details


def test_header_longer_than_the_limit_is_rejected_even_if_the_file_is_that_big(tmp_path: Path) -> None:
    path = _raw_safetensors(tmp_path / "big.safetensors", b"{", header_len=MAX_HEADER_BYTES + 8)
    with open(path, "r+b") as fh:  # a sparse file, so this costs no disk
        fh.truncate(MAX_HEADER_BYTES + 1024)
    with pytest.raises(WeightsFormatError, match="header length"):
        read_header(path)


F32x4 = b"\0" * 16


@pytest.mark.parametrize(
    ("header", "data", "reason"),
    [
        ({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}, F32x4, "data_offsets"),
        ({"w": {"dtype": "F32", "shape": [1 << 30, 1 << 30], "data_offsets": [0, 16]}}, F32x4, "data_offsets"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 32]}}, F32x4, "data_offsets"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, F32x4, "data_offsets"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [-4, 12]}}, F32x4, "data_offsets"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [12, 4]}}, F32x4, "data_offsets"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, F32x4, "data_offsets"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0]}}, F32x4, "data_offsets"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.0]}}, F32x4, "data_offsets"),
        ({"w": {"dtype": "F32", "shape": [4]}}, F32x4, "data_offsets"),
        ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, F32x4, "shape"),
        ({"w": {"dtype": "F32", "shape": [1 << 41], "data_offsets": [0, 16]}}, F32x4, "shape"),
        ({"w": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, F32x4, "shape"),
        ({"w": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}}, F32x4, "shape"),
        ({"w": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}, F32x4, "dtype"),
        ({"w": {"dtype": "OBJECT", "shape": [4], "data_offsets": [0, 16]}}, F32x4, "dtype"),
        ({"w": {"shape": [4], "data_offsets": [0, 16]}}, F32x4, "dtype"),
        ({"w": [0, 16]}, F32x4, "not an object"),
        ({}, b"", "no tensors"),
        ({"__metadata__": {"format": "pt"}}, b"", "no tensors"),
    ],
)
def test_header_inconsistent_with_the_data_is_rejected(tmp_path: Path, header: dict, data: bytes, reason: str) -> None:
    path = _raw_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(WeightsFormatError):
        read_header(path)
    exc = _reject(path, tmp_path)
    assert reason in exc.details
    if header and "__metadata__" not in header:
        assert "'w'" in exc.details  # names the tensor


@pytest.mark.parametrize(
    "raw", [b"not json at all", b"\xff\xfe\x00garbage", b'{"w": ', b"[1, 2, 3]", b'"just a string"', b"null", b""]
)
def test_header_that_is_not_a_json_object_is_rejected(tmp_path: Path, raw: bytes) -> None:
    path = _raw_safetensors(tmp_path / "nonjson.safetensors", raw, F32x4)
    exc = _reject(path, tmp_path)
    assert "JSON" in exc.details


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_are_rejected(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    path = tmp_path / "random.bin"
    path.write_bytes(rng.randbytes(rng.randrange(1, 4096)))
    _reject(path, tmp_path)
    # The same, disguised as a zip (the torch.save branch).
    path.write_bytes(b"PK\x03\x04" + rng.randbytes(2048))
    exc = _reject(path, tmp_path)
    assert "state_dict" in exc.details


def test_empty_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(WeightsFormatError, match="too short"):
        normalize_upload(path, tmp_path / "out.safetensors")
    exc = _reject(path, tmp_path)
    assert "too short" in exc.details


@pytest.mark.parametrize(
    "obj",
    [
        [torch.zeros(2)],
        {},
        {"w": [1.0, 2.0]},
        {1: torch.zeros(2)},
        {"w": torch.zeros(2, dtype=torch.complex64)},
        torch.zeros(4),
    ],
    ids=["list", "empty-dict", "not-a-tensor", "int-key", "complex", "bare-tensor"],
)
def test_torch_save_of_something_else_than_a_flat_state_dict_is_rejected(tmp_path: Path, obj) -> None:
    path = tmp_path / "odd.pt"
    torch.save(obj, path)
    with pytest.raises(WeightsFormatError):
        normalize_upload(path, tmp_path / "direct.safetensors")
    _reject(path, tmp_path)


# These once escaped as exceptions other than WeightsFormatError / ModelValidationFailed,
# which the API would turn into a 500 INTERNAL_ERROR instead of a 400 MODEL_VALIDATION_FAILED.


def test_deeply_nested_json_header_is_rejected(tmp_path: Path) -> None:
    path = _raw_safetensors(tmp_path / "deep.safetensors", b'{"w":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    _reject(path, tmp_path)


def test_header_with_an_over_long_integer_is_rejected(tmp_path: Path) -> None:
    header = b'{"w": {"dtype": "F32", "shape": [' + b"1" * 5000 + b'], "data_offsets": [0, 16]}}'
    path = _raw_safetensors(tmp_path / "bigint.safetensors", header, F32x4)
    _reject(path, tmp_path)


# --- valid uploads --------------------------------------------------------------------------------------


def test_torch_save_state_dict_is_accepted_and_converted(tmp_path: Path) -> None:
    state = _good_state()
    state["fc.weight"] = state["fc.weight"].t().contiguous().t()  # non-contiguous in the upload
    assert not state["fc.weight"].is_contiguous()
    path = tmp_path / "upload.pt"
    torch.save(state, path)
    out = tmp_path / "normalized.safetensors"
    assert check_upload(path, out, EXPECTED) == "pytorch"
    assert structure(out) == EXPECTED
    loaded = load_file(str(out))
    assert loaded.keys() == state.keys()
    for name, t in state.items():
        assert torch.equal(loaded[name], t), name


def test_torch_save_of_a_real_model_with_mixed_dtypes_round_trips(tmp_path: Path) -> None:
    model = build_model("CNN", (8, 8, 1), 10, seed=3)
    state = dict(model.state_dict())
    state["extra.half"] = torch.randn(5).half()
    state["extra.bf16"] = torch.randn(5).bfloat16()
    state["extra.steps"] = torch.tensor(17)
    state["extra.mask"] = torch.tensor([True, False, True])
    state["extra.double"] = torch.randn(3, dtype=torch.float64)
    path = tmp_path / "model.pt"
    torch.save(state, path)
    expected = {name: (weights.dtype_name(t.dtype), tuple(t.shape)) for name, t in state.items()}
    out = tmp_path / "normalized.safetensors"
    assert check_upload(path, out, expected) == "pytorch"
    back = load_state(out)
    assert back.keys() == state.keys()
    for name, t in state.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def test_safetensors_upload_is_accepted_as_is(tmp_path: Path) -> None:
    src = _valid_file(tmp_path)
    original = src.read_bytes()
    out = tmp_path / "sub" / "normalized.safetensors"
    out.parent.mkdir()
    assert check_upload(src, out, EXPECTED) == "safetensors"
    assert out.read_bytes() == original


def test_safetensors_whose_header_length_starts_with_pk_is_accepted(tmp_path: Path) -> None:
    state = _good_state()
    # Named like the API's spooled uploads (no suffix): torch.load hands "*.safetensors" paths to safetensors,
    # which would hide the bug.
    path = tmp_path / "upload-pk"
    for pad in range(19_000, 19_400):  # metadata padding that makes the header exactly 0x4B50 bytes long
        save_file(state, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[:4] == b"PK\0\0":
            break
    assert path.read_bytes()[:2] == b"PK" and structure(path) == EXPECTED  # a valid safetensors file
    assert check_upload(path, tmp_path / "out.safetensors", EXPECTED) == "safetensors"


def test_torch_save_with_tied_weights_is_accepted_or_rejected_cleanly(tmp_path: Path) -> None:
    tied = torch.randn(4, 3)
    path = tmp_path / "tied.pt"
    torch.save({"fc.weight": tied, "fc.bias": torch.zeros(4), "head.weight": tied}, path)
    expected = {**EXPECTED, "head.weight": ("F32", (4, 3))}
    try:
        check_upload(path, tmp_path / "out.safetensors", expected)
    except ModelValidationFailed:
        pass  # a clean rejection is acceptable too


# --- structure and values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "names", "words"),
    [
        ({"fc.weight": torch.zeros(4, 3), "fc.b": torch.zeros(4)}, ["fc.bias", "fc.b"], ["missing", "not in"]),
        ({"fc.weight": torch.zeros(4, 3)}, ["fc.bias"], ["missing"]),
        ({**_good_state(), "fc.extra": torch.zeros(1)}, ["fc.extra"], ["not in the global model"]),
        ({"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(4)}, ["fc.weight"], ["shape [3, 4], expected [4, 3]"]),
        ({"fc.weight": torch.zeros(12), "fc.bias": torch.zeros(4)}, ["fc.weight"], ["shape [12]"]),
        (
            {"fc.weight": torch.zeros(4, 3), "fc.bias": torch.zeros(4, dtype=torch.float16)},
            ["fc.bias"],
            ["dtype F16, expected F32"],
        ),
        ({"fc.weight": torch.zeros(4, 3, dtype=torch.int32), "fc.bias": torch.zeros(4)}, ["fc.weight"], ["dtype I32"]),
        (
            {"fc.weight": torch.zeros(4, 3, dtype=torch.float64), "fc.bias": torch.zeros(4)},
            ["fc.weight"],
            ["dtype F64"],
        ),
    ],
    ids=["renamed", "missing", "extra", "transposed", "flattened", "half", "int", "double"],
)
@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_structure_mismatch_names_the_tensor(
    tmp_path: Path, state: dict, names: list[str], words: list[str], fmt: str
) -> None:
    path = tmp_path / "upload.bin"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    exc = _reject(path, tmp_path)
    for name in names:
        assert repr(name) in exc.details, exc.details
    for word in words:
        assert word in exc.details, exc.details


def test_compare_structure() -> None:
    assert compare_structure(EXPECTED, EXPECTED) == []
    actual = {"fc.weight": ("F16", (4, 2)), "other": ("F32", (1,))}
    assert compare_structure(actual, EXPECTED) == [
        "tensor 'fc.bias' is missing",
        "tensor 'other' is not in the global model",
        "tensor 'fc.weight' has shape [4, 2], expected [4, 3]",
        "tensor 'fc.weight' has dtype F16, expected F32",
    ]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_nonfinite_values_are_rejected(tmp_path: Path, bad: float, dtype: torch.dtype) -> None:
    state = {"fc.weight": torch.zeros(4, 3, dtype=dtype), "fc.bias": torch.zeros(4, dtype=dtype)}
    state["fc.weight"][2, 1] = bad
    expected = {name: (weights.dtype_name(dtype), tuple(t.shape)) for name, t in state.items()}
    path = tmp_path / "upload.safetensors"
    save_file(state, str(path))
    exc = _reject(path, tmp_path, expected)
    assert "NaN or infinite" in exc.details and "fc.weight" in exc.details and "fc.bias" not in exc.details
    assert nonfinite_tensors(tmp_path / "normalized.safetensors") == ["fc.weight"]


def test_large_finite_values_and_integers_are_not_flagged(tmp_path: Path) -> None:
    path = tmp_path / "ok.safetensors"
    save_file(
        {
            "big": torch.tensor([3.0e38, -3.0e38]),
            "half": torch.tensor([65504.0], dtype=torch.float16),
            "ints": torch.tensor([2**62, -(2**62)]),
        },
        str(path),
    )
    assert nonfinite_tensors(path) == []


# --- metrics --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "",
        "not json",
        "{'data_samples': 5}",
        "[1, 2]",
        '"data_samples"',
        "42",
        "null",
        "{}",
        '{"data_samples": 0}',
        '{"data_samples": -3}',
        '{"data_samples": true}',
        '{"data_samples": false}',
        '{"data_samples": "10"}',
        '{"data_samples": 10.5}',
        '{"data_samples": null}',
        '{"data_samples": 10, "local_accuracy": "high"}',
        '{"data_samples": 10, "local_loss": true}',
        '{"data_samples": 2147483648}',
        '{"data_samples": 10, "local_loss": NaN}',
        '{"data_samples": 10, "note": Infinity}',
    ],
)
def test_invalid_metrics_are_rejected(raw: str | None) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_metrics(raw)
    assert info.value.status == 400 and info.value.code == "INVALID_REQUEST"
    assert info.value.details


def test_valid_metrics_pass() -> None:
    raw = '{"data_samples": 128, "local_accuracy": 0.91, "local_loss": 0.3, "training_time": 12, "note": "x"}'
    assert parse_metrics(raw) == {
        "data_samples": 128,
        "local_accuracy": 0.91,
        "local_loss": 0.3,
        "training_time": 12,
        "note": "x",
    }
    assert parse_metrics('{"data_samples": 1, "local_loss": null}')["data_samples"] == 1


# --- round trips ----------------------------------------------------------------------------------------


def _mixed_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    return {
        "f32": torch.randn(7, 5, generator=gen),
        "f32.transposed": torch.randn(5, 7, generator=gen).t(),
        "f64": torch.randn(3, generator=gen, dtype=torch.float64),
        "f16": torch.randn(9, generator=gen).half(),
        "bf16": torch.randn(2, 3, 4, generator=gen).bfloat16(),
        "i64": torch.randint(-(2**40), 2**40, (6,), generator=gen),
        "i32": torch.randint(-1000, 1000, (3, 3), generator=gen, dtype=torch.int32),
        "i16": torch.tensor([-7, 7], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255, 3], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def test_save_state_load_state_round_trip(tmp_path: Path) -> None:
    state = _mixed_state()
    path = tmp_path / "state.safetensors"
    save_state(state, path)
    back = load_state(path)
    assert back.keys() == state.keys()
    for name, t in state.items():
        assert back[name].dtype == t.dtype, name
        assert back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name
    assert structure(path) == {name: (weights.dtype_name(t.dtype), tuple(t.shape)) for name, t in state.items()}
    assert load_file(str(path)).keys() == state.keys()  # a standard safetensors file
    # load_state copies: the result outlives the file.
    path.unlink()
    assert torch.equal(back["f32"], state["f32"])


def test_mapped_tensors_round_trip_and_private_mapping(tmp_path: Path) -> None:
    state = _mixed_state()
    path = tmp_path / "state.safetensors"
    save_state(state, path)
    before = path.read_bytes()
    with mapped_tensors(path) as tensors:
        assert tensors.keys() == state.keys()
        for name, t in state.items():
            assert tensors[name].dtype == t.dtype and torch.equal(tensors[name], t), name
        tensors["f32"].add_(1.0)  # writes go to a private copy, never to the file
    assert path.read_bytes() == before
    assert torch.equal(load_state(path)["f32"], state["f32"])


_KEEP_VIEW_SCRIPT = """
import sys, torch
from fedloom_core.learning.weights import mapped_tensors
with mapped_tensors(sys.argv[1]) as tensors:
    kept = tensors["w"]
print(float(kept.sum()))
"""


def test_view_kept_past_mapped_tensors_block_stays_valid(tmp_path: Path) -> None:
    # In a subprocess: the failure mode is a segmentation fault, which would kill the test run.
    path = tmp_path / "w.safetensors"
    save_state({"w": torch.ones(1 << 20)}, path)
    proc = subprocess.run(
        [sys.executable, "-c", _KEEP_VIEW_SCRIPT, str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"exit status {proc.returncode}: {proc.stderr[-500:]}"
    assert float(proc.stdout.split()[-1]) == float(1 << 20)


def test_mapped_tensors_reads_a_file_written_by_torch_upload(tmp_path: Path) -> None:
    state = _good_state()
    src = tmp_path / "upload.pt"
    torch.save(state, src)
    out = tmp_path / "converted.safetensors"
    assert normalize_upload(src, out) == "pytorch"
    with mapped_tensors(out) as tensors:
        assert all(torch.equal(tensors[k], v) for k, v in state.items())


# --- bounded unpacking -------------------------------------------------------------------------------


def test_a_deflated_torch_save_entry_is_refused_before_loading(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A decompression bomb: 64 MB of zeros deflated to a few kB. torch.load must never see it."""
    import zipfile

    plain = tmp_path / "plain.pt"
    torch.save({"fc.weight": torch.zeros(16 << 20)}, plain)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 1_000_000
    loaded: list[str] = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loaded.append("called"))
    with pytest.raises(weights.WeightsFormatError, match="compressed"):
        weights.normalize_upload(bomb, tmp_path / "out.safetensors")
    assert loaded == []


def test_safetensors_tensors_must_tile_the_data_without_overlap(tmp_path: Path) -> None:
    """Many tensors declared over the same bytes (a CPU bomb for every scan) and trailing bytes are refused."""
    data = b"\0" * 64
    overlapping = {f"t{i}": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]} for i in range(50)}
    path = _raw_safetensors(tmp_path / "overlap.safetensors", overlapping, data)
    with pytest.raises(weights.WeightsFormatError, match="contiguous"):
        weights.read_header(path)
    trailing = _raw_safetensors(
        tmp_path / "trailing.safetensors", {"t": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, data
    )
    with pytest.raises(weights.WeightsFormatError, match="after the last tensor"):
        weights.read_header(trailing)
    exact = _raw_safetensors(
        tmp_path / "exact.safetensors",
        {
            "a": {"dtype": "F32", "shape": [8], "data_offsets": [32, 64]},
            "b": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]},
        },
        data,
    )
    assert set(weights.read_header(exact)) == {"a", "b"}
