"""Where the exporter writes: an MLflow run per experiment, or a TensorBoard log dir per experiment.

Both import their library on first use, so the extras stay optional: ``fedloom[mlflow]``,
``fedloom[tensorboard]``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

MLFLOW_EXPERIMENT = "fedloom"
EXPERIMENT_TAG = "fedloom.experiment_id"
# MLflow caps a param value at 6000 characters and a batch at 100 params and 1000 metrics.
_PARAM_MAX = 500
_BATCH_PARAMS = 100
_BATCH_METRICS = 1000
_KEY = re.compile(r"[^\w./ -]")


def metric_key(name: str) -> str:
    """A metric name both trackers accept."""
    return _KEY.sub("_", name)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``, values cut to a length MLflow accepts."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[metric_key(name)] = str(value)[:_PARAM_MAX]
    return out


class MlflowSink:
    """One MLflow run per experiment, tagged with its id, in the MLflow experiment ``fedloom``."""

    name = "mlflow"

    def __init__(self, tracking_uri: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._experiment_id: str | None = None

    def _mlflow_experiment(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
            self._experiment_id = found.experiment_id if found else self.client.create_experiment(MLFLOW_EXPERIMENT)
        return self._experiment_id

    def open(self, experiment_id: str, name: str, params: dict[str, Any], run_id: str | None) -> str:
        """The experiment's run: the one recorded, else the one tagged with its id, else a new one."""
        if run_id:
            return run_id
        mlflow_exp = self._mlflow_experiment()
        runs = self.client.search_runs(
            [mlflow_exp], filter_string=f"tags.`{EXPERIMENT_TAG}` = '{experiment_id}'", max_results=1
        )
        if runs:
            return runs[0].info.run_id
        run = self.client.create_run(mlflow_exp, run_name=name or experiment_id, tags={EXPERIMENT_TAG: experiment_id})
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), _BATCH_PARAMS):
            self.client.log_batch(run.info.run_id, params=items[i : i + _BATCH_PARAMS])
        return run.info.run_id

    def log(self, run_id: str, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(metric_key(k), float(v), now, step) for k, v in sorted(scalars.items())]
        for i in range(0, len(items), _BATCH_METRICS):
            self.client.log_batch(run_id, metrics=items[i : i + _BATCH_METRICS])

    def finish(self, run_id: str, status: str, model: Path | None) -> None:
        if model is not None:
            self.client.log_artifact(run_id, str(model), "model")
        state = {"completed": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(run_id, state)

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")


class TensorBoardSink:
    """Event files under ``<dir>/<experiment id>/``, one scalar per metric and round."""

    name = "tensorboard"

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self._writers: dict[str, Any] = {}

    def open(self, experiment_id: str, name: str, params: dict[str, Any], run_id: str | None) -> str:
        return experiment_id

    def log(self, run_id: str, step: int, scalars: dict[str, float]) -> None:
        writer = self._get(run_id)
        for key, value in sorted(scalars.items()):
            writer.add_scalar(metric_key(key), float(value), step)
        writer.flush()

    def finish(self, run_id: str, status: str, model: Path | None) -> None:
        writer = self._writers.pop(run_id, None)
        if writer is not None:
            writer.close()

    def reopen(self, run_id: str) -> None:
        """Nothing to do: a new writer appends to the same directory."""

    def _get(self, run_id: str) -> Any:
        writer = self._writers.get(run_id)
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            writer = self._writers[run_id] = SummaryWriter(log_dir=str(self.log_dir / run_id))
        return writer
