"""The round's validation over a real local blob store: unreadable updates become rejections, the others
are judged by the policy, and the aggregation activity carries the policy's capped weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from activities.aggregation import AggregationActivities
from fedloom_core.messages import ModelRef, UpdateRef, ValidateInput
from fedloom_core.schemas import PolicyConfig
from fedloom_core.storage.blobstore import LocalBlobStore
from fedloom_core.storage.round_validation import UNREADABLE, judge_round

pytestmark = pytest.mark.unit

GLOBAL = {"w": torch.zeros(16, 8), "b": torch.zeros(8)}


def _put(blobs: LocalBlobStore, tmp: Path, key: str, state: dict[str, torch.Tensor]) -> str:
    path = tmp / key.replace("/", "_")
    save_file(state, str(path))
    return blobs.put_file(key, path).key


@pytest.fixture
def round_blobs(tmp_path: Path) -> tuple[LocalBlobStore, str, list[UpdateRef]]:
    """A global model and five updates: three honest, one huge, one of another shape."""
    blobs = LocalBlobStore(tmp_path / "blobs")
    torch.manual_seed(0)
    step = {k: torch.randn_like(v) * 0.01 for k, v in GLOBAL.items()}
    states = {
        "a": {k: v + step[k] for k, v in GLOBAL.items()},
        "b": {k: v + 1.1 * step[k] for k, v in GLOBAL.items()},
        "c": {k: v + 0.9 * step[k] for k, v in GLOBAL.items()},
        "huge": {k: v + 100 * step[k] for k, v in GLOBAL.items()},
        "shape": {"w": torch.zeros(4, 4), "b": torch.zeros(8)},
    }
    refs = [
        UpdateRef(update_id=f"u-{cid}", client_id=cid, blob_key=_put(blobs, tmp_path, f"up/{cid}", st), num_samples=n)
        for (cid, st), n in zip(states.items(), (10, 10, 1000, 10, 10), strict=True)
    ]
    return blobs, _put(blobs, tmp_path, "global", GLOBAL), refs


def _judge(blobs: LocalBlobStore, global_key: str, refs: list[UpdateRef], **policy: object):  # type: ignore[no-untyped-def]
    return judge_round(
        None,  # type: ignore[arg-type] - no rules, so no client standing is read
        blobs,
        experiment_id="e",
        round=1,
        global_key=global_key,
        updates=refs,
        policy=PolicyConfig(**policy),
        hour_utc=0,
        weekday=0,
    )


def test_corrupt_missing_and_misshapen_blobs_are_rejected_as_unreadable(round_blobs) -> None:  # type: ignore[no-untyped-def]
    blobs, global_key, refs = round_blobs
    path = blobs.root / "up" / "a"
    path.write_bytes(b"\xff" * path.stat().st_size)  # same size, another digest
    gone = UpdateRef(update_id="u-gone", client_id="gone", blob_key="up/gone", num_samples=10)
    verdict = _judge(blobs, global_key, [*refs, gone])
    assert verdict.rejected["a"].startswith(f"{UNREADABLE}: the stored update cannot be read (sha256 mismatch")
    assert verdict.rejected["gone"].startswith(f"{UNREADABLE}: the stored update cannot be read (no blob")
    assert verdict.rejected["shape"].startswith(f"{UNREADABLE}: the stored update does not match the model")
    # The readable ones are judged among themselves: the huge one is 100x their median.
    assert "max_norm_ratio" in verdict.rejected["huge"] and verdict.accepted == ["b", "c"]


def test_the_activity_rejects_unreadable_updates_and_aggregates_with_capped_weights(round_blobs) -> None:  # type: ignore[no-untyped-def]
    blobs, global_key, refs = round_blobs
    blobs.delete("up/shape")
    outcome = AggregationActivities(None, blobs).validate_updates(  # type: ignore[arg-type]
        ValidateInput(
            experiment_id="e",
            round=1,
            global_model=ModelRef(model_id="m", blob_key=global_key, sha256="x", round=0),
            updates=refs,
        )
    )
    assert set(outcome.rejected) == {"huge", "shape"} and outcome.rejected["shape"].startswith(UNREADABLE)
    # c claims 1000 samples: the default max_weight_ratio caps it at 3x the accepted median (10).
    assert {u.client_id: u.num_samples for u in outcome.accepted} == {"a": 10, "b": 10, "c": 30}
