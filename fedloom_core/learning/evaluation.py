"""Central evaluation of a round's new global model, with leave-one-out loss deltas for contribution scores.

Leave-one-out uses the (weighted) average: without update i it is (N * avg - n_i * w_i) / (N - n_i),
one extra evaluation per update, measured against the plain average (which, under FedAvg, is the new
global model itself and is not evaluated twice).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fedloom_core.learning import weights
from fedloom_core.learning.datasets import Split
from fedloom_core.learning.delta_slices import delta_slices
from fedloom_core.learning.kernels import Opener, UpdateFile, fedavg, open_path
from fedloom_core.learning.training import evaluate_states


@dataclass
class EvaluationPlan:
    """The models one evaluation looks at, produced one at a time (each leave-one-out model is a full copy)."""

    state: dict[str, torch.Tensor]
    average: dict[str, torch.Tensor] | None = None
    scored: list[UpdateFile] = field(default_factory=list)
    opener: Opener = open_path
    weighted: bool = True

    @functools.cached_property
    def average_is_global(self) -> bool:
        """Whether the plain average is bit-identical to the new global model (FedAvg), so it is evaluated once."""
        avg, state = self.average, self.state
        return (
            avg is not None
            and avg.keys() == state.keys()
            and all(avg[n].dtype == state[n].dtype and torch.equal(avg[n], state[n]) for n in avg)
        )

    def states(self) -> Iterator[dict[str, torch.Tensor]]:
        """The global model, then the plain average unless it is the global model, then each leave-one-out model."""
        yield self.state
        if self.average is None:
            return
        avg = self.average
        if not self.average_is_global:
            yield avg
        total = sum(f.num_samples for f in self.scored) if self.weighted else len(self.scored)
        for f in self.scored:
            share = f.num_samples if self.weighted else 1
            with self.opener(f) as path, weights.mapped_tensors(path) as own:
                yield {
                    name: ((t * total - own[name] * share) / (total - share)).to(t.dtype)
                    if t.is_floating_point()
                    else t
                    for name, t in avg.items()
                }

    def loss_deltas(self, results: Sequence[tuple[float, float]]) -> dict[str, float]:
        """Each scored client's loss without its update minus the loss of the plain average (finite ones only)."""
        if not self.scored:
            return {}
        base = results[0][1] if self.average_is_global else results[1][1]
        without = results[1 if self.average_is_global else 2 :]
        deltas = {f.client_id: r[1] - base for f, r in zip(self.scored, without, strict=True)}
        return {cid: d for cid, d in deltas.items() if math.isfinite(d)}


def plan_evaluation(
    state: dict[str, torch.Tensor],
    updates: Sequence[UpdateFile],
    tmp: Path,
    *,
    weighted: bool,
    opener: Opener = open_path,
) -> EvaluationPlan:
    """What to evaluate: the new global model, plus leave-one-out models when there are two or more updates."""
    scored = sorted(updates, key=lambda f: f.client_id) if len(updates) > 1 else []
    if not scored:
        return EvaluationPlan(state)
    avg = fedavg(scored, tmp / "avg.safetensors", weighted=weighted, opener=opener)
    return EvaluationPlan(state, avg, scored, opener, weighted)


@dataclass(frozen=True)
class EvaluationResult:
    accuracy: float
    loss: float | None
    loo_loss_deltas: dict[str, float]


def evaluate_round(
    plan: EvaluationPlan, build: Callable[[], nn.Module], test: Split, threads: int = 1
) -> EvaluationResult:
    """Accuracy and loss of the plan's global model on ``test``, and the leave-one-out loss deltas."""
    results = evaluate_states(build, plan.states(), test, threads)
    accuracy, loss = results[0]
    return EvaluationResult(accuracy, loss if math.isfinite(loss) else None, plan.loss_deltas(results))


def update_alignment(
    previous_path: Path, new_path: Path, updates: Sequence[UpdateFile], opener: Opener = open_path
) -> dict[str, float]:
    """Cosine between each update's delta and the round's step (new global model minus the previous one).

    Needs no test data: contribution scores use it when the server does not evaluate. One pass over the
    coordinates with the new model and every update mapped at once (``delta_slices``), so memory holds
    K + 1 slices whatever the model's size.
    """
    ordered = sorted(updates, key=lambda u: u.client_id)
    with ExitStack() as stack:
        previous = stack.enter_context(weights.mapped_tensors(previous_path))
        new = stack.enter_context(weights.mapped_tensors(new_path))
        mapped = [stack.enter_context(weights.mapped_tensors(stack.enter_context(opener(f)))) for f in ordered]
        names = [name for name, t in new.items() if t.is_floating_point() and name in previous]
        dots = torch.zeros(len(ordered), dtype=torch.float64)
        own_sq = torch.zeros(len(ordered), dtype=torch.float64)
        step_sq = 0.0
        for _name, block in delta_slices(previous, [new, *mapped], names):
            step, deltas = block[0], block[1:]
            dots += deltas @ step
            own_sq += deltas.pow(2).sum(dim=1)
            step_sq += float(step.dot(step))
    cosines: dict[str, float] = {}
    for i, f in enumerate(ordered):
        denominator = math.sqrt(float(own_sq[i]) * step_sq)
        cosine = float(dots[i]) / denominator if denominator > 0 else 0.0
        cosines[f.client_id] = max(-1.0, min(1.0, cosine)) if math.isfinite(cosine) else 0.0
    return cosines
