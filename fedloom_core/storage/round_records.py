"""The writes that complete a round: its model and metrics, its updates' verdicts and its clients' scores.

Each function adds rows to the caller's session, so ``complete_round`` commits them in one transaction.
"""

from __future__ import annotations

from sqlmodel import Session, select

from fedloom_core.messages import CompleteRoundInput
from fedloom_core.policy import trust
from fedloom_core.storage.db import (
    Client,
    ClientMetrics,
    ClientRoundScore,
    ExperimentClient,
    RoundMetrics,
    Update,
)
from fedloom_core.storage.model_rows import model_row
from fedloom_core.storage.repo import emit_event


def record_model(s: Session, inp: CompleteRoundInput) -> None:
    """The round's new global model and its round metrics.

    The model's row may exist already: a federated evaluation phase records it so clients can download it.
    """
    ev = inp.evaluation
    s.merge(model_row(inp.experiment_id, inp.model, ev.accuracy, ev.loss))
    s.add(
        RoundMetrics(
            experiment_id=inp.experiment_id,
            round=inp.round,
            global_accuracy=ev.accuracy,
            global_loss=ev.loss,
            participating_clients=len(inp.updates),
            round_duration=inp.round_duration,
            aggregation_time=inp.aggregation_time,
            evaluation_time=ev.evaluation_time,
            model_id=inp.model.model_id,
            federated_metrics=inp.federated_metrics,
        )
    )


def record_updates(s: Session, inp: CompleteRoundInput) -> set[str]:
    """Mark each received update accepted or rejected, announcing rejections; return who delivered."""
    included = {u.update_id for u in inp.updates}
    rows = s.exec(select(Update).where(Update.experiment_id == inp.experiment_id, Update.round == inp.round)).all()
    for upd in rows:
        if upd.client_id in inp.rejected:
            upd.validation_status, upd.reason = "rejected", inp.rejected[upd.client_id]
            s.add(upd)
            emit_event(
                s,
                type="update_rejected",
                experiment_id=inp.experiment_id,
                client_id=upd.client_id,
                round=inp.round,
                reason=upd.reason,
            )
            continue
        if upd.update_id not in included:
            continue
        upd.validation_status = "accepted"
        s.add(upd)
        m = upd.metrics
        s.add(
            ClientMetrics(
                experiment_id=inp.experiment_id,
                round=inp.round,
                client_id=upd.client_id,
                local_accuracy=m.get("local_accuracy"),
                local_loss=m.get("local_loss"),
                training_time=m.get("training_time"),
                communication_time=m.get("communication_time"),
                data_samples=upd.num_samples,
                epochs_completed=m.get("epochs_completed"),
            )
        )
    return {u.client_id for u in rows}


def record_scores(s: Session, inp: CompleteRoundInput, selected: list[str], delivered: set[str]) -> None:
    """Store each selected client's new trust, counts and contribution (``trust.score_round``) and its history."""
    # Two queries for all the selected clients, not two per client.
    clients = {c.client_id: c for c in s.exec(select(Client).where(Client.client_id.in_(selected))).all()}  # type: ignore[attr-defined]
    rows = {
        e.client_id: e
        for e in s.exec(
            select(ExperimentClient).where(
                ExperimentClient.experiment_id == inp.experiment_id,
                ExperimentClient.client_id.in_(selected),  # type: ignore[attr-defined]
            )
        ).all()
    }
    results = trust.score_round(
        selected=[cid for cid in selected if cid in clients],
        delivered=delivered,
        accepted={u.client_id for u in inp.updates},
        rejected=inp.rejected,
        stats=inp.stats,
        loo_loss_deltas=inp.evaluation.loo_loss_deltas,
        standing={cid: _standing_of(row) for cid, row in rows.items()},
        round=inp.round,
        max_failures=inp.policy.max_client_failures,
        progress=inp.evaluation.progress_shares,
    )
    for r in results:
        row = rows.get(r.client_id) or ExperimentClient(experiment_id=inp.experiment_id, client_id=r.client_id)
        for name, value in vars(r.standing).items():
            setattr(row, name, value)
        s.add(row)
        client = clients[r.client_id]
        client.trust_score = r.standing.trust_score
        client.contribution_score = r.standing.contribution_score
        client.status = r.client_status
        s.add(client)
        s.add(
            ClientRoundScore(
                experiment_id=inp.experiment_id,
                round=inp.round,
                client_id=r.client_id,
                delivered=r.delivered,
                accepted=r.accepted,
                reason=r.reason,
                update_norm=r.stats.get("update_norm"),
                norm_ratio=r.stats.get("norm_ratio"),
                cosine_similarity=r.stats.get("cosine_similarity"),
                anomaly=r.stats.get("anomaly"),
                trust_score=r.standing.trust_score,
                contribution=r.contribution,
            )
        )


def _standing_of(row: ExperimentClient) -> trust.ClientStanding:
    return trust.ClientStanding(
        trust_score=row.trust_score,
        contribution_score=row.contribution_score,
        selections=row.selections,
        deliveries=row.deliveries,
        failures=row.failures,
        last_round=row.last_round,
        status=row.status,
    )
