"""Federate your own PyTorch model: ``run_client`` and ``ClientApp``.

``run_client`` joins a fedloom server as one site: it registers (admin key or enrollment token) or
uses the client's own key as it is, then waits for tasks. For ``train`` it loads the round's global
weights into ``model`` (after checking they fit), calls ``train_fn(model, config)`` and uploads the
weights with the returned metrics; for ``evaluate`` it loads that round's new global model and
reports ``evaluate_fn(model, config)``. It returns when the experiment it saw running ends.

Torch comes with the ``torch`` extra; this module imports it only when a run starts.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedloom._client import FLAPIError, FLClient
from fedloom._extras import require_torch
from fedloom._retry import Backoff, with_retries

log = logging.getLogger("fedloom.client")

Metrics = dict[str, Any]
TrainFn = Callable[[Any, dict[str, Any]], Mapping[str, Any]]
EvaluateFn = Callable[[Any, dict[str, Any]], Mapping[str, Any]]
# What a site without an evaluate_fn reports: it cannot evaluate, and the average leaves it out.
NO_EVALUATION: Metrics = {"data_samples": 0, "loss": 0.0}


class ModelMismatchError(ValueError):
    """The experiment's global model does not fit this site's model (names, shapes or dtypes)."""


class RegistrationError(RuntimeError):
    """The key given cannot act for this client: not its own, not the admin key, not an enrollment token."""


@dataclass
class RunOptions:
    """``run_client``'s keyword options.

    ``model`` may also be a function of the task returning the module, for a client that builds
    the architecture the experiment names; ``check_task(task)`` runs before each train or evaluate
    task and raises to refuse it.
    """

    client_config: dict[str, Any] | None = None
    capabilities: dict[str, Any] | None = None
    max_idle_s: float | None = None
    long_poll_s: float = 10.0
    backoff: Backoff = field(default_factory=Backoff)
    check_task: Callable[[dict[str, Any]], None] | None = None
    work_dir: str | Path | None = None
    timeout: float = 60.0


@dataclass
class ClientApp:
    """A site's model, training and evaluation, runnable by ``fedloom client --app module:attr``."""

    model: Any
    train_fn: TrainFn
    evaluate_fn: EvaluateFn | None = None
    client_id: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def run(self, server: str, api_key: str, client_id: str | None = None, **options: Any) -> int:
        """Run this app as ``client_id`` (or its own) until the experiment ends; returns rounds trained."""
        cid = client_id or self.client_id
        if not cid:
            raise ValueError("a client id is needed: pass client_id (--client-id) or set ClientApp.client_id")
        merged = {**self.options, **options}
        return run_client(server, api_key, cid, self.model, self.train_fn, self.evaluate_fn, **merged)


def run_client(
    server: str,
    api_key: str,
    client_id: str,
    model: Any,
    train_fn: TrainFn,
    evaluate_fn: EvaluateFn | None = None,
    **options: Any,
) -> int:
    """Take part in experiments as ``client_id`` until one seen running ends; returns the rounds trained.

    ``train_fn(model, config)`` trains ``model`` in place and returns metrics with ``data_samples``;
    ``evaluate_fn(model, config)`` returns ``data_samples``, ``loss`` and optionally ``accuracy``.
    ``config`` is the round's training config. Options: see :class:`RunOptions`.
    """
    require_torch("fedloom.run_client")
    opts = RunOptions(**options)
    given = FLClient(server, api_key, opts.timeout)
    try:
        api = register(given, client_id, opts)
    except BaseException:
        given.close()
        raise
    try:
        return serve_tasks(api, client_id, model, train_fn, evaluate_fn, opts)
    finally:
        api.close()


def register(api: FLClient, client_id: str, opts: RunOptions | None = None) -> FLClient:
    """A client that acts for ``client_id``: ``api`` if its key may already, else one on the key that
    registering with ``api``'s key (admin key or enrollment token) returns."""
    opts = opts or RunOptions()
    try:
        with_retries(lambda: api.get_client(client_id), opts.backoff, f"{client_id}: status check")
        log.info("%s is registered; continuing with the given key", client_id)
        return api
    except FLAPIError as exc:
        if exc.status == 403:
            raise RegistrationError(f"this API key may not act for client {client_id!r}: {exc}") from None
        if exc.status not in (401, 404):
            raise
        is_admin = exc.status == 404  # it may read any client: the admin key
    try:
        reg = with_retries(
            lambda: api.register_client(client_id, opts.client_config, opts.capabilities),
            opts.backoff,
            f"{client_id}: registration",
        )
    except FLAPIError as exc:
        if exc.status == 409 and is_admin:  # registered meanwhile
            return api
        if exc.status == 409:
            raise RegistrationError(
                f"client {client_id!r} is already registered: run it with the API key its registration returned"
            ) from None
        if exc.status == 401:
            raise RegistrationError(
                "the server refused this API key: give the client's own key, the admin key or an enrollment token"
            ) from None
        raise
    log.info("%s registered", client_id)
    api.close()
    return api.with_key(reg["api_key"])


@dataclass
class _Watch:
    """When to stop: the experiment this client saw running (or one that ran while it waited) ended."""

    seen_running: set[str] = field(default_factory=set)
    first_poll: bool = True
    ended_before_join: str | None = None
    idle_since: float = field(default_factory=time.monotonic)

    def ended(self, task: dict[str, Any]) -> bool:
        status, exp_id = task.get("status"), task.get("experiment_id")
        if task.get("experiment_status") == "running" and exp_id:
            self.seen_running.add(exp_id)
        if self.first_poll:
            # An experiment already over when we joined is not ours to end on; any other that is
            # done ran while we waited (possibly all within one long-poll) and ends our run.
            self.ended_before_join = exp_id if status == "done" else None
            self.first_poll = False
        return status == "done" and (exp_id in self.seen_running or bool(exp_id and exp_id != self.ended_before_join))


def serve_tasks(
    api: FLClient,
    client_id: str,
    model: Any,
    train_fn: TrainFn,
    evaluate_fn: EvaluateFn | None,
    opts: RunOptions,
) -> int:
    """Poll and do tasks as ``client_id`` until the experiment ends; returns the rounds trained.

    The server answers ``done`` only once no experiment runs, so a client serving several (each task
    names its experiment) keeps going until the last of them ends.
    """
    watch = _Watch()
    trained = 0
    evaluated: set[tuple[str, int]] = set()
    with tempfile.TemporaryDirectory(prefix=f"fedloom-{client_id}-", dir=opts.work_dir) as tmp:
        work = Path(tmp)
        while True:
            task = with_retries(
                lambda: api.get_task(client_id, wait=opts.long_poll_s), opts.backoff, f"{client_id}: task poll"
            )
            if watch.ended(task):
                log.info(
                    "%s: experiment %s ended (%s)", client_id, task.get("experiment_id"), task.get("experiment_status")
                )
                return trained
            status = task.get("status")
            if status not in ("train", "evaluate"):
                if opts.max_idle_s is not None and time.monotonic() - watch.idle_since > opts.max_idle_s:
                    return trained
                continue
            watch.idle_since = time.monotonic()
            key = (str(task.get("experiment_id")), int(task.get("round", 0)))
            if status == "evaluate" and key in evaluated:
                time.sleep(1.0)  # reported already; the server has not moved on yet
                continue
            if opts.check_task is not None:
                opts.check_task(task)
            try:
                if status == "train":
                    trained += _train(api, client_id, task, model, train_fn, work, opts.backoff)
                else:
                    _evaluate(api, client_id, task, model, evaluate_fn, work, opts.backoff)
                    evaluated.add(key)
            except FLAPIError as exc:
                if exc.status != 409:
                    raise
                # The round closed while we worked: the next poll says what to do.
                log.warning("%s round %s: %s", client_id, task.get("round"), exc)


def _module(model: Any, task: dict[str, Any]) -> Any:
    """The ``torch.nn.Module`` for ``task``: ``model`` itself, or what it builds for the task."""
    import torch

    return model if isinstance(model, torch.nn.Module) else model(task)


def _load_global(api: FLClient, task: dict[str, Any], module: Any, work: Path, backoff: Backoff) -> float:
    """Download the task's global model and load it into ``module`` once it fits; the download's seconds."""
    from safetensors.torch import load_file

    started = time.perf_counter()
    path = work / "global.safetensors"
    with_retries(lambda: api.download_model(task["model_id"], path), backoff, f"download {task['model_id']}")
    seconds = time.perf_counter() - started
    state = load_file(str(path))
    check_fits(state, module.state_dict(), task["model_id"])
    module.load_state_dict(state, strict=True)
    return seconds


def check_fits(global_state: Mapping[str, Any], local_state: Mapping[str, Any], model_id: str = "global model") -> None:
    """Raise :class:`ModelMismatchError` naming the first tensor whose name, shape or dtype differs."""
    for name, local in local_state.items():
        remote = global_state.get(name)
        if remote is None:
            raise ModelMismatchError(f"{model_id} has no tensor {name!r}, which this model has")
        if tuple(remote.shape) != tuple(local.shape):
            raise ModelMismatchError(
                f"tensor {name!r} has shape {tuple(remote.shape)} in {model_id} but {tuple(local.shape)} in this model"
            )
        if remote.dtype != local.dtype:
            raise ModelMismatchError(f"tensor {name!r} is {remote.dtype} in {model_id} but {local.dtype} in this model")
    for name in global_state:
        if name not in local_state:
            raise ModelMismatchError(f"{model_id} has a tensor {name!r} that this model does not have")


def plain_metrics(metrics: Mapping[str, Any], what: str, required: tuple[str, ...]) -> Metrics:
    """``metrics`` as JSON numbers (tensors and numpy scalars unwrapped); ValueError if ``required`` are missing."""
    if not isinstance(metrics, Mapping):
        raise ValueError(f"{what} must return a dict of metrics, got {type(metrics).__name__}")
    out = {str(k): (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
    missing = [k for k in required if k not in out]
    if missing:
        raise ValueError(f"{what} must return {', '.join(required)} in its metrics; missing {', '.join(missing)}")
    samples = out["data_samples"]
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(f"{what}: data_samples must be a non-negative integer, got {samples!r}")
    return out


def _train(api, client_id, task, model, train_fn, work, backoff) -> int:  # type: ignore[no-untyped-def]
    module = _module(model, task)
    download_s = _load_global(api, task, module, work, backoff)
    config = dict(task.get("training_config") or {})
    metrics = plain_metrics(train_fn(module, config), "train_fn", ("data_samples",))
    if metrics["data_samples"] < 1:
        raise ValueError("train_fn: data_samples must be at least 1 for a training update")
    metrics.setdefault("communication_time", download_s)
    from fedloom._client import state_dict_bytes

    out = work / "update.safetensors"
    out.write_bytes(state_dict_bytes(module.state_dict()))
    started = time.perf_counter()
    exp_id = task.get("experiment_id")
    with_retries(
        lambda: api.upload_model_update(client_id, out, metrics, experiment_id=exp_id), backoff, f"{client_id}: upload"
    )
    log.info(
        "%s round %s: %s (%.2fs upload)", client_id, task["round"], _summary(metrics), time.perf_counter() - started
    )
    return 1


def _evaluate(api, client_id, task, model, evaluate_fn, work, backoff) -> None:  # type: ignore[no-untyped-def]
    if evaluate_fn is None:
        metrics = dict(NO_EVALUATION)
    else:
        module = _module(model, task)
        _load_global(api, task, module, work, backoff)
        config = dict(task.get("training_config") or {})
        metrics = plain_metrics(evaluate_fn(module, config), "evaluate_fn", ("data_samples", "loss"))
    exp_id, rnd = task["experiment_id"], int(task["round"])
    with_retries(
        lambda: api.upload_evaluation(client_id, exp_id, rnd, metrics), backoff, f"{client_id}: evaluation report"
    )
    log.info("%s round %s evaluation: %s", client_id, rnd, _summary(metrics))


def _summary(metrics: Metrics) -> str:
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
