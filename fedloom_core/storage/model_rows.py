"""A global model's database row and the reference the workflow carries, each made from the other."""

from __future__ import annotations

from fedloom_core.messages import ModelRef
from fedloom_core.storage.db import GlobalModel


def model_row(
    experiment_id: str, ref: ModelRef, accuracy: float | None = None, loss: float | None = None
) -> GlobalModel:
    """The row recording ``ref`` (with its central evaluation, when there is one)."""
    return GlobalModel(
        model_id=ref.model_id,
        experiment_id=experiment_id,
        round=ref.round,
        blob_key=ref.blob_key,
        sha256=ref.sha256,
        size_bytes=ref.size_bytes,
        parameters_count=ref.parameters_count,
        accuracy=accuracy,
        loss=loss,
    )


def model_ref(row: GlobalModel) -> ModelRef:
    """The reference to a recorded model that the workflow carries."""
    return ModelRef(
        model_id=row.model_id,
        blob_key=row.blob_key,
        sha256=row.sha256,
        round=row.round,
        size_bytes=row.size_bytes,
        parameters_count=row.parameters_count,
    )
