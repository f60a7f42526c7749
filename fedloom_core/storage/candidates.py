"""A round's selection from the database: the one path that the workflow's ``select_clients``
activity and the API's dry run (``GET /clients/select``) both take, so the two always agree.

The candidates are every registered client with its standing in the experiment (trust, status,
reliability, failures); the decision is :func:`fedloom_core.policy.selection.select_clients` with the
experiment's rules, trust threshold, fraction and seed as :class:`SelectClientsInput` carries them.
"""

from __future__ import annotations

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from fedloom_core.messages import SelectClientsInput
from fedloom_core.policy.rules import validate_rules
from fedloom_core.policy.selection import Candidate, SelectionOutcome, select_clients
from fedloom_core.schemas import PolicyConfig, StartRequest
from fedloom_core.storage.db import Client, ExperimentClient
from fedloom_core.storage.repo import session_scope


def load_candidates(session: Session, experiment_id: str) -> list[Candidate]:
    """Every registered client, with its standing in this experiment (trust, failures) where it has one."""
    clients = session.exec(select(Client)).all()
    standing = {
        e.client_id: e
        for e in session.exec(select(ExperimentClient).where(ExperimentClient.experiment_id == experiment_id))
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


def select_round(engine: Engine, inp: SelectClientsInput) -> tuple[list[Candidate], SelectionOutcome]:
    """One selection pass for ``inp``'s round over the clients as the database has them now."""
    rules = validate_rules(inp.policy.rules) if inp.policy.rules else None
    with session_scope(engine) as s:
        candidates = load_candidates(s, inp.experiment_id)
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
    return candidates, outcome


def selection_input(
    experiment_id: str,
    config: StartRequest,
    policy: PolicyConfig,
    *,
    round: int,
    hour_utc: int,
    weekday: int,
    timeout_s: float = 0.0,
) -> SelectClientsInput:
    """The selection input of ``round`` of an experiment with this start config and policy."""
    exp = config.experiment_config
    return SelectClientsInput(
        experiment_id=experiment_id,
        round=round,
        min_clients=exp.min_clients,
        client_fraction=exp.client_fraction,
        seed=exp.seed,
        timeout_s=timeout_s,
        trust_threshold=policy.trust_threshold,
        policy=policy,
        hour_utc=hour_utc,
        weekday=weekday,
    )
