"""Storage retention: which rounds' updates and global models are kept, and the sweeps that delete the rest.

The keep rules, for an experiment whose latest committed round (its round metrics recorded) is ``last``:

- a round's updates go once the round is committed, unless ``keep_updates``;
- round ``r``'s global model goes once ``r < last`` (round ``r + 1``'s model is committed), unless ``r``
  is among the last ``keep_last_models`` committed rounds, a multiple of ``keep_model_every``, the
  initial model (round 0) or the experiment's final model;
- round ``r``'s strategy state goes once ``r < last`` (only the latest one is read again).

Nothing at or after ``last`` is touched, so whatever a running workflow may still read (a retried
activity, a replay, a continue-as-new) is there. A model's database row goes before its blob, so a
crash in between leaves only an orphan, which :func:`collect_orphans` removes once it is older than the
grace period. Every step is idempotent: deleting a missing blob or row is not an error.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, delete, select

from fedloom_core.errors import FedloomError
from fedloom_core.settings import Settings
from fedloom_core.storage import upload_sessions
from fedloom_core.storage.blobstore import BlobStore
from fedloom_core.storage.db import Experiment, GlobalModel, RoundMetrics, Update
from fedloom_core.storage.keys import model_id_for, state_key
from fedloom_core.storage.repo import session_scope

log = logging.getLogger("fedloom.retention")

_MODEL_RE = re.compile(r"(models|state)/([^/]+)/round-(\d+)\.safetensors")
_UPDATE_RE = re.compile(r"updates/([^/]+)/(\d+)/[^/]+")
# A round's selection details and its per-client outcome: each read only until the round is recorded.
_ROUND_RECORD_RE = re.compile(r"(?:selections|outcomes)/[^/]+/round-(\d+)-[0-9a-f]+\.json")
# The prefixes retention owns; blobs under any other prefix are never touched.
PREFIXES = ("models", "state", "updates")
_FINISHED = ("completed", "failed", "stopped")


class ModelRemoved(FedloomError):
    """A committed round's global model was deleted by the retention rules."""

    status, code = 410, "MODEL_REMOVED"


@dataclass(frozen=True)
class Rules:
    """What one experiment keeps (:func:`rules_for` merges the server's settings and its own config)."""

    enabled: bool = True
    keep_updates: bool = False
    keep_last_models: int = 3
    keep_model_every: int = 10

    def keeps_model(self, round: int, last: int, final_round: int | None = None) -> bool:
        """Whether round ``round``'s global model stays, ``last`` being the latest committed round."""
        if not self.enabled or round == 0 or round >= last or round == final_round:
            return True
        if round > last - self.keep_last_models:
            return True
        return bool(self.keep_model_every) and round % self.keep_model_every == 0

    def keeps_updates(self, round: int, last: int) -> bool:
        """Whether round ``round``'s updates stay (a round not committed yet always keeps them)."""
        return not self.enabled or self.keep_updates or round > last

    def keeps_state(self, round: int, last: int) -> bool:
        """Whether round ``round``'s strategy state stays: the latest committed one is read by the next round."""
        return not self.enabled or round >= last


def rules_for(settings: Settings, config: dict[str, Any] | None) -> Rules:
    """The rules of an experiment whose stored start request is ``config``; its ``retention`` overrides.

    A request stored before retention existed has no ``retention`` key at all: such an experiment is
    kept whole, so upgrading a server never deletes what earlier versions kept.
    """
    stored = (config or {}).get("experiment_config") or {}
    own = stored.get("retention") or {}

    def pick(name: str) -> Any:
        value = own.get(name)
        return getattr(settings, name) if value is None else value

    enabled = own.get("enabled")
    if "retention" not in stored:
        enabled = False
    return Rules(
        enabled=settings.retention if enabled is None else bool(enabled),
        keep_updates=bool(pick("keep_updates")),
        keep_last_models=int(pick("keep_last_models")),
        keep_model_every=int(pick("keep_model_every")),
    )


def _final_round(exp: Experiment) -> int | None:
    match = re.fullmatch(r"model_.+_round_(\d+)", exp.final_model_id or "")
    return int(match.group(1)) if match else None


@dataclass
class Report:
    """What one sweep deleted (blob keys), for logs and tests."""

    deleted: list[str] = field(default_factory=list)


def _last_committed(s: Session) -> dict[str, int]:
    rows = s.exec(select(RoundMetrics.experiment_id, func.max(RoundMetrics.round)).group_by(RoundMetrics.experiment_id))
    return {exp_id: int(last) for exp_id, last in rows}


def apply_retention(engine: Engine, blobs: BlobStore, settings: Settings, swept: dict[str, int]) -> Report:
    """Delete what the keep rules let go, for rounds committed since ``swept`` (experiment -> round, updated).

    Works from the database alone: the updates' rows name their blobs (the rows themselves stay, with
    their metrics); a model's row is deleted, then its blob. The first pass (``swept`` empty) covers
    every committed round, deleting blobs already gone at no harm.
    """
    report = Report()
    with session_scope(engine) as s:
        lasts = _last_committed(s)
        experiments = {e.experiment_id: e for e in s.exec(select(Experiment)).all()}
        work = []
        for exp_id, last in lasts.items():
            exp = experiments.get(exp_id)
            if exp is None or swept.get(exp_id) == last:
                continue
            rules = rules_for(settings, exp.config)
            if not rules.enabled:
                swept[exp_id] = last
                continue
            start = swept.get(exp_id, 0)
            update_keys = []
            if not rules.keep_updates:
                update_keys = list(
                    s.exec(
                        select(Update.blob_key).where(
                            Update.experiment_id == exp_id, Update.round > start, Update.round <= last
                        )
                    )
                )
            models = s.exec(
                select(GlobalModel).where(GlobalModel.experiment_id == exp_id, GlobalModel.round < last)
            ).all()
            gone = [m for m in models if not rules.keeps_model(m.round, last, _final_round(exp))]
            work.append((exp_id, last, start, update_keys, [(m.model_id, m.blob_key) for m in gone]))
    for exp_id, last, start, update_keys, gone in work:
        _delete(blobs, update_keys, report)
        if gone:
            with session_scope(engine) as s:
                s.exec(delete(GlobalModel).where(GlobalModel.model_id.in_([m for m, _ in gone])))  # type: ignore[attr-defined]
            _delete(blobs, [key for _, key in gone], report)
        _delete(blobs, [state_key(exp_id, r) for r in range(max(start - 1, 1), last)], report)
        _delete(blobs, _round_records(blobs, exp_id, last), report)
        swept[exp_id] = last
    return report


def _round_records(blobs: BlobStore, exp_id: str, last: int) -> list[str]:
    """Selection details and outcomes of rounds up to ``last``: the round's rows hold what they carried."""
    keys = [*blobs.list_keys(f"selections/{exp_id}"), *blobs.list_keys(f"outcomes/{exp_id}")]
    found = ((key, _ROUND_RECORD_RE.fullmatch(key)) for key, _ in keys)
    return [key for key, m in found if m is not None and int(m.group(1)) <= last]


def _delete(blobs: BlobStore, keys: Iterable[str], report: Report) -> None:
    for key in keys:
        if blobs.exists(key):
            blobs.delete(key)
            report.deleted.append(key)


def collect_orphans(engine: Engine, blobs: BlobStore, grace_s: float, now: float | None = None) -> Report:
    """Delete blobs under ``models/``, ``state/`` and ``updates/`` that no database row refers to.

    Only blobs older than ``grace_s`` go (a blob is written before the row that records it), and nothing
    of a running experiment's rounds under way, nor its latest committed model and state: the workflow
    carries those before the database records them. Interrupted writes' temp files older than the grace go too.
    """
    now = time.time() if now is None else now
    old: list[str] = []
    for prefix in PREFIXES:
        old.extend(key for key, mtime in blobs.list_keys(prefix) if now - mtime > grace_s)
    report = Report()
    if not old:
        return report
    with session_scope(engine) as s:
        lasts = _last_committed(s)
        status = {e: st for e, st in s.exec(select(Experiment.experiment_id, Experiment.status))}
        recorded: dict[tuple[str, int], set[str]] = {}
        orphans = []
        for key in old:
            if (m := _MODEL_RE.fullmatch(key)) is not None:
                kind, exp_id, rnd = m.group(1), m.group(2), int(m.group(3))
                last = lasts.get(exp_id, 0)
                if status.get(exp_id) not in (None, *_FINISHED) and rnd >= last:
                    continue  # the running workflow may hold it before its row exists
                if kind == "models":
                    row = s.get(GlobalModel, model_id_for(exp_id, rnd))
                    used = row is not None and row.blob_key == key
                else:  # no row names a state blob: the rounds up to the latest committed one own theirs
                    used = exp_id in status and 0 < rnd <= last
            elif (m := _UPDATE_RE.fullmatch(key)) is not None and not key.rsplit("/", 1)[-1].startswith("."):
                group = (m.group(1), int(m.group(2)))
                if status.get(group[0]) not in (None, *_FINISHED) and group[1] > lasts.get(group[0], 0):
                    continue  # a round under way: an upload's blob is stored before its row
                if group not in recorded:
                    exp_id, rnd = group
                    query = select(Update.blob_key).where(Update.experiment_id == exp_id, Update.round == rnd)
                    recorded[group] = set(s.exec(query))
                used = key in recorded[group]
            elif key.rsplit("/", 1)[-1].startswith(".") and status.get(key.split("/")[1]) not in (None, *_FINISHED):
                continue  # a write in progress for a running experiment
            else:
                used = False  # an interrupted write's temp file, or a name no part of fedloom writes
            if not used:
                orphans.append(key)
    for key in orphans:
        blobs.delete(key)
        report.deleted.append(key)
    return report


def removed_model_error(session: Session, experiment_id: str, round: int) -> ModelRemoved | None:
    """The error for round ``round``'s missing global model when retention deleted it (it was committed)."""
    committed = session.exec(
        select(RoundMetrics.id).where(RoundMetrics.experiment_id == experiment_id, RoundMetrics.round == round)
    ).first()
    if committed is None:
        return None
    return ModelRemoved(
        "Model removed by retention",
        f"the global model of round {round} of experiment '{experiment_id}' was deleted by the storage "
        "retention rules (FEDLOOM_KEEP_LAST_MODELS, FEDLOOM_KEEP_MODEL_EVERY or the experiment's retention "
        "config); the latest, the final and the initial models are always kept",
    )


def clean_spool(directory: Path, started: float, grace_s: float = 60.0, session_ttl_s: float = 86400.0) -> list[str]:
    """Remove what interrupted uploads left in ``directory`` (``<data dir>/tmp``).

    Only entries untouched since ``grace_s`` before ``started`` (this process's start) go: an upload
    another process is receiving writes to its spool file at least every read timeout. Resumable
    upload sessions outlive a restart: only those untouched for ``session_ttl_s`` go.
    """
    removed: list[str] = []
    if not directory.is_dir():
        return removed
    removed += upload_sessions.expire(directory, session_ttl_s)
    cutoff = started - grace_s
    for entry in directory.iterdir():
        if entry.name == upload_sessions.SESSIONS_DIR:
            continue
        try:
            if _newest_mtime(entry) >= cutoff:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:
            continue
        removed.append(entry.name)
    if removed:
        log.info("removed %d stale upload spool entries from %s", len(removed), directory)
    return removed


def _newest_mtime(entry: Path) -> float:
    newest = entry.lstat().st_mtime
    if entry.is_dir() and not entry.is_symlink():
        for dirpath, dirs, files in os.walk(entry):
            for name in (*dirs, *files):
                try:
                    newest = max(newest, (Path(dirpath) / name).lstat().st_mtime)
                except FileNotFoundError:
                    continue
    return newest
