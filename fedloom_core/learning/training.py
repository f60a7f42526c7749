"""Local training and evaluation loops, shared by the client runtime and the server's evaluator."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

import torch
from torch import nn

from fedloom_core.learning.datasets import Split

OPTIMIZERS = ("SGD", "Adam")


@dataclass(frozen=True)
class TrainResult:
    local_accuracy: float
    local_loss: float
    training_time: float
    data_samples: int
    epochs_completed: int


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:  # type: ignore[no-untyped-def]
    """The optimizer called ``name`` (SGD with momentum 0.9, or Adam)."""
    key = name.strip().lower()
    if key == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if key == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")


def train_local(
    model: nn.Module,
    data: Split,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    optimizer: str = "SGD",
    seed: int = 0,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Train ``model`` in place on ``data``; report its accuracy and loss over the last epoch.

    With ``proximal_mu`` > 0 (FedProx) the loss gains (mu / 2) * ||w - w_global||^2, where w_global
    are the weights the model had when training started.
    """
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    opt = make_optimizer(optimizer, model.parameters(), learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    correct = total = 0
    loss_sum = 0.0
    for _ in range(epochs):
        correct = total = 0
        loss_sum = 0.0
        order = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data), batch_size):
            idx = order[i : i + batch_size]
            x, y = data.x[idx], data.y[idx]
            opt.zero_grad()
            logits = model(x)
            loss = loss_fn(logits, y)
            if anchor:
                proximal = sum((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
                (loss + proximal_mu / 2 * proximal).backward()
            else:
                loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            total += len(idx)
    return TrainResult(
        local_accuracy=correct / max(total, 1),
        local_loss=loss_sum / max(total, 1),
        training_time=time.perf_counter() - start,
        data_samples=len(data),
        epochs_completed=epochs,
    )


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, batch_size: int = 512) -> tuple[float, float]:
    """Accuracy and mean cross-entropy loss of ``model`` on ``data``."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    correct = 0
    loss_sum = 0.0
    for i in range(0, len(data), batch_size):
        x, y = data.x[i : i + batch_size], data.y[i : i + batch_size]
        logits = model(x)
        loss_sum += float(loss_fn(logits, y))
        correct += int((logits.argmax(1) == y).sum())
    n = max(len(data), 1)
    return correct / n, loss_sum / n


def evaluation_threads() -> int:
    """How many models the server evaluates side by side: ``FEDLOOM_EVAL_THREADS``, else one per core that
    torch's own intra-op threads leave free, at most 2 (the worker runs torch on one thread, so 2 on a
    2-core machine; a process whose torch already uses every core evaluates one model at a time)."""
    configured = os.environ.get("FEDLOOM_EVAL_THREADS", "").strip()
    if configured.isdigit() and int(configured) > 0:  # anything else: the default below
        return int(configured)
    return max(1, min(2, (os.cpu_count() or 1) // max(1, torch.get_num_threads())))


def evaluate_states(
    build: Callable[[], nn.Module],
    states: Iterable[dict[str, torch.Tensor]],
    data: Split,
    threads: int = 1,
) -> list[tuple[float, float]]:
    """Accuracy and loss of each state dict on ``data``, in order, ``threads`` models at a time.

    Each thread evaluates on its own model instance; torch releases the GIL inside its operators,
    so the evaluations run side by side on separate cores. At most ``threads`` states are taken from
    ``states`` at once, so a generator of large states stays bounded in memory.
    """
    models = [build() for _ in range(max(1, threads))]

    def one(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[float, float]:
        model.load_state_dict(state)
        return evaluate(model, data)

    states = iter(states)
    results: list[tuple[float, float]] = []
    if len(models) == 1:
        return [one(models[0], state) for state in states]
    with ThreadPoolExecutor(len(models), thread_name_prefix="fedloom-eval") as pool:
        while batch := list(islice(states, len(models))):
            futures = [pool.submit(one, model, state) for model, state in zip(models, batch, strict=False)]
            results.extend(f.result() for f in futures)
    return results
