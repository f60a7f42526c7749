"""The ServerApp: FedAvg over every node each round, the global model evaluated on the test split.

Timestamps (round starts, accuracies, the end) go to the work dir for the benchmark.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedloom_flower import task

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg that records when each round's training starts."""

    def __init__(self, work, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.work = work

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        task.record(self.work, event="round_start", round=server_round)
        return super().configure_train(server_round, arrays, config, grid)


@app.main()
def main(grid: Grid, context: Context) -> None:
    work = task.setup(context.run_config)
    import numpy as np
    import torch

    from fedloom_core.learning.training import evaluate

    task.record(work, event="serverapp_start")
    cfg = context.run_config
    net = task.model(work)
    with np.load(work / "data" / "initial.npz") as f:
        net.load_state_dict({k: torch.from_numpy(f[k]) for k in f.files})
    test = task.split(work, "test")

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        net.load_state_dict(arrays.to_torch_state_dict())
        accuracy, loss = evaluate(net, test)
        task.record(work, event="evaluated", round=server_round, accuracy=accuracy, loss=loss)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    clients = int(cfg["num-clients"])
    strategy = TimedFedAvg(
        work,
        fraction_train=1.0,
        fraction_evaluate=0.0,  # fedloom's job evaluates on the server only
        min_train_nodes=clients,
        min_available_nodes=clients,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(net.state_dict()),
        num_rounds=int(cfg["num-server-rounds"]),
        train_config=ConfigRecord({}),
        evaluate_fn=central_evaluate,
    )
    task.record(work, event="end")
