"""Client registration, status, and the round task a client polls for."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from api import openapi
from api.auth import add_client_key, revoke_client_keys
from api.deps import (
    MAX_QUERY_INT,
    AdminDep,
    EngineDep,
    PrincipalDep,
    RegistrarDep,
    TaskBoardDep,
    principal_cache,
    valid_id,
)
from fedloom_core.errors import ClientNotRegistered, Conflict, InvalidRequest, NotFound
from fedloom_core.ids import check_id
from fedloom_core.messages import SelectClientsInput
from fedloom_core.schemas import PolicyConfig, StartRequest
from fedloom_core.storage.candidates import select_round
from fedloom_core.storage.db import Client, ClientMetrics, Experiment, Round, Update, utcnow
from fedloom_core.storage.repo import (
    current_round,
    emit_event,
    iso,
    latest_experiment,
    running_experiment,
    session_scope,
)

router = APIRouter(tags=["clients"])
CLIENT_STATUSES = ("registered", "active", "inactive")


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    client_id: str
    client_config: dict[str, Any] = Field(default_factory=dict)
    capabilities: dict[str, Any] = Field(default_factory=dict)
    location: dict[str, Any] = Field(default_factory=dict)

    @field_validator("client_id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_id(v, "client_id")


def _register(engine, body: RegisterRequest) -> dict:  # type: ignore[no-untyped-def]
    now = utcnow()
    client = Client(
        client_id=body.client_id,
        registration_id=f"reg_{secrets.token_hex(6)}",
        client_config=body.client_config,
        capabilities=body.capabilities,
        location=body.location,
        registered_at=now,
        last_seen=now,
    )
    conflict = Conflict("Resource already exists", f"client '{body.client_id}' is already registered")
    # One transaction: the client row and its key are committed together, or neither is.
    with session_scope(engine) as s:
        if s.get(Client, body.client_id) is not None:
            raise conflict
        s.add(client)
        try:
            s.flush()  # a concurrent registration of the same id fails here
        except IntegrityError:
            raise conflict from None
        exp = running_experiment(s)
        emit_event(s, type="client_registered", client_id=body.client_id, status="registered")
        assigned = (exp.current_round + 1) if exp else 1
        key = add_client_key(s, body.client_id)
    return {
        "client_id": body.client_id,
        "registration_id": client.registration_id,
        "status": "registered",
        "assigned_round": assigned,
        "client_config": body.client_config,
        "api_key": key,
        "timestamp": iso(now),
    }


@router.post(
    "/clients/register",
    responses=openapi.ok(openapi.REGISTER_RESPONSE, 400, 409),
)
async def register_client(
    body: Annotated[RegisterRequest, Body(openapi_examples=openapi.body(openapi.REGISTER_REQUEST))],
    engine: EngineDep,
    _: RegistrarDep,
) -> dict:
    """Register a new FL client (admin key or enrollment token); the answer carries its own API key, shown once."""
    return await run_in_threadpool(_register, engine, body)


def _client_status(engine, client_id: str) -> dict:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        client = s.get(Client, client_id)
        if client is None:
            raise ClientNotRegistered("Client ID not found", f"The specified client ID '{client_id}' is not registered")
        last = s.exec(
            select(ClientMetrics).where(ClientMetrics.client_id == client_id).order_by(ClientMetrics.created_at.desc())  # type: ignore[attr-defined]
        ).first()
    return {
        "client_id": client.client_id,
        "status": client.status,
        "current_round": client.current_round,
        "last_update": iso(client.last_update),
        "performance_metrics": {
            "local_accuracy": last.local_accuracy if last else None,
            "training_time": last.training_time if last else None,
            "communication_time": last.communication_time if last else None,
            "data_size": last.data_samples if last else 0,
        },
        "trust_score": client.trust_score,
        "contribution_score": client.contribution_score,
    }


def _experiment_or_latest(session, experiment_id: str | None) -> Experiment | None:  # type: ignore[no-untyped-def]
    if experiment_id is None:
        return latest_experiment(session)
    exp = session.get(Experiment, experiment_id)
    if exp is None:
        raise NotFound("Resource not found", f"experiment '{experiment_id}' does not exist")
    return exp


def _list_clients(engine, status: str | None, round: int | None, experiment_id: str | None) -> dict:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        query = select(Client)
        if status is not None:
            query = query.where(Client.status == status)
        if round is not None or experiment_id is not None:
            exp = _experiment_or_latest(s, experiment_id)
            took_part: set[str] = set()
            if exp is not None:
                uq = select(Update.client_id).where(
                    Update.experiment_id == exp.experiment_id, Update.validation_status != "rejected"
                )
                if round is not None:
                    uq = uq.where(Update.round == round)
                took_part = set(s.exec(uq).all())
            query = query.where(Client.client_id.in_(took_part))  # type: ignore[attr-defined]
        clients = s.exec(query.order_by(Client.client_id)).all()
    return {
        "clients": [
            {
                "client_id": c.client_id,
                "status": c.status,
                "current_round": c.current_round,
                "trust_score": c.trust_score,
            }
            for c in clients
        ],
        "total_count": len(clients),
        "active_count": sum(1 for c in clients if c.status == "active"),
        "timestamp": iso(utcnow()),
    }


@router.get("/clients", responses=openapi.ok(openapi.CLIENTS_LIST, 400))
async def list_clients(
    engine: EngineDep,
    _: AdminDep,
    status: str | None = Query(default=None),
    round: int | None = Query(default=None, ge=1, le=MAX_QUERY_INT),
    experiment_id: str | None = Query(default=None),
) -> dict:
    """All clients, filtered by ``status`` and by taking part in a ``round`` of an experiment (default: the latest).

    Taking part means having uploaded an update to that round that was not rejected; ``experiment_id``
    without ``round`` keeps the clients that took part in any of its rounds. ``total_count`` and
    ``active_count`` count the clients matching the filters.
    """
    if status is not None and status not in CLIENT_STATUSES:
        raise InvalidRequest("Invalid status filter", f"status {status!r} is not one of {', '.join(CLIENT_STATUSES)}")
    if experiment_id is not None:
        valid_id(experiment_id, "experiment_id")
    return await run_in_threadpool(_list_clients, engine, status, round, experiment_id)


def _default_round(exp: Experiment, latest: Round | None) -> int:
    """The round in progress, else the next one to select (the last one once the experiment is over)."""
    if latest is None:
        return 1
    if latest.status in ("open", "closed"):
        return latest.round
    if exp.status in ("created", "running") and (not exp.total_rounds or latest.round < exp.total_rounds):
        return latest.round + 1
    return latest.round


def _selection(engine, experiment_id: str | None, round: int | None, policy_check: bool) -> dict:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        exp = _experiment_or_latest(s, experiment_id)
        if exp is None:
            raise NotFound("Resource not found", "no experiment has been created or started")
        if round is None:
            round = _default_round(exp, current_round(s, exp.experiment_id))
        elif exp.total_rounds and round > exp.total_rounds:
            raise InvalidRequest(
                "Invalid round", f"round {round} is beyond experiment '{exp.experiment_id}''s {exp.total_rounds} rounds"
            )
        stored = s.exec(select(Round).where(Round.experiment_id == exp.experiment_id, Round.round == round)).first()
    if stored is not None:
        selected, excluded = list(stored.selected_clients), dict(stored.exclusions)
        results = dict(stored.policy_results)
    else:
        # The workflow's own selection pass, with the experiment's config, policy and trust, at this hour.
        now = datetime.now(UTC)
        config = StartRequest.model_validate(exp.config or {})
        policy = PolicyConfig.model_validate(exp.policy_config or {})
        inp = SelectClientsInput.for_round(
            exp.experiment_id, config, policy, round=round, hour_utc=now.hour, weekday=now.weekday()
        )
        _, outcome = select_round(engine, inp)
        selected, excluded, results = outcome.selected, outcome.excluded, outcome.policy_results
    return {
        "experiment_id": exp.experiment_id,
        "round": round,
        "dry_run": stored is None,
        "selected_clients": selected,
        "policy_results": results if policy_check else {},
        "excluded_clients": sorted(excluded),
        "exclusion_reasons": excluded,
        "eligible_count": sum(1 for r in results.values() if r.get("compliance")),
    }


@router.get("/clients/select", responses=openapi.ok(openapi.SELECTION, 400, 404))
async def select_round_clients(
    engine: EngineDep,
    _: AdminDep,
    round: int | None = Query(default=None, ge=1, le=MAX_QUERY_INT),
    policy_check: bool = Query(default=True),
    experiment_id: str | None = Query(default=None),
) -> dict:
    """Policy-aware client selection of a round of an experiment (default: the latest).

    A round that has been selected answers with its stored decision (``dry_run`` false); any other
    round (by default the round in progress, else the next one) is a dry run of the workflow's own
    selection pass over the clients as they are now: the experiment's min_clients, client_fraction,
    seed, trust threshold, client_selection rules (at the current hour) and per-experiment trust.
    ``policy_check=false`` leaves out ``policy_results``; the selection is the same.
    """
    if experiment_id is not None:
        valid_id(experiment_id, "experiment_id")
    return await run_in_threadpool(_selection, engine, experiment_id, round, policy_check)


@router.get("/clients/{client_id}", responses=openapi.ok(openapi.CLIENT_STATUS, 400, 404))
async def get_client(client_id: str, engine: EngineDep, principal: PrincipalDep) -> dict:
    """A client's status, last performance, trust and contribution."""
    valid_id(client_id, "client_id")
    principal.require_client(client_id)
    return await run_in_threadpool(_client_status, engine, client_id)


@router.get("/clients/{client_id}/task", responses=openapi.errors(400, 404))
async def get_client_task(
    client_id: str,
    board: TaskBoardDep,
    principal: PrincipalDep,
    wait: float = Query(default=0.0, ge=0.0, le=30.0, description="long-poll: seconds to wait for work"),
) -> dict:
    """Extension: what this client should do now (``train`` with the round's model and config, ``wait``, ``done``).

    With ``wait`` > 0 the answer is held until there is something to do or the time is up, so a
    client needs few requests (and little of its rate budget) while it waits to be selected.
    """
    valid_id(client_id, "client_id")
    principal.require_client(client_id)
    return await board.next_task(client_id, wait, vouched=principal.client_id == client_id)


def _revoke_keys(engine, client_id: str, rotate: bool) -> tuple[int, str | None]:  # type: ignore[no-untyped-def]
    """Revoke every key of ``client_id`` and, to rotate, add a new one in the same transaction."""
    with session_scope(engine) as s:
        if s.get(Client, client_id) is None:
            raise ClientNotRegistered("Client ID not found", f"The specified client ID '{client_id}' is not registered")
        revoked = revoke_client_keys(s, client_id)
        key = add_client_key(s, client_id) if rotate else None
        emit_event(s, type="client_key_rotated" if rotate else "client_keys_revoked", client_id=client_id)
    return revoked, key


@router.post("/clients/{client_id}/revoke", responses=openapi.ok(openapi.REVOKE_RESPONSE, 400, 404))
async def revoke_client(client_id: str, request: Request, engine: EngineDep, _: AdminDep) -> dict:
    """Revoke every API key of a client (admin): it can call nothing until its key is rotated.

    Other API processes stop accepting the keys within ``PRINCIPAL_TTL_S`` (5 s); this one at once.
    """
    valid_id(client_id, "client_id")
    revoked, _key = await run_in_threadpool(_revoke_keys, engine, client_id, False)
    principal_cache(request.app.state).forget_client(client_id)
    return {"client_id": client_id, "revoked": True, "revoked_keys": revoked, "timestamp": iso(utcnow())}


@router.post("/clients/{client_id}/rotate-key", responses=openapi.ok(openapi.ROTATE_RESPONSE, 400, 404))
async def rotate_client_key(client_id: str, request: Request, engine: EngineDep, _: AdminDep) -> dict:
    """Revoke a client's keys and issue a new one (admin); the answer carries the new ``api_key``, shown once."""
    valid_id(client_id, "client_id")
    revoked, key = await run_in_threadpool(_revoke_keys, engine, client_id, True)
    principal_cache(request.app.state).forget_client(client_id)
    return {"client_id": client_id, "api_key": key, "revoked_keys": revoked, "timestamp": iso(utcnow())}
