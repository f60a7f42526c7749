"""A round's per-client outcome, kept out of the workflow's history (runs with "bounded-round-v1").

``process_round`` reads the round's received updates from the database (:func:`received_updates`,
the same query ``close_round`` answers with) and stores what it decided about each client (accepted
updates with their capped weights, rejections, statistics, contribution scores and the strategy's
info) as one JSON blob under ``outcomes/<experiment>/round-<n>-<sha256>.json``. The workflow carries
only that key and counts; ``complete_round`` and ``open_evaluation`` read the blob back. The key names
the content, so a retried activity never overwrites a blob that a recorded result points to.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from fedloom_core.messages import CompleteRoundInput, Evaluation, UpdateRef, ValidationOutcome
from fedloom_core.storage.blobstore import BlobStore
from fedloom_core.storage.db import Update
from fedloom_core.storage.repo import session_scope


class RoundOutcome(BaseModel):
    """Everything per client that a round's validation, aggregation and evaluation produced."""

    accepted: list[UpdateRef] = Field(default_factory=list)
    rejected: dict[str, str] = Field(default_factory=dict)
    stats: dict[str, dict[str, float]] = Field(default_factory=dict)
    loo_loss_deltas: dict[str, float] = Field(default_factory=dict)
    progress_shares: dict[str, float] = Field(default_factory=dict)
    strategy_info: dict[str, Any] = Field(default_factory=dict)


def query_received(s: Session, experiment_id: str, round: int) -> list[UpdateRef]:
    """The round's updates not rejected on upload, by client id."""
    rows = s.exec(
        select(Update)
        .where(Update.experiment_id == experiment_id, Update.round == round, Update.validation_status != "rejected")
        .order_by(Update.client_id)  # type: ignore[arg-type]
    ).all()
    return [
        UpdateRef(update_id=u.update_id, client_id=u.client_id, blob_key=u.blob_key, num_samples=u.num_samples)
        for u in rows
    ]


def received_updates(engine: Engine, experiment_id: str, round: int) -> list[UpdateRef]:
    """The closed round's received updates: fixed once ``close_round`` ran, so a retry reads the same list.

    Verdicts are written only by ``complete_round``, after the last read of this list.
    """
    with session_scope(engine) as s:
        return query_received(s, experiment_id, round)


def outcome_key(experiment_id: str, round: int, digest: str) -> str:
    """Blob key of a round's outcome; the digest keeps a retry from overwriting one already recorded."""
    return f"outcomes/{experiment_id}/round-{round}-{digest[:32]}.json"


def store_outcome(blobs: BlobStore, experiment_id: str, round: int, outcome: RoundOutcome) -> str:
    """Store the outcome (once per content) and return its key."""
    body = json.dumps(outcome.model_dump(mode="json"), sort_keys=True).encode()
    key = outcome_key(experiment_id, round, hashlib.sha256(body).hexdigest())
    if not blobs.exists(key):
        blobs.put_stream(key, io.BytesIO(body))
    return key


def load_outcome(blobs: BlobStore, key: str) -> RoundOutcome:
    """The outcome :func:`store_outcome` stored under ``key``."""
    with blobs.open_local(key) as path:
        return RoundOutcome.model_validate_json(path.read_bytes())


def outcome_of(checked: ValidationOutcome, evaluation: Evaluation | None, info: dict[str, Any]) -> RoundOutcome:
    """The per-client parts of a round's validation, evaluation and aggregation."""
    return RoundOutcome(
        accepted=checked.accepted,
        rejected=checked.rejected,
        stats=checked.stats,
        loo_loss_deltas=evaluation.loo_loss_deltas if evaluation else {},
        progress_shares=evaluation.progress_shares if evaluation else {},
        strategy_info=info,
    )


def complete_input(blobs: BlobStore, inp: CompleteRoundInput) -> CompleteRoundInput:
    """``complete_round``'s input as the workflow carried it before "bounded-round-v1": the outcome filled in."""
    if inp.outcome_key is None:
        return inp
    out = load_outcome(blobs, inp.outcome_key)
    evaluation = inp.evaluation.model_copy(
        update={"loo_loss_deltas": out.loo_loss_deltas, "progress_shares": out.progress_shares}
    )
    return inp.model_copy(
        update={
            "updates": out.accepted,
            "rejected": out.rejected,
            "stats": out.stats,
            "strategy_info": out.strategy_info,
            "evaluation": evaluation,
        }
    )
