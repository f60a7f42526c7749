"""The ClientApp: one SuperNode's shard, trained with fedloom's loop and seeds."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedloom_flower import task

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global weights, train locally, reply with the new weights and the sample count."""
    work = task.setup(context.run_config)
    from fedloom_core.learning.training import train_local

    client_id = str(context.node_config["client-id"])
    data = task.split(work, client_id)
    net = task.model(work)
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    rnd = int(msg.content["config"]["server-round"])
    cfg = context.run_config
    result = train_local(
        net,
        data,
        epochs=int(cfg["local-epochs"]),
        batch_size=int(cfg["batch-size"]),
        learning_rate=float(cfg["learning-rate"]),
        optimizer=str(cfg["optimizer"]),
        seed=task.train_seed(int(cfg["seed"]), rnd, client_id),
    )
    metrics = MetricRecord(
        {"num-examples": result.data_samples, "train-loss": result.local_loss, "train-acc": result.local_accuracy}
    )
    content = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)
