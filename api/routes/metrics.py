"""Training metrics per round and per client."""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from sqlmodel import select

from api import openapi
from api.deps import MAX_QUERY_INT, AdminDep, EngineDep, PrincipalDep, valid_id
from fedloom_core.errors import ClientNotRegistered, InvalidRequest, NotFound
from fedloom_core.storage.db import Client, ClientMetrics, Experiment, Round, RoundMetrics, Update
from fedloom_core.storage.repo import latest_experiment, session_scope

router = APIRouter(tags=["metrics"])


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _not_registered(client_id: str) -> ClientNotRegistered:
    return ClientNotRegistered("Client ID not found", f"The specified client ID '{client_id}' is not registered")


def _accuracies(rounds: list[dict]) -> list[float]:
    """The rounds' central accuracies, or their federated ones when the server evaluated none."""
    central = [r["global_accuracy"] for r in rounds if r["global_accuracy"] is not None]
    if central:
        return central
    federated = [(r["federated_metrics"] or {}).get("accuracy") for r in rounds]
    return [a for a in federated if a is not None]


def _summary(rounds: list[dict]) -> dict:
    accuracies = _accuracies(rounds)
    rate = (accuracies[-1] - accuracies[0]) / (len(accuracies) - 1) if len(accuracies) >= 2 else 0.0
    return {
        "total_rounds": len(rounds),
        "best_accuracy": max(accuracies) if accuracies else None,
        "convergence_rate": rate,
        "avg_round_duration": _mean([r["round_duration"] for r in rounds]),
    }


def _training(
    engine,  # type: ignore[no-untyped-def]
    experiment_id: str | None,
    from_round: int | None,
    to_round: int | None,
    client_id: str | None,
) -> dict:
    with session_scope(engine) as s:
        if experiment_id is not None:
            exp = s.get(Experiment, experiment_id)
            if exp is None:
                raise NotFound("Resource not found", f"experiment '{experiment_id}' does not exist")
        else:
            exp = latest_experiment(s)
            if exp is None:
                raise NotFound("Resource not found", "no experiment has been created or started")
        if client_id is not None and s.get(Client, client_id) is None:
            raise _not_registered(client_id)
        rq = select(RoundMetrics).where(RoundMetrics.experiment_id == exp.experiment_id)
        cq = select(ClientMetrics).where(ClientMetrics.experiment_id == exp.experiment_id)
        if from_round is not None:
            rq, cq = rq.where(RoundMetrics.round >= from_round), cq.where(ClientMetrics.round >= from_round)
        if to_round is not None:
            rq, cq = rq.where(RoundMetrics.round <= to_round), cq.where(ClientMetrics.round <= to_round)
        if client_id is not None:
            cq = cq.where(ClientMetrics.client_id == client_id)
        round_rows = s.exec(rq.order_by(RoundMetrics.round)).all()
        client_rows = s.exec(cq.order_by(ClientMetrics.round, ClientMetrics.client_id)).all()
    per_round: dict[int, dict[str, dict]] = {}
    for m in client_rows:
        per_round.setdefault(m.round, {})[m.client_id] = {
            "local_accuracy": m.local_accuracy,
            "local_loss": m.local_loss,
            "training_time": m.training_time,
            "data_samples": m.data_samples,
        }
    rounds = [
        {
            "round": r.round,
            "global_accuracy": r.global_accuracy,
            "global_loss": r.global_loss,
            "federated_metrics": r.federated_metrics,
            "participating_clients": r.participating_clients,
            "round_duration": r.round_duration,
            "aggregation_time": r.aggregation_time,
            "client_metrics": per_round.get(r.round, {}),
        }
        for r in round_rows
        if client_id is None or r.round in per_round
    ]
    return {"experiment_id": exp.experiment_id, "rounds": rounds, "summary": _summary(rounds)}


@router.get("/metrics/training", responses=openapi.ok(openapi.TRAINING_METRICS, 400, 404))
async def training_metrics(
    engine: EngineDep,
    _: AdminDep,
    experiment_id: str | None = Query(default=None),
    from_round: int | None = Query(default=None, ge=1, le=MAX_QUERY_INT),
    to_round: int | None = Query(default=None, ge=1, le=MAX_QUERY_INT),
    client_id: str | None = Query(default=None),
) -> dict:
    """Per-round global and client metrics of an experiment (default: the latest), with a summary.

    Only completed rounds have metrics. ``client_id`` keeps that client's metrics and the rounds it
    took part in. The summary covers the rounds returned: ``total_rounds`` is their count,
    ``best_accuracy`` their highest global accuracy (null if none), ``avg_round_duration`` their mean
    duration in seconds (null if none), and ``convergence_rate`` the mean global-accuracy gain per
    round, (accuracy of the last round - accuracy of the first) / (number of rounds - 1), 0.0 with
    fewer than 2 rounds.

    ``global_accuracy`` and ``global_loss`` are null where the server had no evaluation data;
    ``federated_metrics`` holds the clients' evaluation of the round's model (accuracy, loss,
    data_samples and any other metric, averaged weighted by data_samples), null without one. The
    summary uses the global accuracies, or the federated ones when the server evaluated no round.
    """
    if experiment_id is not None:
        valid_id(experiment_id, "experiment_id")
    if client_id is not None:
        valid_id(client_id, "client_id")
    if from_round is not None and to_round is not None and from_round > to_round:
        raise InvalidRequest("Invalid round range", f"from_round ({from_round}) is after to_round ({to_round})")
    return await run_in_threadpool(_training, engine, experiment_id, from_round, to_round, client_id)


def _reliability(session, client_id: str) -> float | None:  # type: ignore[no-untyped-def]
    selected = {
        (exp_id, rnd)
        for exp_id, rnd, chosen in session.exec(
            select(Round.experiment_id, Round.round, Round.selected_clients).where(Round.status == "completed")
        ).all()
        if client_id in chosen
    }
    if not selected:
        return None
    delivered = {
        (exp_id, rnd)
        for exp_id, rnd in session.exec(
            select(Update.experiment_id, Update.round).where(
                Update.client_id == client_id, Update.validation_status == "accepted"
            )
        ).all()
    }
    return len(selected & delivered) / len(selected)


def _client_performance(engine, client_id: str) -> dict:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        client = s.get(Client, client_id)
        if client is None:
            raise _not_registered(client_id)
        rows = s.exec(
            select(ClientMetrics)
            .where(ClientMetrics.client_id == client_id)
            .order_by(ClientMetrics.created_at, ClientMetrics.experiment_id, ClientMetrics.round)  # type: ignore[arg-type]
        ).all()
        reliability = _reliability(s, client_id)
    return {
        "client_id": client_id,
        "performance_history": [
            {
                "round": m.round,
                "experiment_id": m.experiment_id,
                "local_accuracy": m.local_accuracy,
                "local_loss": m.local_loss,
                "training_time": m.training_time,
                "communication_time": m.communication_time,
                "data_samples": m.data_samples,
            }
            for m in rows
        ],
        "statistics": {
            "avg_accuracy": _mean([m.local_accuracy for m in rows]),
            "avg_training_time": _mean([m.training_time for m in rows]),
            "total_rounds_participated": len(rows),
            "reliability_score": reliability,
            "contribution_score": client.contribution_score,
        },
    }


@router.get("/metrics/clients/{client_id}", responses=openapi.ok(openapi.CLIENT_PERFORMANCE, 400, 404))
async def client_metrics(client_id: str, engine: EngineDep, principal: PrincipalDep) -> dict:
    """A client's per-round history over all experiments, with statistics (the admin, or the client itself).

    ``total_rounds_participated`` counts rounds whose aggregate included the client's update.
    ``reliability_score`` is, over completed rounds only, (rounds where the client was selected and
    delivered an accepted update) / (rounds where it was selected); null when it was never selected
    in a completed round. ``avg_accuracy`` and ``avg_training_time`` are null without history.
    """
    valid_id(client_id, "client_id")
    principal.require_client(client_id)
    return await run_in_threadpool(_client_performance, engine, client_id)
