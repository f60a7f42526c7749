"""Starting, stopping and following training."""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import timedelta
from typing import Annotated
from weakref import WeakKeyDictionary

from fastapi import APIRouter, Body, Query
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, field_validator
from sqlalchemy import func
from sqlmodel import select
from temporalio.client import WorkflowHandle
from temporalio.common import WorkflowIDReusePolicy
from temporalio.service import RPCError, RPCStatusCode

from api import openapi
from api.current import check_unambiguous, claim_start, running_ids
from api.deps import AdminDep, BlobsDep, EngineDep, PrincipalDep, SettingsDep, TemporalDep, valid_id
from fedloom_core.errors import (
    Conflict,
    ExperimentNotActive,
    InsufficientClients,
    InvalidRequest,
    NotFound,
)
from fedloom_core.ids import check_id
from fedloom_core.learning.catalog import KNOWN_ARCHITECTURES
from fedloom_core.learning.datasets import check_available, dataset_info
from fedloom_core.learning.strategies.specs import check_strategy
from fedloom_core.messages import WORKFLOW_TASK_QUEUE, ExperimentInput, ExperimentState
from fedloom_core.policy.selection import Candidate, select_clients
from fedloom_core.schemas import ExperimentConfig, PolicyConfig, StartRequest
from fedloom_core.storage import initial_models
from fedloom_core.storage.db import Client, Experiment, RoundMetrics, utcnow
from fedloom_core.storage.repo import (
    current_round,
    emit_event,
    iso,
    latest_experiment,
    running_experiment,
    session_scope,
)
from fedloom_core.temporal import experiment_memo, start_search_attributes
from workflows.experiment import ExperimentWorkflow, workflow_id

router = APIRouter(tags=["training"])
DEFAULT_ROUND_SECONDS = 30.0


def _avg_round_seconds(session) -> float:  # type: ignore[no-untyped-def]
    avg = session.exec(select(func.avg(RoundMetrics.round_duration))).one()
    return float(avg) if avg else DEFAULT_ROUND_SECONDS


def _humanize(seconds: float) -> str:
    minutes = seconds / 60
    return f"{minutes:.0f} minutes" if minutes >= 1 else f"{seconds:.0f} seconds"


def _merge_stored(stored: dict, req: StartRequest) -> StartRequest:
    """A start request for a created experiment: its stored config, overridden by what the request sets."""
    base = StartRequest.model_validate(stored) if stored else StartRequest()
    merged = {}
    for section in ("experiment_config", "training_config", "aggregation_config", "evaluation_config"):
        given = (
            getattr(req, section).model_dump(mode="json", exclude_unset=True) if section in req.model_fields_set else {}
        )
        merged[section] = {**getattr(base, section).model_dump(mode="json", exclude_none=True), **given}
    return StartRequest.model_validate(merged)


def _eligible(session, req: StartRequest, policy: PolicyConfig) -> int:  # type: ignore[no-untyped-def]
    ec = req.experiment_config
    candidates = [Candidate(c.client_id, c.status, c.trust_score) for c in session.exec(select(Client)).all()]
    return select_clients(
        candidates,
        round=1,
        min_clients=ec.min_clients,
        client_fraction=ec.client_fraction,
        seed=ec.seed,
        trust_threshold=policy.trust_threshold,
    ).eligible


def _check_strategy(req: StartRequest) -> None:
    """The strategy's params are valid (unknown names and out-of-range values are refused here, not mid-run).

    Checked against the strategies' specs, not by building a strategy: that would import torch into the API.
    """
    agg = req.aggregation_config
    try:
        strategy = check_strategy(agg.strategy, agg.params, agg.weighted)
    except ValueError as exc:
        raise InvalidRequest("Invalid aggregation_config", f"aggregation_config: {exc}") from None
    floor = agg.min_updates or req.experiment_config.min_clients
    needed = strategy.minimum_updates()
    if needed > floor:
        raise InvalidRequest(
            "Invalid aggregation_config",
            f"aggregation_config: {agg.strategy} needs at least {needed} updates a round, but a round may close "
            f"with {floor} (min_updates, else min_clients); raise it or lower num_byzantine",
        )


def _prepare(engine, blobs, req: StartRequest, limit: int = 1) -> tuple[Experiment, StartRequest, float]:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        claim_start(s, limit)
        exp_id = req.experiment_config.experiment_id or f"exp_{utcnow():%Y%m%d}_{secrets.token_hex(3)}"
        exp = s.get(Experiment, exp_id)
        if exp is not None and exp.status != "created":
            raise Conflict("Resource already exists", f"experiment '{exp_id}' already exists with status {exp.status}")
        if exp is not None:
            req = _merge_stored(exp.config, req)
        else:
            exp = Experiment(experiment_id=exp_id, name=exp_id)
        req.experiment_config.experiment_id = exp_id
        ec = req.experiment_config
        policy = PolicyConfig.model_validate(exp.policy_config or {})
        # The request's own problems first, then whether enough clients are there to run it.
        _check_strategy(req)
        exp.model_config_ = _model_spec(ec)
        _initial_weights(s, blobs, exp, ec)
        eligible = _eligible(s, req, policy)
        if eligible < ec.min_clients:
            raise InsufficientClients(
                "Not enough clients for training",
                f"{eligible} eligible client(s) registered, min_clients is {ec.min_clients}",
            )
        exp.status = "running"
        exp.started_at = utcnow()
        exp.dataset = ec.dataset
        exp.model_architecture = ec.model_architecture
        exp.total_rounds = ec.rounds
        exp.current_round = 0
        exp.config = req.model_dump(mode="json")
        exp.training_config = {**req.training_config.model_dump(mode="json"), "rounds": ec.rounds}
        s.add(exp)
        emit_event(s, type="training_started", experiment_id=exp_id, total_rounds=ec.rounds)
        return exp, req, _avg_round_seconds(s)


def _model_spec(ec: ExperimentConfig) -> dict:
    """The model's description: a built-in one's input shape and classes come from its dataset."""
    if not ec.builtin:
        return {"architecture": ec.model_architecture, "input_shape": [], "num_classes": 0}
    try:
        check_available(ec.dataset)
    except FileNotFoundError as exc:
        raise InvalidRequest("Dataset not available", f"experiment_config.dataset: {exc}") from None
    info = dataset_info(ec.dataset)
    return {
        "architecture": ec.model_architecture,
        "input_shape": list(info.input_shape),
        "num_classes": info.num_classes,
    }


def _initial_weights(session, blobs, exp: Experiment, ec: ExperimentConfig) -> None:  # type: ignore[no-untyped-def]
    """Adopt the warm-start model; a custom architecture must have its round-0 weights by now."""
    if ec.initial_model_id is not None:
        initial_models.adopt(session, blobs, exp.experiment_id, ec.initial_model_id, exp.model_config_)
    elif not ec.builtin and initial_models.initial_model(session, exp.experiment_id) is None:
        raise InvalidRequest(
            "Custom model needs initial weights",
            f"model_architecture '{ec.model_architecture}' is not built in ({', '.join(KNOWN_ARCHITECTURES)} are), "
            "so the server cannot create its weights: "
            f"create the experiment, upload them with PUT /experiments/{exp.experiment_id}/initial_model "
            "(or give experiment_config.initial_model_id), then start it",
        )


def _mark_failed(engine, exp_id: str, message: str, code: str | None = None) -> None:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        exp = s.get(Experiment, exp_id)
        if exp is not None:
            exp.status, exp.error, exp.finished_at = "failed", message, utcnow()
            exp.error_code = code or exp.error_code
            s.add(exp)


def _running_ids(engine) -> list[str]:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        return running_ids(s)


async def repair_orphans(engine, temporal) -> None:  # type: ignore[no-untyped-def]
    """Fail experiments marked running whose workflow never started (the API died between the two).

    Without this, such a row would answer every later start with 409 and every stop with an error.
    """
    for exp_id in await run_in_threadpool(_running_ids, engine):
        try:
            await temporal.get_workflow_handle(workflow_id(exp_id)).describe()
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            message = "the workflow never started: the API stopped between recording the start and starting it"
            await run_in_threadpool(_mark_failed, engine, exp_id, message, "WORKFLOW_NOT_STARTED")


def _selected(engine, exp_id: str) -> list[str] | None:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        rnd = current_round(s, exp_id)
        return list(rnd.selected_clients) if rnd else None


@router.post("/training/start", responses=openapi.ok(openapi.START_RESPONSE, 400, 409))
async def start_training(
    engine: EngineDep,
    blobs: BlobsDep,
    settings: SettingsDep,
    temporal: TemporalDep,
    _: AdminDep,
    req: Annotated[StartRequest, Body(openapi_examples=openapi.body(openapi.START_REQUEST))],
) -> dict:
    """Start an experiment: a durable workflow that runs its rounds."""
    _forget_status(engine)
    await repair_orphans(engine, temporal)
    exp, req, _per_round = await run_in_threadpool(_prepare, engine, blobs, req, settings.max_running_experiments)
    return await launch_experiment(engine, settings, temporal, exp, req)


async def launch_experiment(  # type: ignore[no-untyped-def]
    engine, settings, temporal, exp: Experiment, req: StartRequest, state: ExperimentState | None = None
) -> dict:
    """Start the experiment's workflow (from ``state`` when it continues) and answer as ``/training/start`` does."""
    ec = req.experiment_config
    info = exp.model_config_
    wf_input = ExperimentInput(
        experiment_id=exp.experiment_id,
        config=req,
        input_shape=info["input_shape"],
        num_classes=info["num_classes"],
        round_timeout_s=ec.round_timeout_s or settings.round_timeout_s,
        selection_timeout_s=ec.selection_timeout_s or settings.selection_timeout_s,
        policy=PolicyConfig.model_validate(exp.policy_config or {}),
        continue_as_new_every=settings.continue_as_new_every,
        state=state or ExperimentState(),
    )
    try:
        await temporal.start_workflow(
            ExperimentWorkflow.run,
            wf_input,
            id=workflow_id(exp.experiment_id),
            task_queue=WORKFLOW_TASK_QUEUE,
            # A continued experiment runs again under its id, once the earlier run has closed.
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE
            if state is not None
            else WorkflowIDReusePolicy.REJECT_DUPLICATE,
            memo=experiment_memo(exp.experiment_id, req, name=exp.name),
            search_attributes=start_search_attributes(exp.experiment_id, req.aggregation_config.strategy),
        )
    except Exception as exc:
        await run_in_threadpool(_mark_failed, engine, exp.experiment_id, f"workflow did not start: {exc}")
        raise
    selected: list[str] | None = None
    for _attempt in range(20):  # the first round usually opens within a second
        selected = await run_in_threadpool(_selected, engine, exp.experiment_id)
        if selected is not None:
            break
        await asyncio.sleep(0.1)
    _forget_status(engine)  # what the change did shows at once
    per_round = await run_in_threadpool(_per_round, engine)
    first = state.next_round if state else 1
    return {
        "experiment_id": exp.experiment_id,
        "status": "started",
        "start_time": iso(exp.started_at),
        "total_rounds": ec.rounds,
        "current_round": first,
        "selected_clients": selected or [],
        "estimated_duration": _humanize(per_round * (ec.rounds - first + 1)),
    }


def _per_round(engine) -> float:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        return _avg_round_seconds(s)


class StopRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    experiment_id: str | None = None
    reason: str = "manual_stop"

    @field_validator("experiment_id")
    @classmethod
    def _id(cls, v: str | None) -> str | None:
        return None if v is None else check_id(v, "experiment_id")


def _stop_target(engine, experiment_id: str | None) -> str:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        check_unambiguous(s, experiment_id, "POST /training/stop")
        exp = s.get(Experiment, experiment_id) if experiment_id else running_experiment(s)
        if exp is None or exp.status != "running":
            what = f"experiment '{experiment_id}'" if experiment_id else "no experiment"
            raise ExperimentNotActive("No active experiment running", f"{what} is not running")
        return exp.experiment_id


def _experiment(engine, experiment_id: str) -> Experiment | None:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        return s.get(Experiment, experiment_id)


@router.post("/training/stop", responses=openapi.ok({**openapi.STOP_REQUEST, "status": "stopped"}, 400, 409))
async def stop_training(
    body: Annotated[StopRequest, Body(openapi_examples=openapi.body(openapi.STOP_REQUEST))],
    engine: EngineDep,
    temporal: TemporalDep,
    _: AdminDep,
    experiment_id: str | None = Query(default=None),
) -> dict:
    """Stop a running experiment (``experiment_id`` in the body or the query; required while several run)."""
    _forget_status(engine)
    if experiment_id is not None:
        valid_id(experiment_id, "experiment_id")
        if body.experiment_id not in (None, experiment_id):
            raise InvalidRequest(
                "Conflicting experiment_id", f"the query names '{experiment_id}', the body '{body.experiment_id}'"
            )
    await repair_orphans(engine, temporal)
    exp_id = await run_in_threadpool(_stop_target, engine, body.experiment_id or experiment_id)
    handle: WorkflowHandle = temporal.get_workflow_handle(workflow_id(exp_id))
    await handle.signal(ExperimentWorkflow.request_stop, body.reason)
    await handle.cancel()
    exp = None
    for _attempt in range(100):
        exp = await run_in_threadpool(_experiment, engine, exp_id)
        if exp is not None and exp.status != "running":
            break
        await asyncio.sleep(0.1)
    _forget_status(engine)  # what the change did shows at once
    return {
        "experiment_id": exp_id,
        "status": exp.status if exp and exp.status != "running" else "stopping",
        "reason": body.reason,
        "rounds_completed": max(0, (exp.current_round if exp else 0) - (1 if exp and exp.status == "stopped" else 0)),
        "final_model_id": exp.final_model_id if exp else None,
        "timestamp": iso(utcnow()),
    }


def _training_status(engine, experiment_id: str | None = None) -> dict:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        check_unambiguous(s, experiment_id, "GET /training/status")
        exp = latest_experiment(s) if experiment_id is None else s.get(Experiment, experiment_id)
        if exp is None and experiment_id is not None:
            raise NotFound("Resource not found", f"experiment '{experiment_id}' does not exist")
        if exp is None:
            return {
                "experiment_id": None,
                "status": "idle",
                "current_round": 0,
                "total_rounds": 0,
                "progress": 0.0,
                "start_time": None,
                "estimated_completion": None,
                "selected_clients": [],
                "round_metrics": None,
            }
        # Two small queries whatever the number of rounds: this route is polled hard by dashboards.
        done, mean_duration = s.exec(
            select(func.count(), func.avg(RoundMetrics.round_duration)).where(
                RoundMetrics.experiment_id == exp.experiment_id
            )
        ).one()
        last = s.exec(
            select(RoundMetrics)
            .where(RoundMetrics.experiment_id == exp.experiment_id)
            .order_by(RoundMetrics.round.desc())  # type: ignore[attr-defined]
            .limit(1)
        ).first()
        rnd = current_round(s, exp.experiment_id)
    estimated = None
    if exp.started_at is not None:
        per_round = float(mean_duration) if done else DEFAULT_ROUND_SECONDS
        estimated = iso(exp.started_at + timedelta(seconds=per_round * exp.total_rounds))
    return {
        "experiment_id": exp.experiment_id,
        "status": exp.status,
        "current_round": exp.current_round,
        "total_rounds": exp.total_rounds,
        "progress": done / exp.total_rounds if exp.total_rounds else 0.0,
        "start_time": iso(exp.started_at),
        "estimated_completion": estimated,
        "selected_clients": list(rnd.selected_clients) if rnd else [],
        "round_metrics": {
            "accuracy": last.global_accuracy,
            "loss": last.global_loss,
            "round_duration": last.round_duration,
            "participating_clients": last.participating_clients,
        }
        if last
        else None,
        "final_model_id": exp.final_model_id,
        "error": {"code": exp.error_code, "message": exp.error} if exp.error_code else None,
        "stop_reason": exp.stop_reason,
    }


# GET /training/status is what dashboards and clients poll hardest: one database read answers every
# request of the next STATUS_TTL_S seconds in this process (concurrent requests share the read), and
# start and stop drop it at once. The worker's progress therefore shows at most that much later.
STATUS_TTL_S = 0.25
# Bound on the experiments whose status read is remembered per engine.
STATUS_CACHE_MAX = 1000
_status_reads: WeakKeyDictionary = WeakKeyDictionary()  # engine -> {experiment_id: (read at, the read's future)}


def _forget_status(engine) -> None:  # type: ignore[no-untyped-def]
    _status_reads.pop(engine, None)


@router.get("/training/status", responses=openapi.ok(openapi.TRAINING_STATUS, 400, 404))
async def training_status(engine: EngineDep, _: PrincipalDep, experiment_id: str | None = Query(default=None)) -> dict:
    """Progress of an experiment: the one named, else the running (or last) one; 400 while several run."""
    if experiment_id is not None:
        valid_id(experiment_id, "experiment_id")
    now = time.monotonic()
    reads = _status_reads.setdefault(engine, {})
    entry = reads.get(experiment_id)
    if entry is None or now - entry[0] > STATUS_TTL_S:
        if len(reads) > STATUS_CACHE_MAX:
            reads.clear()
        entry = (now, asyncio.ensure_future(run_in_threadpool(_training_status, engine, experiment_id)))
        reads[experiment_id] = entry
    try:
        return await asyncio.shield(entry[1])
    except Exception:
        if reads.get(experiment_id) is entry:
            reads.pop(experiment_id, None)  # a failed read (e.g. the database is down) is not kept
        raise
