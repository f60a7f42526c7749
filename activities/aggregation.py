"""Heavy activities, on the aggregation task queue: validate, aggregate and evaluate a round's updates.

Each is an adapter: it loads blobs and client records, calls the round logic in ``fedloom_core``
(``policy.validation``, ``learning.aggregation``, ``learning.evaluation``) and stores what comes out,
under keys fixed by the experiment and round, so a retry after a crash rewrites the same bytes.
The workflow imports this class for its activity references, so torch loads only inside the methods.
"""

from __future__ import annotations

import contextvars
import functools
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from sqlalchemy.engine import Engine
from temporalio import activity
from temporalio.exceptions import ApplicationError

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
from fedloom_core.storage.blobstore import BlobStore
from fedloom_core.storage.keys import model_id_for, model_key, state_key
from fedloom_core.storage.repo import session_scope

# Heartbeat period of the heavy activities; the workflow's heartbeat timeout is a few times this,
# so a worker that dies mid-aggregation is noticed within seconds and the activity retried elsewhere.
KEEP_ALIVE_INTERVAL_S = 2.0


def heartbeat(*details: object) -> None:
    """Heartbeat when running as an activity (a no-op when called directly, e.g. in tests)."""
    if activity.in_activity():
        activity.heartbeat(*details)


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
        try:
            with keep_alive(), self.blobs.read_once():
                return fn(self, *args, **kwargs)
        finally:
            _return_free_memory()

    return wrapper


def _return_free_memory() -> None:
    """Give freed tensors' memory back to the OS between a round's steps (``kernels.return_free_memory``)."""
    from fedloom_core.learning.kernels import return_free_memory

    return_free_memory()


class AggregationActivities:
    """Validation, aggregation and evaluation, bound to a database engine and a blob store."""

    def __init__(self, engine: Engine, blobs: BlobStore) -> None:
        self.engine = engine
        self.blobs = blobs

    def _opener(self, refs: list[UpdateRef]):  # type: ignore[no-untyped-def]
        keys = {u.client_id: u.blob_key for u in refs}

        @contextmanager
        def opener(update) -> Iterator[Path]:  # type: ignore[no-untyped-def]
            with self.blobs.open_local(keys[update.client_id]) as path:
                yield path

        return opener

    @staticmethod
    def _files(refs: list[UpdateRef]) -> list:
        from fedloom_core.learning.kernels import UpdateFile

        return [UpdateFile(u.client_id, Path(u.blob_key), u.num_samples) for u in refs]

    @activity.defn(name="process_round")
    @_kept_alive
    def process_round(self, inp: ProcessRoundInput) -> ProcessRoundOutput:
        """Validate, aggregate and evaluate a round in one activity; each step's writes are fixed by the round.

        With ``inp.bounded`` the round's updates are read from the database and the per-client outcome
        goes to the blob store (:meth:`_bounded`), so the result does not grow with the round's size.
        """
        v = inp.validation
        if inp.bounded:
            from fedloom_core.storage.round_outcomes import received_updates

            v = v.model_copy(update={"updates": received_updates(self.engine, v.experiment_id, v.round)})
        checked = self._validate(v)
        if len(checked.accepted) < inp.min_updates:
            done = ProcessRoundOutput(validation=checked)
            return self._bounded(v, done) if inp.bounded else done
        started = time.perf_counter()
        aggregated = self._aggregate(
            AggregateInput(
                experiment_id=v.experiment_id,
                round=v.round,
                previous=v.global_model,
                updates=checked.accepted,
                spec=inp.aggregation,
            )
        )
        took = time.perf_counter() - started
        evaluation = self._evaluate(
            EvaluateInput(
                experiment_id=v.experiment_id,
                model=aggregated.model,
                spec=inp.evaluation,
                updates=checked.accepted if v.policy.contribution_scores else [],
            )
        )
        done = ProcessRoundOutput(
            validation=checked, aggregated=aggregated, evaluation=evaluation, aggregation_time=took
        )
        return self._bounded(v, done) if inp.bounded else done

    def _bounded(self, v: ValidateInput, done: ProcessRoundOutput) -> ProcessRoundOutput:
        """The result with its per-client parts moved to a blob: counts, the model and the blob's key."""
        from fedloom_core.storage.candidates import exclusion_counts
        from fedloom_core.storage.round_outcomes import outcome_of, store_outcome

        checked = done.validation
        bounded = ProcessRoundOutput(
            validation=ValidationOutcome(accepted=[]),
            aggregation_time=done.aggregation_time,
            received=len(v.updates),
            accepted_count=len(checked.accepted),
            rejection_counts=exclusion_counts(checked.rejected),
        )
        if done.aggregated is None or done.evaluation is None:
            return bounded  # too few accepted: the workflow fails the round, nothing to record
        outcome = outcome_of(checked, done.evaluation, done.aggregated.info)
        bounded.outcome_key = store_outcome(self.blobs, v.experiment_id, v.round, outcome)
        bounded.aggregated = done.aggregated.model_copy(update={"info": {}})
        bounded.evaluation = done.evaluation.model_copy(update={"loo_loss_deltas": {}, "progress_shares": {}})
        return bounded

    # The three steps as separate activities: workflows started before "fused-round-v1" schedule them.

    @activity.defn(name="validate_updates")
    @_kept_alive
    def validate_updates(self, inp: ValidateInput) -> ValidationOutcome:
        """Validation alone."""
        return self._validate(inp)

    @activity.defn(name="aggregate_round")
    @_kept_alive
    def aggregate_round(self, inp: AggregateInput) -> AggregateOutput:
        """Aggregation alone."""
        return self._aggregate(inp)

    @activity.defn(name="evaluate_model")
    @_kept_alive
    def evaluate_model(self, inp: EvaluateInput) -> Evaluation:
        """Evaluation alone."""
        return self._evaluate(inp)

    def _validate(self, inp: ValidateInput) -> ValidationOutcome:
        """Check the round's updates (readable, norm bounds, similarity, rules); rejected ones stay out of aggregation.

        The validate dry run calls the same ``judge_round``. An update whose blob is missing or corrupt
        is rejected (UPDATE_UNREADABLE) rather than failing the activity, so the round completes.
        """
        from fedloom_core.storage.round_validation import judge_round

        verdict = judge_round(
            self.engine,
            self.blobs,
            experiment_id=inp.experiment_id,
            round=inp.round,
            global_key=inp.global_model.blob_key,
            updates=inp.updates,
            policy=inp.policy,
            hour_utc=inp.hour_utc,
            weekday=inp.weekday,
        )
        by_client = {u.client_id: u for u in inp.updates}
        # Accepted updates are aggregated with their weights as the policy caps them (max_weight_ratio).
        accepted = [
            by_client[cid].model_copy(update={"num_samples": verdict.weights.get(cid, by_client[cid].num_samples)})
            for cid in verdict.accepted
        ]
        _return_free_memory()  # the measurement's slices: FedAvg's accumulator should not sit on top of them
        return ValidationOutcome(accepted=accepted, rejected=verdict.rejected, stats=verdict.stats)

    def _aggregate(self, inp: AggregateInput) -> AggregateOutput:
        """Aggregate the round's accepted updates with the experiment's strategy, streaming the updates."""
        from fedloom_core.learning.aggregation import aggregate_files

        spec = inp.spec
        with tempfile.TemporaryDirectory(prefix="fedloom-agg-") as tmp:
            out, state_out = Path(tmp) / "global.safetensors", Path(tmp) / "state.safetensors"
            prior = self.blobs.open_local(spec.state_key) if spec.state_key else nullcontext(None)
            with self.blobs.open_local(inp.previous.blob_key) as global_path, prior as state_path:
                try:
                    outcome = aggregate_files(
                        strategy=spec.strategy,
                        params=spec.params,
                        weighted=spec.weighted,
                        round=inp.round,
                        seed=spec.seed,
                        global_path=Path(global_path),
                        updates=self._files(inp.updates),
                        out=out,
                        state_path=Path(state_path) if state_path else None,
                        state_out=state_out,
                        opener=self._opener(inp.updates),
                    )
                except ValueError as exc:
                    # Settings this round cannot use: retrying would fail the same way.
                    raise ApplicationError(str(exc), type="AGGREGATION_FAILED", non_retryable=True) from None
                finally:
                    _return_free_memory()  # the strategy's accumulator, before the evaluation's slices
            info = self.blobs.put_file(model_key(inp.experiment_id, inp.round), out)
            new_state = None
            if outcome.wrote_state:
                new_state = self.blobs.put_file(state_key(inp.experiment_id, inp.round), state_out).key
        model = ModelRef(
            model_id=model_id_for(inp.experiment_id, inp.round),
            blob_key=info.key,
            sha256=info.sha256,
            round=inp.round,
            size_bytes=info.size,
            parameters_count=outcome.parameters_count,
        )
        return AggregateOutput(model=model, state_key=new_state, info=outcome.info)

    def _evaluate(self, inp: EvaluateInput) -> Evaluation:
        """Accuracy and loss on the server's held-out split, and leave-one-out loss deltas of the updates."""
        from fedloom_core.learning import weights
        from fedloom_core.learning.datasets import load_test
        from fedloom_core.learning.evaluation import evaluate_round, plan_evaluation
        from fedloom_core.learning.training import evaluation_threads
        from fedloom_core.learning.zoo import build_model

        started = time.perf_counter()
        spec = inp.spec
        if not spec.central:
            return self._progress(inp, started)
        test = load_test(spec.dataset)
        with self.blobs.open_local(inp.model.blob_key) as path:
            state = weights.load_state(path)
        build = functools.partial(build_model, spec.architecture, spec.input_shape, spec.num_classes)
        with tempfile.TemporaryDirectory(prefix="fedloom-loo-") as tmp:
            files = self._files(inp.updates)
            plan = plan_evaluation(state, files, Path(tmp), weighted=spec.weighted, opener=self._opener(inp.updates))
            result = evaluate_round(plan, build, test, evaluation_threads())
        return Evaluation(
            accuracy=result.accuracy,
            loss=result.loss,
            evaluation_time=time.perf_counter() - started,
            loo_loss_deltas=result.loo_loss_deltas,
        )

    def _progress(self, inp: EvaluateInput, started: float) -> Evaluation:
        """No central evaluation: each scored update's share of the round's progress (``trust.progress_shares``)."""
        from fedloom_core.learning.evaluation import update_alignment
        from fedloom_core.policy.trust import progress_shares

        shares: dict[str, float] = {}
        if inp.updates:
            previous = self._previous_model(inp.experiment_id, inp.model.round)
            if previous is not None:
                with self.blobs.open_local(previous) as prev_path, self.blobs.open_local(inp.model.blob_key) as path:
                    cosines = update_alignment(
                        Path(prev_path), Path(path), self._files(inp.updates), self._opener(inp.updates)
                    )
                samples = {u.client_id: u.num_samples if inp.spec.weighted else 1 for u in inp.updates}
                shares = progress_shares(cosines, samples)
        return Evaluation(
            accuracy=None, loss=None, evaluation_time=time.perf_counter() - started, progress_shares=shares
        )

    def _previous_model(self, experiment_id: str, round: int) -> str | None:
        """Blob key of the global model the round started from (the previous round's), if recorded."""
        from fedloom_core.storage.db import GlobalModel

        with session_scope(self.engine) as s:
            row = s.get(GlobalModel, model_id_for(experiment_id, round - 1))
        return row.blob_key if row is not None else None

    def all(self) -> list:
        """The bound activity methods, for registration on a worker."""
        return [self.process_round, self.validate_updates, self.aggregate_round, self.evaluate_model]
