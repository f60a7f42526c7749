"""The tracking exporter: tails the database's round records and writes them to MLflow and TensorBoard.

Each sink has a thread of its own in the worker, never inside a round: an unreachable tracker is
logged and retried with back-off while rounds (and the other sink) go on. Export is idempotent: the
last exported round of each experiment is kept in ``<data dir>/tracking/<sink>.json``, written
after every round, so a restart resumes where it stopped. One exporter per data dir (a file lock);
see docs/operations.md.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from fedloom_core.settings import Settings
from fedloom_core.storage.blobstore import BlobStore
from fedloom_core.storage.db import (
    ClientEvaluation,
    ClientMetrics,
    ClientRoundScore,
    Experiment,
    GlobalModel,
    RoundMetrics,
)

log = logging.getLogger("fedloom.tracking")
_held: list[Any] = []  # the exporter lock files this process holds, for its lifetime
ENDED = ("completed", "stopped", "failed")
MAX_BACKOFF_S = 60.0


class Sink(Protocol):
    name: str

    def open(self, experiment_id: str, name: str, params: dict[str, Any], run_id: str | None) -> str: ...
    def log(self, run_id: str, step: int, scalars: dict[str, float]) -> None: ...
    def finish(self, run_id: str, status: str, model: Path | None) -> None: ...
    def reopen(self, run_id: str) -> None: ...


def _put(out: dict[str, float], key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:  # NaN is left out
        return
    out[key] = float(value)


def round_scalars(session: Session, experiment_id: str, after: int) -> list[tuple[int, dict[str, float]]]:
    """Each recorded round past ``after``: accuracy and loss (central and federated), timings, clients."""
    rows = session.exec(
        select(RoundMetrics)
        .where(RoundMetrics.experiment_id == experiment_id, RoundMetrics.round > after)
        .order_by(RoundMetrics.round)  # type: ignore[arg-type]
    ).all()
    points: list[tuple[int, dict[str, float]]] = []
    for row in rows:
        out: dict[str, float] = {}
        _put(out, "accuracy", row.global_accuracy)
        _put(out, "loss", row.global_loss)
        for key, value in (row.federated_metrics or {}).items():
            _put(out, f"federated_{key}", value)
        _put(out, "round_duration", row.round_duration)
        _put(out, "aggregation_time", row.aggregation_time)
        _put(out, "evaluation_time", row.evaluation_time)
        _put(out, "participating_clients", row.participating_clients)
        out.update(_client_scalars(session, experiment_id, row.round))
        points.append((row.round, out))
    return points


def _client_scalars(session: Session, experiment_id: str, rnd: int) -> dict[str, float]:
    out: dict[str, float] = {}
    where = dict(experiment_id=experiment_id, round=rnd)
    for m in session.exec(select(ClientMetrics).filter_by(**where)).all():
        base = f"client/{m.client_id}/"
        _put(out, base + "accuracy", m.local_accuracy)
        _put(out, base + "loss", m.local_loss)
        _put(out, base + "training_time", m.training_time)
        _put(out, base + "data_samples", m.data_samples)
    for sc in session.exec(select(ClientRoundScore).filter_by(**where)).all():
        _put(out, f"client/{sc.client_id}/trust_score", sc.trust_score)
        _put(out, f"client/{sc.client_id}/contribution", sc.contribution)
    for ev in session.exec(select(ClientEvaluation).filter_by(**where)).all():
        _put(out, f"client/{ev.client_id}/federated_accuracy", ev.accuracy)
        _put(out, f"client/{ev.client_id}/federated_loss", ev.loss)
    return out


class State:
    """One sink's last exported round per experiment, kept in a JSON file (replaced atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.data: dict[str, dict[str, Any]] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def get(self, experiment_id: str) -> dict[str, Any]:
        return self.data.setdefault(experiment_id, {"round": 0, "done": False, "run_id": None})

    def save(self) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
        with os.fdopen(fd, "w") as f:
            json.dump(self.data, f)
        os.replace(tmp, self.path)


class Exporter:
    """Exports every started experiment to one sink; ``export_once`` is one pass, ``run`` loops."""

    def __init__(self, engine: Engine, blobs: BlobStore, sink: Sink, state_dir: Path) -> None:
        self.engine, self.blobs, self.sink = engine, blobs, sink
        state_dir.mkdir(parents=True, exist_ok=True)
        self.state = State(state_dir / f"{sink.name}.json")
        self._stop = threading.Event()

    def export_once(self) -> bool:
        """One pass; False if the sink failed (retried on a later pass, from the last exported round)."""
        try:
            with Session(self.engine) as s:
                experiments = s.exec(select(Experiment).where(Experiment.started_at.is_not(None))).all()  # type: ignore[union-attr]
            for exp in experiments:
                self._export(self.sink, exp)
        except Exception as exc:  # noqa: BLE001 - a tracker's failure never reaches a round
            log.warning("exporting to %s failed (retrying): %s", self.sink.name, exc)
            return False
        return True

    def _export(self, sink: Sink, exp: Experiment) -> None:
        st = self.state.get(exp.experiment_id)
        if st["done"]:
            if exp.status in ENDED:
                return
            # Continued after it ended (POST /experiments/{id}/continue): the same run goes on.
            sink.reopen(st["run_id"])
            st["done"] = False
            self.state.save()
        with Session(self.engine) as s:
            points = round_scalars(s, exp.experiment_id, st["round"])
        ended = exp.status in ENDED
        if not points and not ended:
            return
        if st["run_id"] is None:
            st["run_id"] = sink.open(exp.experiment_id, exp.name, exp.config, None)
            self.state.save()
        for rnd, scalars in points:
            sink.log(st["run_id"], rnd, scalars)
            st["round"] = rnd
            self.state.save()
        if ended:
            with self._final_model(exp) as model:
                sink.finish(st["run_id"], exp.status, model)
            st["done"] = True
            self.state.save()

    @contextmanager
    def _final_model(self, exp: Experiment) -> Iterator[Path | None]:
        """The experiment's final global model as a local file named after it, or None."""
        with Session(self.engine) as s:
            row = s.get(GlobalModel, exp.final_model_id) if exp.final_model_id else None
        if row is None:
            yield None
            return
        with tempfile.TemporaryDirectory(prefix="fedloom-export-") as tmp:
            path = Path(tmp) / f"{row.model_id}{Path(row.blob_key).suffix or '.safetensors'}"
            with open(path, "wb") as f:
                for chunk in self.blobs.iter_bytes(row.blob_key):
                    f.write(chunk)
            yield path

    def run(self, every_s: float) -> None:
        """Export until ``stop()``, backing off (to a minute) while a sink keeps failing."""
        delay = every_s
        while not self._stop.is_set():
            delay = every_s if self.export_once() else min(MAX_BACKOFF_S, delay * 2)
            self._stop.wait(delay)

    def stop(self) -> None:
        self._stop.set()


def build_sinks(settings: Settings) -> list[Sink]:
    """The sinks the settings ask for; a missing extra is logged and left out."""
    sinks: list[Sink] = []
    if settings.mlflow_tracking_uri:
        try:
            from fedloom_core.tracking.sinks import MlflowSink

            sinks.append(MlflowSink(settings.mlflow_tracking_uri))
        except ImportError:
            log.error("FEDLOOM_MLFLOW_TRACKING_URI is set but mlflow is missing: pip install 'fedloom[mlflow]'")
    if settings.tensorboard_dir:
        from fedloom_core.tracking.sinks import TensorBoardSink

        sinks.append(TensorBoardSink(settings.tensorboard_dir))
    return sinks


def start_exporter(settings: Settings, engine: Engine | None = None, blobs: BlobStore | None = None) -> list[Exporter]:
    """Start a thread per configured tracker, unless another process already exports this data dir."""
    if not (settings.mlflow_tracking_uri or settings.tensorboard_dir):
        return []
    state_dir = settings.data_dir / "tracking"
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = open(state_dir / "exporter.lock", "w")  # noqa: SIM115 - held for the life of the process
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        log.info("another process exports this data dir's experiments")
        lock.close()
        return []
    _held.append(lock)
    if engine is None or blobs is None:
        from fedloom_core.storage.blobstore import open_blob_store
        from fedloom_core.storage.db import make_engine

        engine = engine or make_engine(settings.database_url)
        blobs = blobs or open_blob_store(settings.blob_url, settings.s3_endpoint_url)
    try:
        sinks = build_sinks(settings)
    except Exception:  # noqa: BLE001 - a tracker that cannot even be set up must not stop the worker
        log.exception("experiment tracking is off: its tracker could not be set up")
        return []
    exporters = [Exporter(engine, blobs, sink, state_dir) for sink in sinks]
    for exporter in exporters:
        name = f"fedloom-tracking-{exporter.sink.name}"
        threading.Thread(target=exporter.run, args=(settings.tracking_poll_s,), name=name, daemon=True).start()
        log.info("exporting experiments to %s", exporter.sink.name)
    return exporters
