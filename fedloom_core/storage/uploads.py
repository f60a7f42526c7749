"""Accepting a client's model update: check it, store the blob, record it exactly once."""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import update as sa_update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from fedloom_core.errors import (
    ClientNotRegistered,
    Conflict,
    ExperimentNotActive,
    InvalidRequest,
    ModelValidationFailed,
    NotFound,
    RoundNotActive,
)
from fedloom_core.learning import weights
from fedloom_core.messages import UpdateRef
from fedloom_core.policy.validation import FileCheck, check_update_file
from fedloom_core.schemas import PolicyConfig
from fedloom_core.storage.blobstore import BlobStore
from fedloom_core.storage.db import Client, Experiment, GlobalModel, Round, Update, utcnow
from fedloom_core.storage.keys import update_key
from fedloom_core.storage.repo import emit_event, running_first, session_scope
from fedloom_core.storage.round_validation import judge_round

_structure_cache: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}


@dataclass(frozen=True)
class Target:
    """Where an upload goes: the running experiment's open round."""

    experiment_id: str
    round: int
    global_model_id: str


@dataclass(frozen=True)
class StoredUpdate:
    """The update record of an upload, and whether this upload created it."""

    update: Update
    created: bool
    # Set when this upload was the one that completed its round: every selected client (sorted).
    completed_round: list[str] | None = None


def _refuse_constant(name: str) -> None:
    """NaN and Infinity are not JSON; stored, they would break every later JSON answer."""
    raise json.JSONDecodeError(f"{name} is not a JSON number", name, 0)


# data_samples is stored in a 32-bit integer column.
MAX_DATA_SAMPLES = 2**31 - 1


def parse_metrics(raw: str | None) -> dict[str, Any]:
    """The upload's ``metrics`` form field, which must be a JSON object with ``data_samples`` > 0."""
    if raw is None or raw == "":
        raise InvalidRequest("metrics are required", "form field 'metrics' must be a JSON object with data_samples")
    try:
        metrics = json.loads(raw, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise InvalidRequest("metrics are not valid JSON", f"form field 'metrics': {exc}") from None
    if not isinstance(metrics, dict):
        raise InvalidRequest("metrics must be a JSON object", "form field 'metrics' must be a JSON object")
    samples = metrics.get("data_samples")
    if isinstance(samples, bool) or not isinstance(samples, int) or not 0 < samples <= MAX_DATA_SAMPLES:
        raise InvalidRequest(
            f"metrics.data_samples must be an integer in 1..{MAX_DATA_SAMPLES}", f"got data_samples={samples!r}"
        )
    for key, value in metrics.items():
        if key in ("local_accuracy", "local_loss", "training_time", "communication_time") and not (
            value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
        ):
            raise InvalidRequest(f"metrics.{key} must be a finite number", f"got {key}={value!r}")
    return metrics


def find_target(engine: Engine, client_id: str, experiment_id: str | None = None) -> Target:
    """The open round this client may upload to, or the spec's error saying why there is none.

    ``experiment_id`` names the experiment. Without it, while several run, it is the one whose open
    round selected this client and has no update from it yet (the most recently started first, as the
    task endpoint hands out tasks), else the most recently started.
    """
    # Every upload asks this first, so it reads only the columns it needs (no ORM objects, no JSON config).
    with session_scope(engine) as s:
        if s.exec(select(Client.client_id).where(Client.client_id == client_id)).first() is None:
            raise ClientNotRegistered(
                "Client not registered with server", f"The specified client ID '{client_id}' is not registered"
            )
        experiments = running_first(select(Experiment.experiment_id, Experiment.current_round))
        if experiment_id is not None:
            experiments = experiments.where(Experiment.experiment_id == experiment_id)
        running = s.exec(experiments).all()
        if not running:
            raise ExperimentNotActive("No active experiment running", "no experiment is running; start one first")
        found = [(exp, _open_round(s, exp.experiment_id)) for exp in running]
        mine = [(exp, rnd) for exp, rnd in found if rnd is not None and client_id in rnd.selected_clients]
        pending = [(exp, rnd) for exp, rnd in mine if not _has_update(s, exp.experiment_id, rnd.round, client_id)]
        exp, rnd = (pending or mine or found)[0]
        if rnd is None:
            raise RoundNotActive(
                "No round is taking uploads",
                f"experiment '{exp.experiment_id}' has no open round (current round {exp.current_round})",
            )
        if client_id not in rnd.selected_clients:
            raise RoundNotActive(
                "Client is not part of the current round",
                f"client '{client_id}' was not selected for round {rnd.round} of '{exp.experiment_id}'",
            )
        return Target(exp.experiment_id, rnd.round, rnd.global_model_id)


def _open_round(s: Session, experiment_id: str):  # type: ignore[no-untyped-def]
    return s.exec(
        select(Round.round, Round.selected_clients, Round.global_model_id)
        .where(Round.experiment_id == experiment_id, Round.status == "open")
        .limit(1)
    ).first()


def _has_update(s: Session, experiment_id: str, round: int, client_id: str) -> bool:
    query = select(Update.update_id).where(
        Update.experiment_id == experiment_id, Update.round == round, Update.client_id == client_id
    )
    return s.exec(query.limit(1)).first() is not None


def expected_structure(engine: Engine, blobs: BlobStore, model_id: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor names, dtypes and shapes of a global model (cached: models never change)."""
    cached = _structure_cache.get(model_id)
    if cached is not None:
        return cached
    with session_scope(engine) as s:
        model = s.get(GlobalModel, model_id)
        if model is None:
            raise RoundNotActive("The round's global model is not available yet", f"model {model_id} not found")
        key = model.blob_key
    with blobs.open_local(key) as path:
        found = weights.structure(path)
    if len(_structure_cache) > 64:
        _structure_cache.clear()
    _structure_cache[model_id] = found
    return found


def check_upload(path: Path, out: Path, expected: dict[str, tuple[str, tuple[int, ...]]]) -> str:
    """Normalise an upload to safetensors at ``out``; its format, or MODEL_VALIDATION_FAILED naming the problem."""
    report = check_update_file(path, out, expected, stop_at_failure=True)
    if report.problem is not None or report.format is None:
        raise ModelValidationFailed("Uploaded model failed validation", report.problem or "unreadable weights")
    return report.format


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def store_update(
    engine: Engine,
    blobs: BlobStore,
    *,
    client_id: str,
    upload_path: Path,
    metrics: dict[str, Any],
    upload_sha256: str | None = None,
    experiment_id: str | None = None,
) -> StoredUpdate:
    """Validate, store and record one uploaded update; a repeat of the same file returns the first record.

    ``upload_sha256`` is the uploaded file's digest if the caller computed it while receiving the
    file; a safetensors upload is stored as it came, so that is the stored blob's digest too and
    the file is not read again for it. The file itself is moved into the blob store, not copied.
    """
    target = find_target(engine, client_id, experiment_id)
    expected = expected_structure(engine, blobs, target.global_model_id)
    with tempfile.TemporaryDirectory(prefix="fedloom-upload-", dir=upload_path.parent) as tmp:
        normalized = Path(tmp) / "update.safetensors"
        try:
            fmt = check_upload(upload_path, normalized, expected)
        except ModelValidationFailed as exc:
            _announce_rejection(engine, target, client_id, exc.details)
            raise
        digest = upload_sha256 if upload_sha256 and fmt == "safetensors" else sha256_file(normalized)
        existing = _existing(engine, target, client_id)
        if existing is not None:
            return _repeat(existing, digest)
        key = update_key(target.experiment_id, target.round, client_id, digest)
        info = blobs.adopt_file(key, normalized, sha256=digest)
    update = Update(
        update_id=f"update_{secrets.token_hex(8)}",
        experiment_id=target.experiment_id,
        round=target.round,
        client_id=client_id,
        blob_key=info.key,
        sha256=info.sha256,
        size_bytes=info.size,
        num_samples=int(metrics["data_samples"]),
        metrics=metrics,
    )
    try:
        completed = _record(engine, target, update)
    except IntegrityError:
        existing = _existing(engine, target, client_id)
        if existing is None:
            raise
        return _repeat(existing, digest)
    return StoredUpdate(update, True, completed)


def _record(engine: Engine, target: Target, update: Update) -> list[str] | None:
    """Insert ``update`` while its round is open; every selected client (sorted) if it completed the round."""
    with session_scope(engine) as s:
        # Taking the round row first serialises this insert with close_round, and with the round's
        # other uploads: the count it returns tells exactly one of them that it completed the round
        # (only selected clients reach here, and each one's update is unique).
        opened = s.execute(
            sa_update(Round)
            .where(Round.experiment_id == target.experiment_id, Round.round == target.round, Round.status == "open")
            .values(upload_count=Round.upload_count + 1)
            .returning(Round.upload_count, Round.selected_clients)
        ).first()
        if opened is None:
            raise RoundNotActive(
                "Specified round is not currently active", f"round {target.round} closed before the upload finished"
            )
        count, selected = opened
        s.add(update)
        now = utcnow()
        s.execute(sa_update(Client).where(Client.client_id == update.client_id).values(last_update=now, last_seen=now))
        metrics = update.metrics
        emit_event(
            s,
            type="client_update",
            experiment_id=target.experiment_id,
            client_id=update.client_id,
            status="training_completed",
            round=target.round,
            metrics={k: metrics.get(k) for k in ("local_accuracy", "local_loss", "training_time") if k in metrics},
        )
    everyone = set(selected)
    return sorted(everyone) if count >= len(everyone) else None


def round_reported(engine: Engine, experiment_id: str, round: int) -> list[str] | None:
    """The clients with a stored update in the round, once every selected client has one; else None.

    A new upload learns this from its own transaction (``StoredUpdate.completed_round``); a repeated
    one asks here, after the fact, since the first attempt may have died before it could tell.
    """
    with session_scope(engine) as s:
        selected = s.exec(
            select(Round.selected_clients).where(Round.experiment_id == experiment_id, Round.round == round)
        ).first()
        if selected is None:
            return None
        stored = set(
            s.exec(select(Update.client_id).where(Update.experiment_id == experiment_id, Update.round == round)).all()
        )
    return sorted(stored) if stored >= set(selected) else None


def _announce_rejection(engine: Engine, target: Target, client_id: str, reason: str) -> None:
    with session_scope(engine) as s:
        emit_event(
            s,
            type="update_rejected",
            experiment_id=target.experiment_id,
            client_id=client_id,
            round=target.round,
            reason=reason,
        )


def _existing(engine: Engine, target: Target, client_id: str) -> Update | None:
    with session_scope(engine) as s:
        return s.exec(
            select(Update).where(
                Update.experiment_id == target.experiment_id,
                Update.round == target.round,
                Update.client_id == client_id,
            )
        ).first()


def _repeat(existing: Update, digest: str) -> StoredUpdate:
    if existing.sha256 != digest:
        raise Conflict(
            "An update for this round was already received",
            f"client '{existing.client_id}' already uploaded a different model for round {existing.round} "
            f"({existing.update_id})",
        )
    return StoredUpdate(existing, False)


@dataclass(frozen=True)
class DryRunTarget:
    """Where a validate dry run's file would go: the open round, or why there is none."""

    client_id: str
    target: Target | None
    round_check: FileCheck


def dry_run_target(engine: Engine, client_id: str) -> DryRunTarget:
    """The dry run's round check, made before its body is read; an unknown client raises."""
    try:
        target = find_target(engine, client_id)
    except (ExperimentNotActive, RoundNotActive) as exc:
        return DryRunTarget(client_id, None, FileCheck("round_active", False, exc.details))
    return DryRunTarget(
        client_id, target, FileCheck("round_active", True, f"round {target.round} of '{target.experiment_id}' is open")
    )


def dry_run(
    engine: Engine, blobs: BlobStore, *, target: DryRunTarget, upload_path: Path, raw_metrics: str | None
) -> list[FileCheck]:
    """Every check an upload goes through, and the round's policy as it stands, without storing anything.

    The policy check runs the workflow's own ``judge_round`` over the round's stored updates and this
    file (in place of the client's own earlier update, if any), so it gives the workflow's reason.
    """
    checks = [target.round_check]
    expected = None
    if target.target is not None:
        try:
            expected = expected_structure(engine, blobs, target.target.global_model_id)
        except RoundNotActive as exc:
            checks[0] = FileCheck("round_active", False, exc.details)
    samples = 1
    if raw_metrics is not None:
        try:
            samples = int(parse_metrics(raw_metrics)["data_samples"])
            checks.append(FileCheck("metrics", True, "metrics are a JSON object with data_samples > 0"))
        except InvalidRequest as exc:
            checks.append(FileCheck("metrics", False, exc.details))
    with tempfile.TemporaryDirectory(prefix="fedloom-validate-", dir=upload_path.parent) as tmp:
        normalized = Path(tmp) / "update.safetensors"
        report = check_update_file(upload_path, normalized, expected)
        checks += report.checks
        if target.target is not None and expected is not None and report.problem is None:
            checks.append(_policy_check(engine, blobs, target.target, target.client_id, normalized, samples))
    return checks


def _policy_check(
    engine: Engine, blobs: BlobStore, target: Target, client_id: str, path: Path, samples: int
) -> FileCheck:
    """The round's verdict on this file beside the round's stored updates (``round_validation.judge_round``)."""
    with session_scope(engine) as s:
        exp = s.get(Experiment, target.experiment_id)
        started = s.exec(
            select(Round.started_at).where(Round.experiment_id == target.experiment_id, Round.round == target.round)
        ).first()
        stored = s.exec(
            select(Update).where(Update.experiment_id == target.experiment_id, Update.round == target.round)
        ).all()
        model = s.get(GlobalModel, target.global_model_id)
    if exp is None or started is None or model is None:
        return FileCheck("policy", False, f"round {target.round} of '{target.experiment_id}' is gone")
    refs = [
        UpdateRef(update_id=u.update_id, client_id=u.client_id, blob_key=u.blob_key, num_samples=u.num_samples)
        for u in stored
        if u.client_id != client_id
    ]
    refs.append(UpdateRef(update_id="dry-run", client_id=client_id, blob_key="dry-run", num_samples=samples))
    verdict = judge_round(
        engine,
        blobs,
        experiment_id=target.experiment_id,
        round=target.round,
        global_key=model.blob_key,
        updates=refs,
        policy=PolicyConfig.model_validate(exp.policy_config or {}),
        hour_utc=started.hour,
        weekday=started.weekday(),
        local={client_id: path},
    )
    reason = verdict.rejected.get(client_id)
    if reason is not None:
        return FileCheck("policy", False, reason)
    measured = verdict.stats.get(client_id, {})
    summary = ", ".join(f"{k} {v:.4g}" for k, v in measured.items() if k != "anomaly")
    return FileCheck("policy", True, f"within the round's policy ({summary or 'nothing measured'})")


def get_update(engine: Engine, update_id: str) -> Update:
    """An update record, or NOT_FOUND."""
    with session_scope(engine) as s:
        upd = s.get(Update, update_id)
    if upd is None:
        raise NotFound("Resource not found", f"update '{update_id}' does not exist")
    return upd
