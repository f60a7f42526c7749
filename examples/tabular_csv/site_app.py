"""One site of the tabular example: its model, its CSV data, its training and evaluation.

Run it with the SDK (``python site_app.py``) or as an app (``fedloom client --app site_app:app``); see README.md.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import torch
from torch import nn

import fedloom

FEATURES = 30


class TabularNet(nn.Module):
    """A small MLP classifier for the 30 measurements of a breast-cancer biopsy."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def read_csv(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of one CSV file (last column ``label``)."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    values = torch.tensor([[float(v) for v in row] for row in rows])
    return values[:, :-1], values[:, -1].long()


def make_fns(data_dir: str | Path):  # type: ignore[no-untyped-def]
    """This site's train and evaluate functions over its own ``train.csv`` and ``test.csv``."""
    x, y = read_csv(Path(data_dir) / "train.csv")
    tx, ty = read_csv(Path(data_dir) / "test.csv")
    # Each site scales by its own training data's statistics: nothing about the data leaves the site.
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, tx = (x - mean) / std, (tx - mean) / std

    def train(model: nn.Module, config: dict) -> dict:
        opt = torch.optim.SGD(model.parameters(), lr=float(config.get("learning_rate", 0.05)))
        batch = int(config.get("batch_size", 32))
        gen = torch.Generator().manual_seed(int(config.get("seed", 0)))
        model.train()
        for _ in range(int(config.get("local_epochs", 1))):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch):
                idx = order[i : i + batch]
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
        return {"data_samples": len(x), "local_loss": loss.item()}

    @torch.no_grad()
    def evaluate(model: nn.Module, config: dict) -> dict:
        model.eval()
        logits = model(tx)
        return {
            "data_samples": len(tx),
            "loss": float(nn.functional.cross_entropy(logits, ty)),
            "accuracy": float((logits.argmax(1) == ty).float().mean()),
        }

    return train, evaluate


def app() -> fedloom.ClientApp:
    """The site as a ClientApp; its data directory comes from ``SITE_DATA``."""
    train, evaluate = make_fns(os.environ["SITE_DATA"])
    return fedloom.ClientApp(model=TabularNet(), train_fn=train, evaluate_fn=evaluate)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Join a fedloom server as one site.")
    parser.add_argument("--server", default="http://127.0.0.1:8080")
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--data", required=True, help="this site's directory with train.csv and test.csv")
    args = parser.parse_args()
    train, evaluate = make_fns(args.data)
    rounds = fedloom.run_client(
        args.server, os.environ["FEDLOOM_API_KEY"], args.client_id, TabularNet(), train, evaluate
    )
    print(f"{args.client_id}: trained {rounds} rounds")
