"""Heavy activities, on the aggregation task queue: validate, aggregate and evaluate a round's updates.

Each reads update blobs one at a time through the blob store and writes results under keys fixed
by the experiment and round, so a retry after a crash rewrites the same bytes.
"""

from __future__ import annotations

import contextvars
import functools
import math
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from sqlalchemy.engine import Engine
from sqlmodel import select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from fedloom_core.learning import weights
from fedloom_core.learning.datasets import load_test
from fedloom_core.learning.kernels import UpdateFile
from fedloom_core.learning.zoo import build_model
from fedloom_core.messages import (
    AggregateInput,
    AggregateOutput,
    EvaluateInput,
    Evaluation,
    ModelRef,
    ProcessRoundInput,
    ProcessRoundOutput,
    UpdateRef,
    ValidateInput,
    ValidationOutcome,
)
from fedloom_core.policy import trust
from fedloom_core.policy.validation import UpdateStats, measure_updates
from fedloom_core.schemas import PolicyConfig
from fedloom_core.storage.blobstore import BlobStore
from fedloom_core.storage.db import Client, ExperimentClient
from fedloom_core.storage.keys import model_id_for, model_key, state_key
from fedloom_core.storage.repo import session_scope


def heartbeat(*details: object) -> None:
    """Heartbeat when running as an activity (a no-op when called directly, e.g. in tests)."""
    if activity.in_activity():
        activity.heartbeat(*details)


# How often a heavy activity tells Temporal it is alive. The workflow's heartbeat timeout is a few
# times this, so a worker that dies mid-aggregation is noticed within seconds and the activity retried
# on another worker, while a long but healthy evaluation never times out.
KEEP_ALIVE_INTERVAL_S = 2.0


@contextmanager
def keep_alive(interval: float = KEEP_ALIVE_INTERVAL_S) -> Iterator[None]:
    """Heartbeat from a background thread while the body runs (a no-op outside an activity)."""
    if not activity.in_activity():
        yield
        return
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(interval):
            activity.heartbeat()

    # The copied context carries the activity's identity, which activity.heartbeat looks up.
    ticker = threading.Thread(target=contextvars.copy_context().run, args=(tick,), daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()


def _kept_alive(fn: Callable) -> Callable:
    """A heavy activity method: it heartbeats while it runs, and reads each blob once (``read_once``)."""

    @functools.wraps(fn)
    def wrapper(self: AggregationActivities, *args: object, **kwargs: object) -> object:
        with keep_alive(), self.blobs.read_once():
            return fn(self, *args, **kwargs)

    return wrapper


def _norm_problem(st: UpdateStats, pol: PolicyConfig) -> str | None:
    """Why an update's size is out of bounds, or None."""
    if pol.max_update_norm is not None and st.norm > pol.max_update_norm:
        return f"update norm {st.norm:.4g} exceeds max_update_norm {pol.max_update_norm:g}"
    if pol.max_norm_ratio is not None and st.norm_ratio > pol.max_norm_ratio:
        return f"update norm is {st.norm_ratio:.2f}x the round median, above max_norm_ratio {pol.max_norm_ratio:g}"
    return None


class AggregationActivities:
    """Validation, aggregation and evaluation, bound to a database engine and a blob store."""

    def __init__(self, engine: Engine, blobs: BlobStore) -> None:
        self.engine = engine
        self.blobs = blobs

    def _opener(self, refs: list[UpdateRef]):  # type: ignore[no-untyped-def]
        keys = {u.client_id: u.blob_key for u in refs}

        @contextmanager
        def opener(update: UpdateFile) -> Iterator[Path]:
            with self.blobs.open_local(keys[update.client_id]) as path:
                yield path

        return opener

    @staticmethod
    def _files(refs: list[UpdateRef]) -> list[UpdateFile]:
        return [UpdateFile(u.client_id, Path(u.blob_key), u.num_samples) for u in refs]

    @activity.defn(name="process_round")
    @_kept_alive
    def process_round(self, inp: ProcessRoundInput) -> ProcessRoundOutput:
        """Validate, aggregate and evaluate a round in one activity: one dispatch through the task queue
        instead of three. Each step writes under keys fixed by the experiment and round, so a retry
        (after a crash at any point) redoes the steps and writes the same bytes."""
        checked = self._validate(inp.validation)
        if len(checked.accepted) < inp.min_updates:
            return ProcessRoundOutput(validation=checked)
        started = time.perf_counter()
        aggregated = self._aggregate(inp.aggregation.model_copy(update={"updates": checked.accepted}))
        took = time.perf_counter() - started
        scored = checked.accepted if inp.contribution_scores else []
        evaluation = self._evaluate(inp.evaluation.model_copy(update={"model": aggregated.model, "updates": scored}))
        return ProcessRoundOutput(
            validation=checked, aggregated=aggregated, evaluation=evaluation, aggregation_time=took
        )

    # The three steps as separate activities: workflows started before "fused-round-v1" run them.

    @activity.defn(name="validate_updates")
    @_kept_alive
    def validate_updates(self, inp: ValidateInput) -> ValidationOutcome:
        return self._validate(inp)

    @activity.defn(name="aggregate_round")
    @_kept_alive
    def aggregate_round(self, inp: AggregateInput) -> AggregateOutput:
        return self._aggregate(inp)

    @activity.defn(name="evaluate_model")
    @_kept_alive
    def evaluate_model(self, inp: EvaluateInput) -> Evaluation:
        return self._evaluate(inp)

    def _validate(self, inp: ValidateInput) -> ValidationOutcome:
        """Check the round's updates (norm bound, similarity, rules); rejected ones stay out of aggregation."""
        from fedloom_core.policy import rules as policy_rules

        pol = inp.policy
        with self.blobs.open_local(inp.global_model.blob_key) as global_path:
            stats = measure_updates(global_path, self._files(inp.updates), self._opener(inp.updates))
            # Similarity is judged among the updates that pass the norm bounds: a few huge updates
            # would otherwise drag the "mean of the others" their way and make honest ones look opposite.
            sane = [u for u in inp.updates if _norm_problem(stats[u.client_id], pol) is None]
            if 1 < len(sane) < len(inp.updates):
                among_sane = measure_updates(global_path, self._files(sane), self._opener(sane))
                for cid, st in among_sane.items():
                    stats[cid] = replace(stats[cid], cosine_similarity=st.cosine_similarity)
        with session_scope(self.engine) as s:
            clients = {c.client_id: c for c in s.exec(select(Client)).all()}
            standing = {
                e.client_id: e
                for e in s.exec(select(ExperimentClient).where(ExperimentClient.experiment_id == inp.experiment_id))
            }
        rules = policy_rules.validate_rules(pol.rules) if pol.rules else []
        accepted: list[UpdateRef] = []
        rejected: dict[str, str] = {}
        out_stats: dict[str, dict[str, float]] = {}
        for ref in sorted(inp.updates, key=lambda u: u.client_id):
            st = stats[ref.client_id]
            out_stats[ref.client_id] = {
                "update_norm": st.norm,
                "norm_ratio": st.norm_ratio,
                "cosine_similarity": st.cosine_similarity,
                "anomaly": trust.anomaly_score(st.norm_ratio, st.cosine_similarity, bound=pol.max_norm_ratio),
            }
            reason = _norm_problem(st, pol)
            if reason is not None:
                pass
            elif pol.min_cosine_similarity is not None and st.cosine_similarity < pol.min_cosine_similarity:
                reason = (
                    f"cosine similarity {st.cosine_similarity:.3f} to the other updates is below "
                    f"min_cosine_similarity {pol.min_cosine_similarity:g}"
                )
            elif rules:
                client = clients.get(ref.client_id)
                own = standing.get(ref.client_id)
                context = {
                    "client_id": ref.client_id,
                    "status": client.status if client else "registered",
                    "trust_score": own.trust_score if own else (client.trust_score if client else 1.0),
                    "reliability": (own.deliveries / own.selections) if own and own.selections else None,
                    "recent_failures": own.failures if own else 0,
                    "round": inp.round,
                    "hour_utc": inp.hour_utc,
                    "weekday": inp.weekday,
                    "update_norm": st.norm,
                    "update_norm_ratio": st.norm_ratio,
                    "cosine_similarity": st.cosine_similarity,
                    "num_samples": ref.num_samples,
                    **{f"capabilities.{k}": v for k, v in (client.capabilities if client else {}).items()},
                    **{f"location.{k}": v for k, v in (client.location if client else {}).items()},
                }
                decision = policy_rules.evaluate(rules, "update_validation", context)
                if not decision.allowed:
                    reason = "; ".join(decision.reasons) or "denied by an update_validation rule"
            if reason is None:
                accepted.append(ref)
            else:
                rejected[ref.client_id] = reason
        return ValidationOutcome(accepted=accepted, rejected=rejected, stats=out_stats)

    def _aggregate(self, inp: AggregateInput) -> AggregateOutput:
        """Aggregate the round's accepted updates with the experiment's strategy, streaming the updates."""
        from fedloom_core.learning.strategies import build_strategy
        from fedloom_core.learning.strategies.base import AggregationContext

        strategy = build_strategy(inp.strategy, inp.params, inp.weighted)
        with tempfile.TemporaryDirectory(prefix="fedloom-agg-") as tmp:
            out = Path(tmp) / "global.safetensors"
            state_out = Path(tmp) / "state.safetensors"
            with self.blobs.open_local(inp.previous.blob_key) as global_path:
                prior_state = self.blobs.open_local(inp.state_key) if inp.state_key else _nothing()
                with prior_state as state_path, _not_retryable("AGGREGATION_FAILED"):
                    result = strategy.aggregate(
                        AggregationContext(
                            round=inp.round,
                            global_path=Path(global_path),
                            updates=self._files(inp.updates),
                            out_path=out,
                            state_path=Path(state_path) if state_path else None,
                            state_out_path=state_out,
                            seed=inp.seed,
                            opener=self._opener(inp.updates),
                        )
                    )
            parameters = sum(t.numel() for t in weights.load_state(out).values() if t.is_floating_point())
            info = self.blobs.put_file(model_key(inp.experiment_id, inp.round), out)
            new_state = None
            if result.wrote_state:
                new_state = self.blobs.put_file(state_key(inp.experiment_id, inp.round), state_out).key
        model = ModelRef(
            model_id=model_id_for(inp.experiment_id, inp.round),
            blob_key=info.key,
            sha256=info.sha256,
            round=inp.round,
            size_bytes=info.size,
            parameters_count=parameters,
        )
        return AggregateOutput(model=model, state_key=new_state, info=_jsonable(result.info))

    def _evaluate(self, inp: EvaluateInput) -> Evaluation:
        """Accuracy and loss on the server's held-out split, and optional leave-one-out loss deltas.

        Leave-one-out uses the (weighted) average: without update i it is
        (N * avg - n_i * w_i) / (N - n_i), one extra evaluation per update, measured against the
        plain average (which, under FedAvg, is the new global model itself and is not evaluated twice).
        The models are evaluated ``evaluation_threads()`` at a time, each on its own core.
        """
        from fedloom_core.learning.training import evaluate_states, evaluation_threads

        started = time.perf_counter()
        test = load_test(inp.dataset)
        with self.blobs.open_local(inp.model.blob_key) as path:
            state = weights.load_state(path)
        scored = sorted(self._files(inp.updates), key=lambda f: f.client_id) if len(inp.updates) > 1 else []
        with tempfile.TemporaryDirectory(prefix="fedloom-loo-") as tmp:
            models = self._evaluation_plan(inp, scored, state, Path(tmp))
            results = evaluate_states(
                functools.partial(build_model, inp.architecture, inp.input_shape, inp.num_classes),
                models.states(),
                test,
                evaluation_threads(),
            )
        accuracy, loss = results[0]
        deltas: dict[str, float] = {}
        if scored:
            base = loss if models.average_is_global else results[1][1]
            without = results[1 if models.average_is_global else 2 :]
            deltas = {f.client_id: r[1] - base for f, r in zip(scored, without, strict=True)}
        return Evaluation(
            accuracy=accuracy,
            loss=loss if math.isfinite(loss) else None,
            evaluation_time=time.perf_counter() - started,
            loo_loss_deltas={cid: d for cid, d in deltas.items() if math.isfinite(d)},
        )

    def _evaluation_plan(self, inp: EvaluateInput, scored: list[UpdateFile], state: dict, tmp: Path) -> _EvaluationPlan:
        """What to evaluate: the new global model, then (with updates to score) the plain average unless
        it equals the global model, then the average without each update in ``scored``'s order."""
        from fedloom_core.learning.kernels import fedavg

        if not scored:
            return _EvaluationPlan(state)
        avg = fedavg(scored, tmp / "avg.safetensors", weighted=inp.weighted, opener=self._opener(inp.updates))
        return _EvaluationPlan(state, avg, scored, self._opener(inp.updates), inp.weighted)


@dataclass
class _EvaluationPlan:
    """The models one evaluation looks at, produced one at a time (each leave-one-out model is a full copy)."""

    state: dict
    average: dict | None = None
    scored: list[UpdateFile] = field(default_factory=list)
    opener: Callable | None = None
    weighted: bool = True

    @functools.cached_property
    def average_is_global(self) -> bool:
        avg, state = self.average, self.state
        return (
            avg is not None
            and avg.keys() == state.keys()
            and all(avg[n].dtype == state[n].dtype and torch.equal(avg[n], state[n]) for n in avg)
        )

    def states(self) -> Iterator[dict]:
        yield self.state
        if self.average is None or self.opener is None:
            return
        avg = self.average
        if not self.average_is_global:
            yield avg
        total = sum(f.num_samples for f in self.scored) if self.weighted else len(self.scored)
        for f in self.scored:
            share = f.num_samples if self.weighted else 1
            with self.opener(f) as path, weights.mapped_tensors(path) as own:
                without = {
                    name: ((t * total - own[name] * share) / (total - share)).to(t.dtype)
                    if t.is_floating_point()
                    else t
                    for name, t in avg.items()
                }
            yield without


@contextmanager
def _not_retryable(kind: str) -> Iterator[None]:
    """Turn a strategy's ValueError (bad settings for this round) into a failure Temporal will not retry."""
    try:
        yield
    except ValueError as exc:
        raise ApplicationError(str(exc), type=kind, non_retryable=True) from None


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def _jsonable(info: dict) -> dict:
    """Strategy info with numbers as plain floats, fit for a payload and the database."""
    out = {}
    for key, value in info.items():
        if isinstance(value, dict):
            out[key] = _jsonable(value)
        elif isinstance(value, (list, tuple)):
            out[key] = [float(v) if hasattr(v, "item") else v for v in value]
        elif hasattr(value, "item"):
            out[key] = value.item()
        else:
            out[key] = value
    return out
