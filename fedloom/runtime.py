"""The built-in client: a built-in model trained on this client's slice of a built-in dataset, through run_client.

Training uses torch, which comes with the ``torch`` extra (``pip install 'fedloom[torch]'``); this
module imports it only when a run starts, so importing it needs nothing beyond the SDK.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

from fedloom._client import FLClient
from fedloom._extras import require_torch
from fedloom.app import RunOptions, register, serve_tasks

log = logging.getLogger("fedloom.client")
# The server holds a task request up to this long while there is nothing to do.
LONG_POLL_S = 10.0


def parse_partition(text: str) -> tuple[int, int]:
    """``"I/N"`` (1-based I) -> (0-based index, count)."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--partition must look like I/N, got {text!r}") from None
    if not 1 <= index <= count:
        raise ValueError(f"--partition {text}: I must be between 1 and N")
    return index - 1, count


def run_client(
    *,
    server: str,
    api_key: str,
    client_id: str,
    dataset: str = "digits",
    partition: str = "1/1",
    seed: int = 0,
    max_idle_s: float | None = None,
    partition_strategy: str = "iid",
    alpha: float = 0.5,
    shards_per_client: int = 2,
    attack: str | None = None,
) -> int:
    """Take part in experiments until one this client has seen running ends; returns rounds trained.

    While several experiments run, it does the tasks of each that selects it and returns once none runs.
    """
    require_torch()
    import torch

    from fedloom_core.learning.attacks import parse_attack
    from fedloom_core.learning.catalog import builtin_dataset

    parsed_attack = parse_attack(attack) if attack else None
    torch.set_num_threads(1)
    data = _load_shard(client_id, dataset, partition, seed, partition_strategy, alpha, shards_per_client)
    site = BuiltinSite(client_id, builtin_dataset(dataset) or dataset, data, seed, parsed_attack)
    options = RunOptions(
        client_config={"dataset": dataset, "partition": partition},
        capabilities={"compute_power": "cpu", "data_samples": len(data)},
        max_idle_s=max_idle_s,
        long_poll_s=LONG_POLL_S,
        check_task=site.check_task,
    )
    api = register(FLClient(server, api_key), client_id, options)
    # After registering: the server can count this client while torch's lazy set-up runs.
    _warm_up(data)
    try:
        return serve_tasks(api, client_id, site.model_for, site.train, site.evaluate, options)
    finally:
        api.close()


class DatasetMismatchError(ValueError):
    """A task names another dataset, or a model this built-in client does not have."""


class BuiltinSite:
    """A built-in model (CNN or MLP, as the task names it) trained and evaluated on this client's shard."""

    def __init__(self, client_id: str, dataset: str, data, seed: int, attack=None) -> None:  # type: ignore[no-untyped-def]
        self.client_id, self.dataset, self.data, self.seed, self.attack = client_id, dataset, data, seed, attack
        self.task: dict[str, Any] = {}

    def check_task(self, task: dict[str, Any]) -> None:
        """Refuse a task for another dataset or for a model the server does not build."""
        from fedloom_core.learning.catalog import builtin_architecture, builtin_dataset

        wanted, exp_id = task.get("dataset"), task.get("experiment_id")
        if builtin_dataset(str(wanted)) != self.dataset:
            hint = f"--dataset {wanted}" if builtin_dataset(str(wanted)) else "a client app (fedloom client --app)"
            raise DatasetMismatchError(
                f"{self.client_id} holds dataset {self.dataset!r} but experiment {exp_id} trains on {wanted!r}: "
                f"join it with {hint}"
            )
        if builtin_architecture(str(task.get("model_architecture"))) is None:
            raise DatasetMismatchError(
                f"experiment {task.get('experiment_id')} trains a custom model "
                f"{task.get('model_architecture')!r}: run a client app for it (fedloom client --app)"
            )

    def model_for(self, task: dict[str, Any]):  # type: ignore[no-untyped-def]
        """A fresh built-in model of the task's architecture; the task is kept for training."""
        from fedloom_core.learning.zoo import build_model

        self.task = task
        cfg = task["model_config"]
        return build_model(task["model_architecture"], cfg["input_shape"], cfg["num_classes"])

    def train(self, model, tc: dict[str, Any]) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        """Train on the shard (poisoned under an attack); the spec's training metrics."""
        from fedloom_core.learning.attacks import poison_data, poison_update
        from fedloom_core.learning.training import train_local

        task, attack = self.task, self.attack
        num_classes = int(task["model_config"]["num_classes"])
        global_state = {k: v.clone() for k, v in model.state_dict().items()} if attack else {}
        train_seed = self.seed * 100_003 + int(task["round"]) * 101 + zlib.crc32(self.client_id.encode()) % 9973
        result = train_local(
            model,
            poison_data(attack, self.data, num_classes) if attack else self.data,
            epochs=int(tc.get("local_epochs", 1)),
            batch_size=int(tc.get("batch_size", 32)),
            learning_rate=float(tc.get("learning_rate", 0.01)),
            optimizer=str(tc.get("optimizer", "SGD")),
            seed=train_seed,
            proximal_mu=float(tc.get("proximal_mu", 0.0)),
        )
        if attack is not None:
            model.load_state_dict(poison_update(attack, global_state, model.state_dict(), seed=train_seed))
        log.info(
            "%s round %s: acc %.3f loss %.3f (%.1fs train)%s",
            self.client_id,
            task["round"],
            result.local_accuracy,
            result.local_loss,
            result.training_time,
            f" [attack {attack.kind}]" if attack else "",
        )
        return {
            "local_accuracy": result.local_accuracy,
            "local_loss": result.local_loss,
            "training_time": result.training_time,
            "data_samples": result.data_samples,
            "epochs_completed": result.epochs_completed,
        }

    def evaluate(self, model, _config: dict[str, Any]) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        """Accuracy and loss of a global model on this client's shard."""
        from fedloom_core.learning.training import evaluate

        accuracy, loss = evaluate(model, self.data)
        return {"data_samples": len(self.data), "loss": loss, "accuracy": accuracy}


def _load_shard(client_id, dataset, partition, seed, strategy, alpha, shards_per_client):  # type: ignore[no-untyped-def]
    """This client's slice of ``dataset``, logged with its label counts."""
    from fedloom_core.learning.datasets import client_partition
    from fedloom_core.learning.partition import label_summary, strategy_label

    index, count = parse_partition(partition)
    data = client_partition(
        dataset, index, count, seed=seed, strategy=strategy, alpha=alpha, shards_per_client=shards_per_client
    )
    log.info(
        "%s data: shard %s of %s, %s, %d samples, labels %s",
        client_id,
        partition,
        dataset,
        strategy_label(strategy, alpha, shards_per_client),
        len(data),
        label_summary(data.y.numpy(), [range(len(data))])[0],
    )
    return data


def _warm_up(data) -> None:  # type: ignore[no-untyped-def]
    """One tiny training step, so torch's lazy imports happen now rather than inside the first round."""
    from fedloom_core.learning.datasets import Split
    from fedloom_core.learning.training import train_local
    from fedloom_core.learning.zoo import build_model

    sample = Split(data.x[:2], data.y[:2])
    shape = (int(data.x.shape[2]), int(data.x.shape[3]), int(data.x.shape[1]))
    train_local(build_model("MLP", shape, 10), sample, epochs=1, batch_size=2, learning_rate=0.01)
