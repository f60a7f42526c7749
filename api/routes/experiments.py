"""Experiments as records: create one to start later, list them, read one in full."""

from __future__ import annotations

import math
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from api import openapi
from api.deps import MAX_QUERY_INT, AdminDep, EngineDep, valid_id
from api.routes.training import _avg_round_seconds, _humanize
from fedloom_core.errors import Conflict, InvalidRequest, NotFound
from fedloom_core.ids import check_id, check_optional_id
from fedloom_core.learning.catalog import builtin_architecture, builtin_dataset, canonical_dataset
from fedloom_core.learning.datasets import check_available, dataset_info
from fedloom_core.schemas import (
    EvaluationConfig,
    ExperimentConfig,
    PolicyConfig,
    RetentionConfig,
    StartRequest,
    TrainingConfig,
)
from fedloom_core.storage.db import Experiment, RoundMetrics, utcnow
from fedloom_core.storage.repo import emit_event, iso, session_scope
from workflows.experiment import workflow_id

router = APIRouter(tags=["experiments"])

STATUSES = ("created", "running", "completed", "failed", "stopped")
SPLIT_STRATEGIES = ("iid",)
DEFAULT_UI_URL = "http://127.0.0.1:8233"
# estimated_compute: parameters x rounds x local_epochs below 1e6 is "low", below 1e7 "medium", else "high".
COMPUTE_TIERS = ((1e6, "low"), (1e7, "medium"))
# network_bandwidth: the smallest of these links (Mbps) that moves the float32 model down and back up
# within TRANSFER_TARGET_S seconds, i.e. one round's traffic per client.
BANDWIDTH_TIERS_MBPS = (1, 10, 100, 1000, 10000)
TRANSFER_TARGET_S = 1.0


class DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    split_strategy: str = "iid"
    clients_count: int = Field(default=2, ge=1, le=100_000)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        """A built-in dataset's canonical name, or the name the sites give their own data (custom models)."""
        return builtin_dataset(v) or check_id(v, "dataset_config.name")

    @field_validator("split_strategy")
    @classmethod
    def _split(cls, v: str) -> str:
        if v.strip().lower() not in SPLIT_STRATEGIES:
            raise ValueError(f"unknown split_strategy {v!r}; known: {', '.join(SPLIT_STRATEGIES)}")
        return v.strip().lower()


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    architecture: str
    input_shape: list[int] | None = Field(default=None, min_length=1, max_length=4)
    num_classes: int | None = Field(default=None, ge=2, le=100_000)

    @field_validator("architecture")
    @classmethod
    def _arch(cls, v: str) -> str:
        """A built-in architecture's canonical name, or any other name for a custom model."""
        return builtin_architecture(v) or check_id(v, "model_config.architecture")


class ExperimentTraining(TrainingConfig):
    """The spec's ``training_config`` of an experiment: the start request's plus ``rounds``."""

    rounds: int = Field(default=10, ge=1, le=100_000)


class CreateExperiment(BaseModel):
    """The body of ``POST /experiments``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    experiment_id: str | None = None
    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=10_000)
    dataset_config: DatasetSpec
    model_spec: ModelSpec = Field(alias="model_config")
    training_config: ExperimentTraining = Field(default_factory=ExperimentTraining)
    policy_config: PolicyConfig = Field(default_factory=PolicyConfig)
    # Extensions: how new models are evaluated, and a warm start from another experiment's model.
    evaluation_config: EvaluationConfig = Field(default_factory=EvaluationConfig)
    initial_model_id: str | None = None
    # Extension: which rounds' updates and global models are kept (docs/operations.md).
    retention: RetentionConfig | None = None

    _ids = field_validator("experiment_id", "initial_model_id")(check_optional_id)

    @model_validator(mode="after")
    def _consistent(self) -> CreateExperiment:
        if builtin_architecture(self.model_spec.architecture) is None:
            return self._check_min_clients()  # a custom model: the server knows neither its data nor its shape
        canonical_dataset(self.dataset_config.name)  # a built-in model trains on a built-in dataset
        try:
            check_available(self.dataset_config.name)
        except FileNotFoundError as exc:
            raise ValueError(f"dataset_config.name: {exc}") from None
        info = dataset_info(self.dataset_config.name)
        shape = list(info.input_shape)
        if self.model_spec.input_shape is not None and self.model_spec.input_shape != shape:
            raise ValueError(
                f"model_config.input_shape {self.model_spec.input_shape} does not match dataset "
                f"{info.name!r}, whose input_shape is {shape}"
            )
        if self.model_spec.num_classes is not None and self.model_spec.num_classes != info.num_classes:
            raise ValueError(
                f"model_config.num_classes {self.model_spec.num_classes} does not match dataset "
                f"{info.name!r}, which has {info.num_classes} classes"
            )
        self.model_spec.input_shape, self.model_spec.num_classes = shape, info.num_classes
        return self._check_min_clients()

    def _check_min_clients(self) -> CreateExperiment:
        wanted = self.policy_config.min_clients
        if wanted is not None and wanted > self.dataset_config.clients_count:
            raise ValueError(
                f"policy_config.min_clients ({wanted}) exceeds dataset_config.clients_count "
                f"({self.dataset_config.clients_count})"
            )
        return self

    def start_request(self, experiment_id: str) -> StartRequest:
        """The ``POST /training/start`` body that runs this experiment."""
        tc = self.training_config
        return StartRequest(
            experiment_config=ExperimentConfig(
                experiment_id=experiment_id,
                rounds=tc.rounds,
                min_clients=self.policy_config.min_clients or min(2, self.dataset_config.clients_count),
                model_architecture=self.model_spec.architecture,
                dataset=self.dataset_config.name,
                initial_model_id=self.initial_model_id,
                retention=self.retention,
            ),
            training_config=TrainingConfig.model_validate(tc.model_dump(exclude={"rounds"})),
            evaluation_config=self.evaluation_config,
        )


def _compute_tier(work: float) -> str:
    for limit, tier in COMPUTE_TIERS:
        if work < limit:
            return tier
    return "high"


def _bandwidth(model_bytes: int) -> str:
    megabits = model_bytes * 2 * 8 / 1e6 / TRANSFER_TARGET_S
    for tier in BANDWIDTH_TIERS_MBPS:
        if megabits <= tier:
            return f"{tier}Mbps"
    return f"{math.ceil(megabits / 1000)}Gbps"


def _resources(body: CreateExperiment, min_clients: int) -> dict:
    spec = body.model_spec
    # A custom model's size is known once its initial weights are uploaded.
    params = 0
    if builtin_architecture(spec.architecture) is not None:
        from fedloom_core.learning.zoo import build_model, parameters_count  # torch: only when asked

        params = parameters_count(build_model(spec.architecture, spec.input_shape or [], spec.num_classes or 2))
    tc = body.training_config
    model_bytes = params * 4
    return {
        "min_clients": min_clients,
        "estimated_compute": _compute_tier(params * tc.rounds * tc.local_epochs),
        "network_bandwidth": _bandwidth(model_bytes),
        "parameters_count": params,
        "model_size_mb": round(model_bytes / 1e6, 3),
    }


def _create(engine, body: CreateExperiment) -> dict:  # type: ignore[no-untyped-def]
    exp_id = body.experiment_id or f"exp_{utcnow():%Y%m%d}_{secrets.token_hex(3)}"
    start = body.start_request(exp_id)
    resources = _resources(body, start.experiment_config.min_clients)
    exp = Experiment(
        experiment_id=exp_id,
        name=body.name,
        description=body.description,
        status="created",
        dataset=start.experiment_config.dataset,
        model_architecture=start.experiment_config.model_architecture,
        total_rounds=body.training_config.rounds,
        config=start.model_dump(mode="json"),
        dataset_config=body.dataset_config.model_dump(mode="json"),
        model_config_=body.model_spec.model_dump(mode="json"),
        training_config=body.training_config.model_dump(mode="json"),
        policy_config=body.policy_config.model_dump(mode="json", exclude_unset=True),
        created_at=utcnow(),
    )
    try:
        with session_scope(engine) as s:
            if s.get(Experiment, exp_id) is not None:
                raise Conflict("Resource already exists", f"experiment '{exp_id}' already exists")
            s.add(exp)
            emit_event(s, type="experiment_created", experiment_id=exp_id, name=body.name)
            per_round = _avg_round_seconds(s)
    except IntegrityError:
        raise Conflict("Resource already exists", f"experiment '{exp_id}' already exists") from None
    return {
        "experiment_id": exp_id,
        "name": exp.name,
        "status": "created",
        "created_at": iso(exp.created_at),
        "estimated_duration": _humanize(per_round * body.training_config.rounds),
        "resource_requirements": resources,
    }


@router.post("/experiments", responses=openapi.ok(openapi.EXPERIMENT_CREATED, 400, 409))
async def create_experiment(
    engine: EngineDep,
    _: AdminDep,
    req: Annotated[CreateExperiment, Body(openapi_examples=openapi.body(openapi.CREATE_EXPERIMENT))],
) -> dict:
    """Create an experiment (status ``created``); start it with ``POST /training/start`` and its ``config``."""
    return await run_in_threadpool(_create, engine, req)


def _progress(exp: Experiment, done: int) -> float:
    return done / exp.total_rounds if exp.total_rounds else 0.0


def _rounds_done(session, exp_ids: list[str]) -> dict[str, int]:  # type: ignore[no-untyped-def]
    if not exp_ids:
        return {}
    rows = session.exec(
        select(RoundMetrics.experiment_id, func.count())
        .where(RoundMetrics.experiment_id.in_(exp_ids))  # type: ignore[attr-defined]
        .group_by(RoundMetrics.experiment_id)
    ).all()
    return {exp_id: count for exp_id, count in rows}


def _list(engine, status: str | None, limit: int, offset: int) -> dict:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        count_q = select(func.count()).select_from(Experiment)
        page_q = select(Experiment)
        if status is not None:
            count_q = count_q.where(Experiment.status == status)
            page_q = page_q.where(Experiment.status == status)
        total = s.exec(count_q).one()
        page = s.exec(
            page_q.order_by(Experiment.created_at.desc(), Experiment.experiment_id.desc())  # type: ignore[attr-defined]
            .offset(offset)
            .limit(limit)
        ).all()
        done = _rounds_done(s, [e.experiment_id for e in page])
    return {
        "experiments": [
            {
                "experiment_id": e.experiment_id,
                "name": e.name,
                "status": e.status,
                "created_at": iso(e.created_at),
                "progress": _progress(e, done.get(e.experiment_id, 0)),
            }
            for e in page
        ],
        "total_count": total,
        "has_more": offset + len(page) < total,
    }


@router.get("/experiments", responses=openapi.ok(openapi.EXPERIMENTS_LIST, 400))
async def list_experiments(
    engine: EngineDep,
    _: AdminDep,
    status: str | None = Query(default=None),
    limit: int = Query(default=50, ge=1, le=500),
    offset: int = Query(default=0, ge=0, le=MAX_QUERY_INT),
) -> dict:
    """Experiments, newest first; filter by ``status``, page with ``limit`` (at most 500) and ``offset``."""
    if status is not None and status not in STATUSES:
        raise InvalidRequest("Invalid status filter", f"status {status!r} is not one of {', '.join(STATUSES)}")
    return await run_in_threadpool(_list, engine, status, limit, offset)


def _detail(engine, experiment_id: str) -> tuple[Experiment, int]:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        exp = s.get(Experiment, experiment_id)
        if exp is None:
            raise NotFound("Resource not found", f"experiment '{experiment_id}' does not exist")
        return exp, _rounds_done(s, [experiment_id]).get(experiment_id, 0)


@router.get("/experiments/{experiment_id}", responses=openapi.errors(400, 404))
async def get_experiment(experiment_id: str, request: Request, engine: EngineDep, _: AdminDep) -> dict:
    """Extension: one experiment in full, with a link to its workflow in the Temporal Web UI once started."""
    valid_id(experiment_id, "experiment_id")
    exp, done = await run_in_threadpool(_detail, engine, experiment_id)
    settings = request.app.state.settings
    base = str(getattr(settings, "temporal_ui_url", DEFAULT_UI_URL)).rstrip("/")
    ui_url = None
    if exp.status != "created":
        ui_url = f"{base}/namespaces/{settings.temporal_namespace}/workflows/{workflow_id(exp.experiment_id)}"
    body: dict[str, Any] = {
        "experiment_id": exp.experiment_id,
        "name": exp.name,
        "description": exp.description,
        "status": exp.status,
        "dataset": exp.dataset,
        "model_architecture": exp.model_architecture,
        "dataset_config": exp.dataset_config,
        "model_config": exp.model_config_,
        "training_config": exp.training_config,
        "policy_config": exp.policy_config,
        "config": exp.config,
        "current_round": exp.current_round,
        "total_rounds": exp.total_rounds,
        "rounds_completed": done,
        "progress": _progress(exp, done),
        "created_at": iso(exp.created_at),
        "started_at": iso(exp.started_at),
        "finished_at": iso(exp.finished_at),
        "final_model_id": exp.final_model_id,
        "stop_reason": exp.stop_reason,
        "error": {"code": exp.error_code, "message": exp.error} if exp.error or exp.error_code else None,
        "temporal_ui_url": ui_url,
    }
    return body
