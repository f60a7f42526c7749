"""One site of the image example: a small residual network, its images, its training and evaluation.

Run it with the SDK (``python site_app.py``) or as an app (``fedloom client --app site_app:app``); see README.md.
"""

from __future__ import annotations

import argparse
import os

import torch
from shapes import CLASSES, make_images
from torch import nn

import fedloom


class Block(nn.Module):
    """Two 3x3 convolutions with a skip connection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


class TinyResNet(nn.Module):
    """A stem, two residual blocks, global average pooling and a linear head."""

    def __init__(self, channels: int = 16, classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.Sequential(Block(channels), Block(channels))
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def make_fns(site: int, images: int = 300):  # type: ignore[no-untyped-def]
    """This site's train and evaluate functions over its own images (seeded by ``site``)."""
    x, y = make_images(images, seed=site)
    tx, ty = make_images(images // 4, seed=10_000 + site)

    def train(model: nn.Module, config: dict) -> dict:
        opt = torch.optim.SGD(model.parameters(), lr=float(config.get("learning_rate", 0.05)), momentum=0.9)
        batch = int(config.get("batch_size", 32))
        model.train()
        for _ in range(int(config.get("local_epochs", 1))):
            order = torch.randperm(len(x))
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
    """The site as a ClientApp; which images it holds comes from ``SITE_NUMBER``."""
    torch.set_num_threads(1)
    train, evaluate = make_fns(int(os.environ.get("SITE_NUMBER", "1")))
    return fedloom.ClientApp(model=TinyResNet(), train_fn=train, evaluate_fn=evaluate)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Join a fedloom server as one site.")
    parser.add_argument("--server", default="http://127.0.0.1:8080")
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--site", type=int, default=1, help="which generated images this site holds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, evaluate = make_fns(args.site)
    rounds = fedloom.run_client(
        args.server, os.environ["FEDLOOM_API_KEY"], args.client_id, TinyResNet(), train, evaluate
    )
    print(f"{args.client_id}: trained {rounds} rounds")
