"""Federated evaluation's records: a round's evaluation phase (who is asked, open or closed) and the reports.

The API records each report (``record_report``); the workflow's light activities open and close the
phase (``open_phase``, ``close_phase``). A report and the phase's close both update the round's row
first, so they serialise on every database: no report is stored after the phase has closed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete
from sqlalchemy import update as sa_update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from fedloom_core.errors import Conflict, RoundNotActive
from fedloom_core.learning.federated import average_reports, pick_evaluators
from fedloom_core.messages import FederatedResult, OpenEvaluationInput
from fedloom_core.storage.db import ClientEvaluation, Round, utcnow
from fedloom_core.storage.model_rows import model_row
from fedloom_core.storage.repo import emit_event, session_scope


def open_phase(engine: Engine, inp: OpenEvaluationInput) -> list[str]:
    """Pick the round's evaluators, make the new model downloadable and open the phase; returns the evaluators.

    Idempotent: a phase already opened returns its evaluators unchanged.
    """
    with session_scope(engine) as s:
        rnd = _round(s, inp.experiment_id, inp.round)
        if rnd.evaluation_status is not None:
            return list(rnd.evaluators or [])
        evaluators = pick_evaluators(inp.participants, inp.fraction, seed=inp.seed, round=inp.round)
        # Reports from an earlier run of this round number (an interrupted round, continued) do not count.
        s.execute(
            delete(ClientEvaluation).where(
                ClientEvaluation.experiment_id == inp.experiment_id,  # type: ignore[arg-type]
                ClientEvaluation.round == inp.round,  # type: ignore[arg-type]
            )
        )
        # The evaluators download the model by id before the round completes (complete_round merges the same row).
        s.merge(model_row(inp.experiment_id, inp.model, inp.accuracy, inp.loss))
        rnd.evaluators, rnd.evaluation_status = evaluators, "open"
        rnd.evaluation_deadline = utcnow() + timedelta(seconds=inp.timeout_s)
        s.add(rnd)
        emit_event(
            s,
            type="evaluation_started",
            experiment_id=inp.experiment_id,
            round=inp.round,
            model_id=inp.model.model_id,
            evaluators=evaluators,
        )
    return evaluators


def close_phase(engine: Engine, experiment_id: str, round: int) -> FederatedResult:
    """Close the round's evaluation phase and average its evaluators' reports by data_samples."""
    with session_scope(engine) as s:
        s.execute(
            sa_update(Round)
            .where(Round.experiment_id == experiment_id, Round.round == round, Round.evaluation_status == "open")
            .values(evaluation_status="closed")
        )
        evaluators = set(_round(s, experiment_id, round).evaluators or [])
        rows = _reports(s, experiment_id, round)
    reports = [r.metrics for r in rows if r.client_id in evaluators]
    return FederatedResult(metrics=average_reports(reports), reports=len(reports))


@dataclass(frozen=True)
class RecordedReport:
    """A stored report, whether this call stored it, and every evaluator once all have reported (else None)."""

    report: ClientEvaluation
    created: bool
    completed: list[str] | None


def record_report(
    engine: Engine, *, client_id: str, experiment_id: str, round: int, metrics: dict[str, Any]
) -> RecordedReport:
    """Store ``client_id``'s evaluation of the round's model; a repeat returns the first report unchanged.

    Raises RoundNotActive when the round has no open evaluation phase, Conflict when the client was not
    asked to evaluate it.
    """
    try:
        return _record(engine, client_id, experiment_id, round, metrics)
    except IntegrityError:
        # The same client's report arrived twice at once and the other attempt stored it first.
        return _record(engine, client_id, experiment_id, round, metrics)


def _record(engine: Engine, client_id: str, experiment_id: str, round: int, metrics: dict[str, Any]) -> RecordedReport:
    with session_scope(engine) as s:
        existing = _report(s, experiment_id, round, client_id)
        if existing is not None:
            return RecordedReport(existing, False, _all_reported(s, experiment_id, round))
        # The same row the phase's close updates: a report either lands before the close or is refused.
        opened = s.execute(
            sa_update(Round)
            .where(Round.experiment_id == experiment_id, Round.round == round, Round.evaluation_status == "open")
            .values(evaluation_status="open")
        )
        if opened.rowcount == 0:  # type: ignore[attr-defined]
            raise RoundNotActive(
                "Evaluation phase not open", f"round {round} of experiment '{experiment_id}' takes no evaluations now"
            )
        evaluators = _round(s, experiment_id, round).evaluators or []
        if client_id not in evaluators:
            raise Conflict("Client not asked to evaluate", f"client '{client_id}' is not an evaluator of round {round}")
        row = ClientEvaluation(
            experiment_id=experiment_id,
            round=round,
            client_id=client_id,
            data_samples=int(metrics["data_samples"]),
            loss=metrics.get("loss"),
            accuracy=metrics.get("accuracy"),
            metrics=metrics,
        )
        s.add(row)
        s.flush()
        completed = _all_reported(s, experiment_id, round)
    return RecordedReport(row, True, completed)


def _all_reported(s: Session, experiment_id: str, round: int) -> list[str] | None:
    """Every evaluator of the round, once each has a report stored and the phase is still open; else None."""
    rnd = _round(s, experiment_id, round)
    if rnd.evaluation_status != "open" or not rnd.evaluators:
        return None
    reported = {r.client_id for r in _reports(s, experiment_id, round)}
    return sorted(rnd.evaluators) if reported >= set(rnd.evaluators) else None


def _round(s: Session, experiment_id: str, round: int) -> Round:
    rnd = s.exec(select(Round).where(Round.experiment_id == experiment_id, Round.round == round)).first()
    if rnd is None:
        raise RoundNotActive("Round not found", f"experiment '{experiment_id}' has no round {round}")
    return rnd


def _report(s: Session, experiment_id: str, round: int, client_id: str) -> ClientEvaluation | None:
    row = s.exec(
        select(ClientEvaluation).where(
            ClientEvaluation.experiment_id == experiment_id,
            ClientEvaluation.round == round,
            ClientEvaluation.client_id == client_id,
        )
    ).first()
    return row


def _reports(s: Session, experiment_id: str, round: int) -> list[ClientEvaluation]:
    return list(
        s.exec(
            select(ClientEvaluation)
            .where(ClientEvaluation.experiment_id == experiment_id, ClientEvaluation.round == round)
            .order_by(ClientEvaluation.client_id)  # type: ignore[arg-type]
        ).all()
    )
