"""The operator's side: create the experiment with the model's initial weights, start it, follow it.

FEDLOOM_API_KEY=<admin key> python start_experiment.py --sites 3 --rounds 5 --wait
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from site_app import TinyResNet  # this example's own module (run from its directory)

from fedloom import FLClient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="http://127.0.0.1:8080")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--wait", action="store_true", help="wait for the end and print each round's metrics")
    args = parser.parse_args()
    api = FLClient(args.server, os.environ["FEDLOOM_API_KEY"])
    torch.manual_seed(0)
    body = {
        "name": "shapes-resnet",
        "dataset_config": {"name": "coloured-shapes", "clients_count": args.sites},
        "model_config": {"architecture": "TinyResNet"},
        "training_config": {"rounds": args.rounds, "local_epochs": 2, "batch_size": 32, "learning_rate": 0.05},
        "policy_config": {"min_clients": args.sites},
    }
    deadline = time.monotonic() + 120
    while api.get_status()["registered_clients"] < args.sites:  # the sites register when they start
        if time.monotonic() > deadline:
            raise SystemExit(f"fewer than {args.sites} sites registered in 120 s")
        time.sleep(0.5)
    exp = api.create_experiment(body, initial_model=TinyResNet().state_dict())
    api.start_training({"experiment_config": {"experiment_id": exp["experiment_id"]}})
    print(f"started {exp['experiment_id']}")
    if args.wait:
        while api.get_training_status()["status"] == "running":
            time.sleep(1)
        for r in api.get_training_metrics(exp["experiment_id"])["rounds"]:
            print(f"round {r['round']}: federated {r['federated_metrics']}")


if __name__ == "__main__":
    main()
