"""Light activities of ExperimentWorkflow, on the experiments queue: the database steps of a round.

Every activity is idempotent: Temporal may run one again after a crash, so each checks what is
already recorded before writing, and blobs are written under keys fixed by the round. The round
logic they call (selection, client configs, trust) is in ``fedloom_core.policy``. The workflow
imports this class for its activity references, so torch loads only inside the methods that use it.
"""

from __future__ import annotations

import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import update as sa_update
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.aggregation import heartbeat
from fedloom_core.messages import (
    INSUFFICIENT_CLIENTS,
    ROUND_DENIED,
    CompleteRoundInput,
    FederatedResult,
    FinishInput,
    InitInput,
    ModelRef,
    OpenEvaluationInput,
    OpenRoundInput,
    RoundClosed,
    RoundRef,
    SelectClientsInput,
    Selection,
    UpdateRef,
)
from fedloom_core.policy.rules import validate_rules
from fedloom_core.policy.selection import client_configs, round_control
from fedloom_core.storage import evaluations, round_outcomes, round_records
from fedloom_core.storage.blobstore import BlobStore
from fedloom_core.storage.candidates import load_selection_details, select_round, store_selection
from fedloom_core.storage.db import (
    Client,
    Experiment,
    GlobalModel,
    Round,
    RoundMetrics,
    utcnow,
)
from fedloom_core.storage.keys import model_id_for, model_key
from fedloom_core.storage.model_rows import model_ref, model_row
from fedloom_core.storage.repo import emit_event, session_scope

SELECTION_POLL_S = 0.5


def _client_config(inp: OpenRoundInput) -> dict[str, dict]:
    """Per-client training parameters for the round: round_control's, the strategy's, then configure rules'."""
    from fedloom_core.learning.strategies import build_strategy

    strategy = build_strategy(inp.strategy, inp.params, weighted=True)
    return client_configs(
        inp.selected, inp.round_config, strategy.configure_round(inp.round, inp.selected), inp.policy_results
    )


def _close(s: Session, inp: RoundRef) -> None:
    """Mark the round closed; the same row the upload path updates first, so the two serialise on every database."""
    s.execute(
        sa_update(Round)
        .where(Round.experiment_id == inp.experiment_id, Round.round == inp.round, Round.status == "open")
        .values(status="closed", closed_at=utcnow())
    )


class ExperimentActivities:
    """The activities, bound to a database engine and a blob store."""

    def __init__(self, engine: Engine, blobs: BlobStore) -> None:
        self.engine = engine
        self.blobs = blobs

    # -- helpers ---------------------------------------------------------------------------

    def _store_model(self, experiment_id: str, round: int, state: dict, params: int) -> ModelRef:
        from fedloom_core.learning import weights

        with tempfile.TemporaryDirectory(prefix="fedloom-model-") as tmp:
            path = Path(tmp) / "model.safetensors"
            weights.save_state(state, path)
            info = self.blobs.put_file(model_key(experiment_id, round), path)
        return ModelRef(
            model_id=model_id_for(experiment_id, round),
            blob_key=info.key,
            sha256=info.sha256,
            round=round,
            size_bytes=info.size,
            parameters_count=params,
        )

    # -- activities ------------------------------------------------------------------------

    @activity.defn(name="init_experiment")
    def init_experiment(self, inp: InitInput) -> ModelRef:
        """The initial global model (round 0): the one given or adopted at start, else a new built-in model."""
        from fedloom_core.learning.catalog import builtin_architecture
        from fedloom_core.learning.zoo import build_model, parameters_count

        with session_scope(self.engine) as s:
            given = s.get(GlobalModel, model_id_for(inp.experiment_id, 0))
        if given is not None:
            return model_ref(given)
        if builtin_architecture(inp.architecture) is None:
            raise ApplicationError(
                f"model_architecture {inp.architecture!r} is not built in and no initial weights were given",
                type="INITIAL_MODEL_MISSING",
                non_retryable=True,
            )
        model = build_model(inp.architecture, inp.input_shape, inp.num_classes, seed=inp.seed)
        ref = self._store_model(inp.experiment_id, 0, model.state_dict(), parameters_count(model))
        with session_scope(self.engine) as s:
            if s.get(GlobalModel, ref.model_id) is None:
                s.add(model_row(inp.experiment_id, ref))
            exp = s.get(Experiment, inp.experiment_id)
            if exp is not None and exp.status != "running":
                exp.status = "running"
                exp.started_at = exp.started_at or utcnow()
                s.add(exp)
        return ref

    @activity.defn(name="select_clients")
    def select_clients(self, inp: SelectClientsInput) -> Selection:
        """Sample the round's clients, waiting (with a deadline) until enough are eligible."""
        rules = validate_rules(inp.policy.rules) if inp.policy.rules else None
        deadline = time.monotonic() + inp.timeout_s
        while True:
            # The same pass as the API's dry run (GET /clients/select).
            candidates, outcome = select_round(self.engine, inp)
            # The clock is read here, not taken from the workflow: a held round starts as soon as the rules allow.
            now = datetime.now(UTC)
            held = round_control(
                rules,
                round=inp.round,
                hour_utc=now.hour,
                weekday=now.weekday(),
                registered=len(candidates),
                eligible=outcome.eligible,
            )
            if outcome.selected and held.allowed:
                return store_selection(self.blobs, inp.experiment_id, inp.round, outcome, held.configure)
            if not held.allowed and time.monotonic() >= deadline:
                raise ApplicationError(
                    f"round {inp.round} held by round_control rules for {inp.timeout_s:g}s: {'; '.join(held.reasons)}",
                    type=ROUND_DENIED,
                    non_retryable=True,
                )
            if time.monotonic() >= deadline:
                raise ApplicationError(
                    f"only {outcome.eligible} eligible client(s) after {inp.timeout_s:g}s; "
                    f"min_clients is {inp.min_clients}",
                    type=INSUFFICIENT_CLIENTS,
                    non_retryable=True,
                )
            heartbeat(outcome.eligible)
            time.sleep(SELECTION_POLL_S)

    @activity.defn(name="open_round")
    def open_round(self, inp: OpenRoundInput) -> None:
        """Record the round as open for uploads and announce it."""
        with session_scope(self.engine) as s:
            existing = s.exec(
                select(Round).where(Round.experiment_id == inp.experiment_id, Round.round == inp.round)
            ).first()
            if existing is not None:
                return
            if inp.details_key is not None:
                excluded, results = load_selection_details(self.blobs, inp.details_key)
                inp = inp.model_copy(update={"excluded": excluded, "policy_results": results})
            now = utcnow()
            s.add(
                Round(
                    experiment_id=inp.experiment_id,
                    round=inp.round,
                    status="open",
                    selected_clients=inp.selected,
                    exclusions=inp.excluded,
                    policy_results=inp.policy_results,
                    client_config=_client_config(inp),
                    global_model_id=inp.global_model.model_id,
                    started_at=now,
                    deadline=now + timedelta(seconds=inp.deadline_s),
                )
            )
            exp = s.get(Experiment, inp.experiment_id)
            if exp is not None:
                exp.current_round = inp.round
                s.add(exp)
            for client in s.exec(select(Client).where(Client.client_id.in_(inp.selected))).all():  # type: ignore[attr-defined]
                client.current_round = inp.round
                s.add(client)
            emit_event(
                s,
                type="round_started",
                experiment_id=inp.experiment_id,
                round=inp.round,
                selected_clients=inp.selected,
                global_model_id=inp.global_model.model_id,
            )

    @activity.defn(name="close_round")
    def close_round(self, inp: RoundRef) -> list[UpdateRef]:
        """Stop taking uploads for the round and return the updates it received, by client id."""
        with session_scope(self.engine) as s:
            _close(s, inp)
            return round_outcomes.query_received(s, inp.experiment_id, inp.round)

    @activity.defn(name="close_round_bounded")
    def close_round_bounded(self, inp: RoundRef) -> RoundClosed:
        """``close_round`` for runs with "bounded-round-v1": how many updates the round received, not which."""
        with session_scope(self.engine) as s:
            _close(s, inp)
            return RoundClosed(received=len(round_outcomes.query_received(s, inp.experiment_id, inp.round)))

    @activity.defn(name="complete_round")
    def complete_round(self, inp: CompleteRoundInput) -> None:
        """Persist the round's model and metrics, mark its updates accepted, score its clients and announce it."""
        with session_scope(self.engine) as s:
            done = s.exec(
                select(RoundMetrics).where(
                    RoundMetrics.experiment_id == inp.experiment_id, RoundMetrics.round == inp.round
                )
            ).first()
            if done is not None:
                return
            # Runs with "bounded-round-v1" carry the round's per-client outcome in a blob; older ones in the input.
            inp = round_outcomes.complete_input(self.blobs, inp)
            round_records.record_model(s, inp)
            delivered = round_records.record_updates(s, inp)
            rnd = s.exec(select(Round).where(Round.experiment_id == inp.experiment_id, Round.round == inp.round)).one()
            rnd.status = "completed"
            rnd.completed_at = utcnow()
            rnd.strategy_info = inp.strategy_info
            s.add(rnd)
            round_records.record_scores(s, inp, rnd.selected_clients, delivered)
            metrics = {"accuracy": inp.evaluation.accuracy, "loss": inp.evaluation.loss}
            emit_event(
                s,
                type="round_completed",
                experiment_id=inp.experiment_id,
                round=inp.round,
                global_metrics=metrics,
                federated_metrics=inp.federated_metrics,
                participating_clients=len(inp.updates),
                round_duration=inp.round_duration,
            )
            emit_event(
                s,
                type="training_progress",
                experiment_id=inp.experiment_id,
                round=inp.round,
                progress=inp.round / inp.total_rounds,
                metrics=metrics,
            )

    @activity.defn(name="open_evaluation")
    def open_evaluation(self, inp: OpenEvaluationInput) -> list[str]:
        """Open the round's federated evaluation phase; returns the clients asked to evaluate."""
        if inp.outcome_key is not None:
            accepted = round_outcomes.load_outcome(self.blobs, inp.outcome_key).accepted
            inp = inp.model_copy(update={"participants": [u.client_id for u in accepted]})
        return evaluations.open_phase(self.engine, inp)

    @activity.defn(name="close_evaluation")
    def close_evaluation(self, inp: RoundRef) -> FederatedResult:
        """Close the round's federated evaluation phase and average the reports by data_samples."""
        return evaluations.close_phase(self.engine, inp.experiment_id, inp.round)

    @activity.defn(name="finish_experiment")
    def finish_experiment(self, inp: FinishInput) -> None:
        """Record how the experiment ended and announce it."""
        with session_scope(self.engine) as s:
            exp = s.get(Experiment, inp.experiment_id)
            if exp is None or exp.status in ("completed", "stopped", "failed"):
                return
            exp.status = inp.status
            exp.finished_at = utcnow()
            exp.final_model_id = inp.final_model_id
            exp.stop_reason = inp.reason if inp.status == "stopped" else None
            exp.error_code = inp.error_code
            exp.error = inp.reason if inp.status == "failed" else None
            s.add(exp)
            # The open round, if any, takes no more uploads, and an open evaluation phase no more reports.
            for rnd in s.exec(
                select(Round).where(Round.experiment_id == inp.experiment_id, Round.status.in_(["open", "closed"]))  # type: ignore[attr-defined]
            ).all():
                rnd.status = "failed" if inp.status == "failed" else "stopped"
                if rnd.evaluation_status == "open":
                    rnd.evaluation_status = "closed"
                s.add(rnd)
            emit_event(
                s,
                type=f"training_{inp.status}",
                experiment_id=inp.experiment_id,
                status=inp.status,
                rounds_completed=inp.rounds_completed,
                final_model_id=inp.final_model_id,
                reason=inp.reason,
            )

    def all(self) -> list:
        """The bound activity methods, for registration on a worker."""
        return [
            self.init_experiment,
            self.select_clients,
            self.open_round,
            self.close_round,
            self.close_round_bounded,
            self.finish_experiment,
            self.complete_round,
            self.open_evaluation,
            self.close_evaluation,
        ]
