"""Federated evaluation: a client reports how a round's new global model did on its local data."""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError, field_validator

from api import openapi
from api.deps import BodyStreamDep, EngineDep, PrincipalDep, TemporalDep, valid_id
from fedloom_core.errors import InvalidRequest, PayloadTooLarge
from fedloom_core.messages import EvaluationNotice
from fedloom_core.storage import evaluations
from fedloom_core.storage.repo import iso
from workflows.experiment import ExperimentWorkflow, workflow_id

router = APIRouter(tags=["models"])
# A report is a few numbers: the body is refused past this many bytes, and the metrics past this many names.
MAX_BODY_BYTES = 64 * 1024
MAX_METRICS = 64
MAX_METRIC_NAME = 64


class EvaluationReport(BaseModel):
    """The body of ``POST /model/evaluation/{client_id}``."""

    model_config = ConfigDict(extra="forbid")

    experiment_id: str = Field(min_length=1, max_length=128)
    round: int = Field(ge=1)
    # data_samples (integer >= 0; 0: "could not evaluate", left out of the average), loss, and
    # optionally accuracy and any other numeric metric; finite numbers only.
    metrics: dict[str, StrictInt | StrictFloat]

    @field_validator("metrics")
    @classmethod
    def _check_metrics(cls, metrics: dict[str, int | float]) -> dict[str, int | float]:
        if len(metrics) > MAX_METRICS:
            raise ValueError(f"at most {MAX_METRICS} metrics")
        for name, value in metrics.items():
            if not name or len(name) > MAX_METRIC_NAME:
                raise ValueError(f"metric names are 1 to {MAX_METRIC_NAME} characters")
            if not math.isfinite(value):
                raise ValueError(f"metric {name!r} is not a finite number")
        samples = metrics.get("data_samples")
        if not isinstance(samples, int) or samples < 0:
            raise ValueError("data_samples must be an integer >= 0")
        if samples > 0 and "loss" not in metrics:
            raise ValueError("loss is required when data_samples > 0")
        return metrics


_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": EvaluationReport.model_json_schema(),
                "example": openapi.EVALUATION_REQUEST,
            }
        },
    }
}


async def _read_report(body: Any, request: Request) -> EvaluationReport:
    """The bounded, validated JSON body."""
    too_large = PayloadTooLarge("Request body too large", f"an evaluation report is at most {MAX_BODY_BYTES} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    raw = bytearray()
    async for chunk in body:
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise too_large
    try:
        return EvaluationReport.model_validate(json.loads(raw))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest("Body is not valid JSON", str(exc)) from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise InvalidRequest("Invalid evaluation report", problems) from None


@router.post(
    "/model/evaluation/{client_id}",
    responses=openapi.ok(openapi.EVALUATION_RESPONSE, 400, 409, 413),
    openapi_extra=_BODY,
)
async def upload_evaluation(
    client_id: str,
    request: Request,
    body: BodyStreamDep,
    engine: EngineDep,
    temporal: TemporalDep,
    principal: PrincipalDep,
) -> dict:
    """Report a client's evaluation of a round's new global model (the ``evaluate`` task); repeats are idempotent.

    409 when the client was not asked to evaluate that round, or the round's evaluation phase is closed.
    """
    valid_id(client_id, "client_id")
    principal.require_client(client_id)
    report = await _read_report(body, request)
    valid_id(report.experiment_id, "experiment_id")
    stored = await run_in_threadpool(
        evaluations.record_report,
        engine,
        client_id=client_id,
        experiment_id=report.experiment_id,
        round=report.round,
        metrics=dict(report.metrics),
    )
    # Only the report that completes the phase wakes the workflow (a repeat checks again: the first
    # attempt may have died before it could signal); the database holds the reports.
    if stored.completed is not None:
        await temporal.get_workflow_handle(workflow_id(report.experiment_id)).signal(
            ExperimentWorkflow.evaluation_received,
            EvaluationNotice(client_id=client_id, round=report.round, reported=stored.completed),
        )
    row = stored.report
    return {
        "status": "received",
        "client_id": row.client_id,
        "experiment_id": row.experiment_id,
        "round": row.round,
        "data_samples": row.data_samples,
        "received_at": iso(row.received_at),
    }
