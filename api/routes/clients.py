"""Client registration, status, and the round task a client polls for."""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from api.auth import store_client_key
from api.deps import AdminDep, EngineDep, PrincipalDep, valid_id
from fedloom_core.contracts import check_id
from fedloom_core.db import Client, ClientMetrics, Update, utcnow
from fedloom_core.errors import ClientNotRegistered, Conflict
from fedloom_core.repo import (
    emit_event,
    iso,
    latest_experiment,
    open_round,
    running_experiment,
    session_scope,
)

router = APIRouter(tags=["clients"])


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
    try:
        with session_scope(engine) as s:
            if s.get(Client, body.client_id) is not None:
                raise Conflict("Resource already exists", f"client '{body.client_id}' is already registered")
            s.add(client)
            exp = running_experiment(s)
            emit_event(s, type="client_registered", client_id=body.client_id, status="registered")
            assigned = (exp.current_round + 1) if exp else 1
    except IntegrityError:
        raise Conflict("Resource already exists", f"client '{body.client_id}' is already registered") from None
    key = store_client_key(engine, body.client_id)
    return {
        "client_id": body.client_id,
        "registration_id": client.registration_id,
        "status": "registered",
        "assigned_round": assigned,
        "client_config": body.client_config,
        "api_key": key,
        "timestamp": iso(now),
    }


@router.post("/clients/register")
async def register_client(body: RegisterRequest, engine: EngineDep, _: AdminDep) -> dict:
    """Register a new FL client; the answer carries its own API key, shown once."""
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


@router.get("/clients/{client_id}")
async def get_client(client_id: str, engine: EngineDep, principal: PrincipalDep) -> dict:
    """A client's status, last performance, trust and contribution."""
    valid_id(client_id, "client_id")
    principal.require_client(client_id)
    return await run_in_threadpool(_client_status, engine, client_id)


def _task(engine, client_id: str) -> dict:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        client = s.get(Client, client_id)
        if client is None:
            raise ClientNotRegistered("Client ID not found", f"The specified client ID '{client_id}' is not registered")
        client.last_seen = utcnow()
        if client.status == "inactive":
            client.status = "active"  # it is connected again, so it can rejoin a later round
        s.add(client)
        exp = running_experiment(s) or latest_experiment(s)
        if exp is None:
            return {"status": "idle", "experiment_id": None}
        body: dict[str, Any] = {"experiment_id": exp.experiment_id, "experiment_status": exp.status}
        if exp.status != "running":
            body["status"] = "done" if exp.status in ("completed", "stopped", "failed") else "idle"
            return body
        rnd = open_round(s, exp.experiment_id)
        if rnd is None or client_id not in rnd.selected_clients:
            body["status"] = "wait"
            return body
        uploaded = s.exec(
            select(Update.update_id).where(
                Update.experiment_id == exp.experiment_id, Update.round == rnd.round, Update.client_id == client_id
            )
        ).first()
        if uploaded is not None:
            body["status"] = "wait"
            return body
        cfg = exp.config
        ec = cfg.get("experiment_config", {})
        body.update(
            status="train",
            round=rnd.round,
            model_id=rnd.global_model_id,
            download_url=f"/model/download/{rnd.global_model_id}",
            deadline=iso(rnd.deadline),
            dataset=ec.get("dataset"),
            model_architecture=ec.get("model_architecture"),
            model_config=exp.model_config_,
            training_config=cfg.get("training_config", {}),
        )
        return body


@router.get("/clients/{client_id}/task")
async def get_client_task(client_id: str, engine: EngineDep, principal: PrincipalDep) -> dict:
    """Extension: what this client should do now (``train`` with the round's model and config, ``wait``, ``done``)."""
    valid_id(client_id, "client_id")
    principal.require_client(client_id)
    return await run_in_threadpool(_task, engine, client_id)
