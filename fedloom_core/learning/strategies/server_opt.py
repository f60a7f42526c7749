"""Server optimizers (Reddi et al., "Adaptive Federated Optimization"): FedAvgM, FedAdam, FedYogi, FedAdagrad.

Each round the server treats the pseudo-gradient ``delta = FedAvg(updates) - global`` as a
gradient step and applies its own optimizer to it. The optimizer's slots (momentum, first and
second moments) are kept per floating-point tensor in float32 (float64 for float64 tensors) in
the strategy's state file, under the keys ``<strategy>/<slot>/<tensor name>``. Integer tensors
are FedAvg's: the first update's in client-id order.

Initial state (no ``ctx.state_path``): momentum and first moments are zero; second moments are
``tau**2``, the lower bound the paper asks for, so the first step is well scaled and never 0/0.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import torch

from fedloom_core.learning.kernels import fedavg_weights
from fedloom_core.learning.strategies.averaging import mean_of_updates
from fedloom_core.learning.strategies.base import AggregateResult, AggregationContext
from fedloom_core.learning.strategies.params import ConfiguredStrategy
from fedloom_core.learning.strategies.specs import FEDADAGRAD, FEDADAM, FEDAVGM, FEDYOGI
from fedloom_core.learning.strategies.streaming import Structure, canonical, is_float, work_dtype
from fedloom_core.learning.weights import compare_structure, mapped_tensors, save_state, structure


class ServerOptimizer(ConfiguredStrategy):
    """Common round of the server optimizers: mean, pseudo-gradient, optimizer step, state file."""

    #: Names of the per-tensor state slots, in the order they are stored.
    SLOTS: ClassVar[tuple[str, ...]] = ()

    def initial(self, slot: str, like: torch.Tensor) -> torch.Tensor:
        """A slot's value before the first round: zeros (subclasses start ``v`` at tau**2)."""
        return torch.zeros_like(like)

    def step(self, delta: torch.Tensor, slots: dict[str, torch.Tensor]) -> torch.Tensor:
        """Update ``slots`` (replacing its entries) from ``delta`` and return the step direction."""
        raise NotImplementedError

    def _key(self, slot: str, tensor: str) -> str:
        return f"{self.name}/{slot}/{tensor}"

    def aggregate(self, ctx: AggregationContext) -> AggregateResult:
        """Write ``global + server_lr * direction`` and the new optimizer state."""
        ordered = canonical(ctx.updates)
        if ctx.state_out_path is None:
            raise ValueError(f"{self.name} keeps server state across rounds: state_out_path is required")
        expected = structure(ctx.global_path)
        weights = fedavg_weights(ordered, self.params["weighted"])
        mean = mean_of_updates(ordered, weights, ctx.opener, expected)
        expected_state = {
            self._key(slot, name): (dtype_text if dtype_text == "F64" else "F32", shape)
            for name, (dtype_text, shape) in expected.items()
            if is_float(dtype_text)
            for slot in self.SLOTS
        }
        new_model: dict[str, torch.Tensor] = {}
        new_state: dict[str, torch.Tensor] = {}
        sq_norm = 0.0
        with _previous_state(ctx.state_path, expected_state) as state, mapped_tensors(ctx.global_path) as globals_:
            for name, g in globals_.items():
                if not g.is_floating_point():
                    new_model[name] = mean.pop(name)
                    continue
                delta = mean.pop(name).sub_(g)
                sq_norm += float(torch.dot(delta.view(-1), delta.view(-1)))
                if state is None:
                    slots = {slot: self.initial(slot, delta) for slot in self.SLOTS}
                else:
                    slots = {slot: state[self._key(slot, name)] for slot in self.SLOTS}
                direction = self.step(delta, slots)
                new = torch.add(g.to(work_dtype(g.dtype)), direction, alpha=self.params["server_lr"])
                new_model[name] = new.to(g.dtype)
                for slot in self.SLOTS:
                    new_state[self._key(slot, name)] = slots[slot]
                del delta, direction, new, slots
        save_state(new_model, ctx.out_path)
        save_state(new_state, ctx.state_out_path)
        return AggregateResult(
            wrote_state=True, info={"pseudo_gradient_norm": sq_norm**0.5, "resumed_state": ctx.state_path is not None}
        )


@contextmanager
def _previous_state(path: Path | None, expected: Structure) -> Iterator[dict[str, torch.Tensor] | None]:
    """The previous round's state tensors (memory-mapped), after checking they fit the strategy and model."""
    if path is None:
        yield None
        return
    problems = compare_structure(structure(path), expected)
    if problems:
        raise ValueError(f"the server state does not fit this strategy and model: {'; '.join(problems[:5])}")
    with mapped_tensors(path) as tensors:
        yield tensors


class FedAvgM(ServerOptimizer):
    """Server momentum: ``v <- momentum * v + delta``; ``w <- w + server_lr * v``."""

    SPEC = FEDAVGM
    SLOTS = ("momentum",)

    def step(self, delta: torch.Tensor, slots: dict[str, torch.Tensor]) -> torch.Tensor:
        """Heavy-ball momentum on the pseudo-gradient."""
        slots["momentum"] = torch.add(delta, slots["momentum"], alpha=self.params["momentum"])
        return slots["momentum"]


class _Adaptive(ServerOptimizer):
    """First moment as in Adam; the second moment's update is the subclass's."""

    SLOTS = ("m", "v")

    def initial(self, slot: str, like: torch.Tensor) -> torch.Tensor:
        """Zero first moment; second moment ``tau**2``."""
        if slot == "v":
            return torch.full_like(like, self.params["tau"] ** 2)
        return torch.zeros_like(like)

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        """The new second moment."""
        raise NotImplementedError

    def step(self, delta: torch.Tensor, slots: dict[str, torch.Tensor]) -> torch.Tensor:
        """``m <- beta_1 m + (1 - beta_1) delta``; ``v`` by the subclass; direction ``m / (sqrt(v) + tau)``."""
        beta_1 = self.params["beta_1"]
        slots["m"] = torch.add(slots["m"] * beta_1, delta, alpha=1.0 - beta_1)
        slots["v"] = self.second_moment(slots["v"], delta * delta)
        return slots["m"] / (slots["v"].sqrt() + self.params["tau"])


class FedAdam(_Adaptive):
    """Adam on the server: ``v <- beta_2 v + (1 - beta_2) delta**2``."""

    SPEC = FEDADAM

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        """Exponential moving average of ``delta**2``."""
        beta_2 = self.params["beta_2"]
        return torch.add(v * beta_2, delta_sq, alpha=1.0 - beta_2)


class FedYogi(_Adaptive):
    """Yogi on the server: ``v <- v - (1 - beta_2) delta**2 sign(v - delta**2)``."""

    SPEC = FEDYOGI

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        """Additive update whose size is bounded by ``delta**2``."""
        return torch.sub(v, delta_sq * torch.sign(v - delta_sq), alpha=1.0 - self.params["beta_2"])


class FedAdagrad(_Adaptive):
    """Adagrad on the server: ``v <- v + delta**2`` (``beta_1 = 0`` gives plain Adagrad on delta)."""

    SPEC = FEDADAGRAD

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        """Running sum of ``delta**2``."""
        return v + delta_sq
