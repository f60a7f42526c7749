"""The client runtime: wait to be selected, train on the local slice, upload, until the experiment ends.

Training uses torch, which comes with the ``torch`` extra (``pip install 'fedloom[torch]'``); this
module imports it only when a run starts, so importing it needs nothing beyond the SDK.
"""

from __future__ import annotations

import logging
import tempfile
import time
import zlib
from pathlib import Path

import httpx

from fedloom._client import FLAPIError, FLClient
from fedloom._extras import require_torch

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
    """Take part in experiments until one this client has seen running ends; returns rounds trained."""
    require_torch()
    import torch

    from fedloom_core.learning.attacks import parse_attack

    parsed_attack = parse_attack(attack) if attack else None
    torch.set_num_threads(1)
    data = _load_shard(client_id, dataset, partition, seed, partition_strategy, alpha, shards_per_client)
    api = _register(FLClient(server, api_key), server, client_id, dataset, partition, len(data))
    seen_running: set[str] = set()
    trained = 0
    first_poll, ended_before_join = True, None
    idle_since = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"fedloom-{client_id}-") as tmp:
        work = Path(tmp)
        while True:
            try:
                task = api.get_task(client_id, wait=LONG_POLL_S)
            except (FLAPIError, httpx.HTTPError, OSError) as exc:  # server restarting or rate limit: keep trying
                log.warning("task poll failed: %s", exc)
                time.sleep(_backoff(exc))
                continue
            status = task.get("status")
            exp_id = task.get("experiment_id")
            if task.get("experiment_status") == "running" and exp_id:
                seen_running.add(exp_id)
            if first_poll:
                # An experiment already over when we joined is not ours to end on; any other that is
                # done ran while we waited (possibly all within one long-poll) and ends our run.
                ended_before_join = exp_id if status == "done" else None
                first_poll = False
            if status == "done" and (exp_id in seen_running or (exp_id and exp_id != ended_before_join)):
                log.info("%s: experiment %s ended (%s)", client_id, exp_id, task.get("experiment_status"))
                return trained
            if status != "train":
                if max_idle_s is not None and time.monotonic() - idle_since > max_idle_s:
                    return trained
                continue
            idle_since = time.monotonic()
            try:
                trained += _train_round(api, client_id, task, data, work, seed, parsed_attack)
            except (FLAPIError, httpx.HTTPError, OSError) as exc:
                # The round may have closed while we trained, or the server is restarting: the next poll
                # says what to do.
                log.warning("%s round %s: %s", client_id, task.get("round"), exc)
                time.sleep(_backoff(exc))


def _load_shard(client_id, dataset, partition, seed, strategy, alpha, shards_per_client):  # type: ignore[no-untyped-def]
    """This client's slice of ``dataset``, logged with its label counts; training is warmed up on it."""
    from fedloom_core.learning.datasets import client_partition
    from fedloom_core.learning.partition import label_summary, strategy_label
    from fedloom_core.learning.training import train_local
    from fedloom_core.learning.zoo import build_model

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
    _warm_up(build_model, train_local, data)
    return data


def _register(api: FLClient, server: str, client_id: str, dataset: str, partition: str, samples: int) -> FLClient:
    """Register ``client_id``; a client on its own new key, or ``api`` if it was registered before."""
    try:
        reg = api.register_client(
            client_id,
            {"dataset": dataset, "partition": partition},
            capabilities={"compute_power": "cpu", "data_samples": samples},
        )
    except FLAPIError as exc:
        if exc.code != "CONFLICT":
            raise
        log.info("%s already registered; continuing with the given key", client_id)
        return api
    log.info("%s registered (%d samples)", client_id, samples)
    return FLClient(server, reg["api_key"])


def _backoff(exc: Exception) -> float:
    """How long to wait after a failed call: a 429's Retry-After, else a second."""
    if isinstance(exc, FLAPIError) and exc.retry_after is not None:
        return min(exc.retry_after, 60.0)
    return 1.0


def _warm_up(build_model, train_local, data) -> None:  # type: ignore[no-untyped-def]
    """One tiny training step, so torch's lazy imports happen now rather than inside the first round."""
    from fedloom_core.learning.datasets import Split

    sample = Split(data.x[:2], data.y[:2])
    shape = (int(data.x.shape[2]), int(data.x.shape[3]), int(data.x.shape[1]))
    train_local(build_model("MLP", shape, 10), sample, epochs=1, batch_size=2, learning_rate=0.01)


def _train_round(api, client_id, task, data, work, seed, attack=None) -> int:  # type: ignore[no-untyped-def]
    from fedloom_core.learning.attacks import poison_data, poison_update
    from fedloom_core.learning.training import train_local
    from fedloom_core.learning.weights import load_state, save_state
    from fedloom_core.learning.zoo import build_model

    cfg = task["model_config"]
    tc = task["training_config"]
    started = time.perf_counter()
    model_path = work / "global.safetensors"
    api.download_model(task["model_id"], model_path)
    download_time = time.perf_counter() - started
    model = build_model(task["model_architecture"], cfg["input_shape"], cfg["num_classes"])
    global_state = load_state(model_path)
    model.load_state_dict(global_state)
    train_seed = seed * 100_003 + int(task["round"]) * 101 + zlib.crc32(client_id.encode()) % 9973
    result = train_local(
        model,
        poison_data(attack, data, cfg["num_classes"]) if attack else data,
        epochs=int(tc.get("local_epochs", 1)),
        batch_size=int(tc.get("batch_size", 32)),
        learning_rate=float(tc.get("learning_rate", 0.01)),
        optimizer=str(tc.get("optimizer", "SGD")),
        seed=train_seed,
        proximal_mu=float(tc.get("proximal_mu", 0.0)),
    )
    state = model.state_dict()
    if attack is not None:
        state = poison_update(attack, global_state, state, seed=train_seed)
    out = work / "update.safetensors"
    save_state(state, out)
    upload_started = time.perf_counter()
    metrics = {
        "local_accuracy": result.local_accuracy,
        "local_loss": result.local_loss,
        "training_time": result.training_time,
        "data_samples": result.data_samples,
        "epochs_completed": result.epochs_completed,
        "communication_time": download_time,
    }
    api.upload_model_update(client_id, out, metrics)
    log.info(
        "%s round %s: acc %.3f loss %.3f (%.1fs train, %.2fs upload)%s",
        client_id,
        task["round"],
        result.local_accuracy,
        result.local_loss,
        result.training_time,
        time.perf_counter() - upload_started,
        f" [attack {attack.kind}]" if attack else "",
    )
    return 1
