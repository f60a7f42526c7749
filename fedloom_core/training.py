"""Local training and evaluation loops, shared by the client runtime and the server's evaluator."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from fedloom_core.datasets import Split

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
