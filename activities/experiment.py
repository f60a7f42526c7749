"""Activities of ExperimentWorkflow: all database, blob-store and model work.

Every activity is idempotent: Temporal may run one again after a crash, so each checks what
is already recorded before writing, and blobs are written under keys fixed by the round.
"""

from __future__ import annotations

import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import update as sa_update
from sqlalchemy.engine import Engine
from sqlmodel import select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.aggregation import heartbeat
from fedloom_core.learning import weights
from fedloom_core.learning.zoo import build_model, parameters_count
from fedloom_core.messages import (
    CompleteRoundInput,
    FinishInput,
    InitInput,
    ModelRef,
    OpenRoundInput,
    RoundRef,
    SelectClientsInput,
    Selection,
    UpdateRef,
)
from fedloom_core.policy.rules import Decision, evaluate
from fedloom_core.policy.selection import Candidate, select_clients
from fedloom_core.storage.blobstore import BlobStore
from fedloom_core.storage.db import (
    Client,
    ClientMetrics,
    ClientRoundScore,
    Experiment,
    ExperimentClient,
    GlobalModel,
    Round,
    RoundMetrics,
    Update,
    utcnow,
)
from fedloom_core.storage.keys import model_id_for, model_key
from fedloom_core.storage.repo import emit_event, session_scope

INSUFFICIENT_CLIENTS = "INSUFFICIENT_CLIENTS"
ROUND_DENIED = "ROUND_DENIED"
SELECTION_POLL_S = 0.5


def _client_config(inp: OpenRoundInput) -> dict[str, dict]:
    """Per-client training parameters for the round: the strategy's, then configure rules' on top."""
    from fedloom_core.learning.strategies import build_strategy

    strategy = build_strategy(inp.strategy, inp.params, weighted=True)
    config: dict[str, dict] = {cid: dict(inp.round_config) for cid in inp.selected}
    for cid, settings in strategy.configure_round(inp.round, inp.selected).items():
        config.setdefault(cid, {}).update(settings)
    for cid in inp.selected:
        configured = inp.policy_results.get(cid, {}).get("configure") or {}
        if configured:
            config.setdefault(cid, {}).update(configured)
    return {cid: v for cid, v in config.items() if v}


class ExperimentActivities:
    """The activities, bound to a database engine and a blob store."""

    def __init__(self, engine: Engine, blobs: BlobStore) -> None:
        self.engine = engine
        self.blobs = blobs

    # -- helpers ---------------------------------------------------------------------------

    def _store_model(self, experiment_id: str, round: int, state: dict, params: int) -> ModelRef:
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
        """Create the initial global model (round 0) and mark the experiment running."""
        model = build_model(inp.architecture, inp.input_shape, inp.num_classes, seed=inp.seed)
        ref = self._store_model(inp.experiment_id, 0, model.state_dict(), parameters_count(model))
        with session_scope(self.engine) as s:
            if s.get(GlobalModel, ref.model_id) is None:
                s.add(
                    GlobalModel(
                        model_id=ref.model_id,
                        experiment_id=inp.experiment_id,
                        round=0,
                        blob_key=ref.blob_key,
                        sha256=ref.sha256,
                        size_bytes=ref.size_bytes,
                        parameters_count=ref.parameters_count,
                    )
                )
            exp = s.get(Experiment, inp.experiment_id)
            if exp is not None and exp.status != "running":
                exp.status = "running"
                exp.started_at = exp.started_at or utcnow()
                s.add(exp)
        return ref

    def _candidates(self, experiment_id: str) -> list[Candidate]:
        """Every registered client, with its standing in this experiment (trust, failures) where it has one."""
        with session_scope(self.engine) as s:
            clients = s.exec(select(Client)).all()
            standing = {
                e.client_id: e
                for e in s.exec(select(ExperimentClient).where(ExperimentClient.experiment_id == experiment_id))
            }
        candidates = []
        for c in clients:
            own = standing.get(c.client_id)
            excluded = own is not None and own.status == "inactive"
            candidates.append(
                Candidate(
                    c.client_id,
                    "inactive" if excluded else c.status,
                    own.trust_score if own else c.trust_score,
                    capabilities=c.capabilities,
                    location=c.location,
                    reliability=(own.deliveries / own.selections) if own and own.selections else None,
                    recent_failures=own.failures if own else 0,
                )
            )
        return candidates

    @staticmethod
    def _round_control(rules, inp: SelectClientsInput, registered: int, eligible: int) -> Decision:  # type: ignore[no-untyped-def]
        """Whether round_control rules let the round start now, and what they configure for all its clients.

        The clock is read here, not taken from the workflow: a held round starts as soon as the rules allow.
        """
        if not rules:
            return Decision(allowed=True)
        now = datetime.now(UTC)
        context = {
            "round": inp.round,
            "hour_utc": now.hour,
            "weekday": now.weekday(),
            "registered_clients": registered,
            "eligible_clients": eligible,
        }
        return evaluate(rules, "round_control", context)

    @activity.defn(name="select_clients")
    def select_clients(self, inp: SelectClientsInput) -> Selection:
        """Sample the round's clients, waiting (with a deadline) until enough are eligible."""
        from fedloom_core.policy.rules import validate_rules

        rules = validate_rules(inp.policy.rules) if inp.policy.rules else None
        deadline = time.monotonic() + inp.timeout_s
        while True:
            candidates = self._candidates(inp.experiment_id)
            outcome = select_clients(
                candidates,
                round=inp.round,
                min_clients=inp.min_clients,
                client_fraction=inp.client_fraction,
                seed=inp.seed,
                trust_threshold=inp.trust_threshold,
                rules=rules,
                now_hour_utc=inp.hour_utc,
                weekday=inp.weekday,
            )
            held = self._round_control(rules, inp, len(candidates), outcome.eligible)
            if outcome.selected and held.allowed:
                return Selection(
                    selected=outcome.selected,
                    excluded=outcome.excluded,
                    policy_results=outcome.policy_results,
                    round_config=held.configure,
                )
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
            # Same row the upload path updates first, so the two serialise on every database.
            s.execute(
                sa_update(Round)
                .where(Round.experiment_id == inp.experiment_id, Round.round == inp.round, Round.status == "open")
                .values(status="closed", closed_at=utcnow())
            )
            rows = s.exec(
                select(Update)
                .where(
                    Update.experiment_id == inp.experiment_id,
                    Update.round == inp.round,
                    Update.validation_status != "rejected",
                )
                .order_by(Update.client_id)
            ).all()
            return [
                UpdateRef(update_id=u.update_id, client_id=u.client_id, blob_key=u.blob_key, num_samples=u.num_samples)
                for u in rows
            ]

    @activity.defn(name="complete_round")
    def complete_round(self, inp: CompleteRoundInput) -> None:
        """Persist the round's model and metrics, mark its updates accepted, and announce it."""
        ev = inp.evaluation
        with session_scope(self.engine) as s:
            done = s.exec(
                select(RoundMetrics).where(
                    RoundMetrics.experiment_id == inp.experiment_id, RoundMetrics.round == inp.round
                )
            ).first()
            if done is not None:
                return
            now = utcnow()
            s.add(
                GlobalModel(
                    model_id=inp.model.model_id,
                    experiment_id=inp.experiment_id,
                    round=inp.round,
                    blob_key=inp.model.blob_key,
                    sha256=inp.model.sha256,
                    size_bytes=inp.model.size_bytes,
                    parameters_count=inp.model.parameters_count,
                    accuracy=ev.accuracy,
                    loss=ev.loss,
                )
            )
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
                )
            )
            included = {u.update_id for u in inp.updates}
            rows = s.exec(
                select(Update).where(Update.experiment_id == inp.experiment_id, Update.round == inp.round)
            ).all()
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
            rnd = s.exec(select(Round).where(Round.experiment_id == inp.experiment_id, Round.round == inp.round)).one()
            rnd.status = "completed"
            rnd.completed_at = now
            rnd.strategy_info = inp.strategy_info
            s.add(rnd)
            self._score_clients(s, inp, rnd.selected_clients, {u.client_id for u in rows})
            progress = inp.round / inp.total_rounds
            metrics = {"accuracy": ev.accuracy, "loss": ev.loss}
            emit_event(
                s,
                type="round_completed",
                experiment_id=inp.experiment_id,
                round=inp.round,
                global_metrics=metrics,
                participating_clients=len(inp.updates),
                round_duration=inp.round_duration,
            )
            emit_event(
                s,
                type="training_progress",
                experiment_id=inp.experiment_id,
                round=inp.round,
                progress=progress,
                metrics=metrics,
            )

    @staticmethod
    def _score_clients(s, inp: CompleteRoundInput, selected: list[str], delivered: set[str]) -> None:  # type: ignore[no-untyped-def]
        """Move each selected client's trust, reliability, failures and contribution; record the history."""
        from fedloom_core.policy import trust

        accepted = {u.client_id for u in inp.updates}
        shares = trust.contribution_shares(inp.evaluation.loo_loss_deltas) if inp.evaluation.loo_loss_deltas else {}
        max_failures = inp.policy.max_client_failures
        # Two queries for all the selected clients, not two per client.
        clients = {c.client_id: c for c in s.exec(select(Client).where(Client.client_id.in_(selected))).all()}  # type: ignore[attr-defined]
        standing = {
            e.client_id: e
            for e in s.exec(
                select(ExperimentClient).where(
                    ExperimentClient.experiment_id == inp.experiment_id,
                    ExperimentClient.client_id.in_(selected),  # type: ignore[attr-defined]
                )
            ).all()
        }
        for cid in selected:
            client = clients.get(cid)
            if client is None:
                continue
            own = standing.get(cid)
            if own is None:
                own = ExperimentClient(experiment_id=inp.experiment_id, client_id=cid, trust_score=trust.TRUST_PRIOR)
            stats = inp.stats.get(cid, {})
            ok = cid in accepted
            anomaly = stats.get("anomaly", 0.0) if ok else 1.0
            own.trust_score = trust.update_trust(own.trust_score, trust.observation(cid in delivered, ok, anomaly))
            own.selections += 1
            own.deliveries += 1 if ok else 0
            own.failures += 0 if ok else 1
            own.last_round = inp.round
            if cid in shares:
                own.contribution_score = trust.update_contribution(own.contribution_score, shares[cid])
            if max_failures is not None and own.failures > max_failures:
                own.status = "inactive"
            s.add(own)
            client.trust_score = own.trust_score
            client.contribution_score = own.contribution_score
            # A client that missed the deadline is inactive until it polls again; one whose update was
            # rejected is still connected: its trust, not its status, decides whether it is selected.
            client.status = "active" if cid in delivered else "inactive"
            s.add(client)
            s.add(
                ClientRoundScore(
                    experiment_id=inp.experiment_id,
                    round=inp.round,
                    client_id=cid,
                    delivered=cid in delivered,
                    accepted=ok,
                    reason=inp.rejected.get(cid) or (None if cid in delivered else "no update before the deadline"),
                    update_norm=stats.get("update_norm"),
                    norm_ratio=stats.get("norm_ratio"),
                    cosine_similarity=stats.get("cosine_similarity"),
                    anomaly=stats.get("anomaly"),
                    trust_score=own.trust_score,
                    contribution=shares.get(cid),
                )
            )

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
            # The open round, if any, takes no more uploads.
            for rnd in s.exec(
                select(Round).where(Round.experiment_id == inp.experiment_id, Round.status.in_(["open", "closed"]))  # type: ignore[attr-defined]
            ).all():
                rnd.status = "failed" if inp.status == "failed" else "stopped"
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
            self.finish_experiment,
            self.complete_round,
        ]
