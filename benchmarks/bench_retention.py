"""Disk used per round under each retention setting, measured on a real blob store and database.

    .venv/bin/python benchmarks/bench_retention.py [--rounds 30] [--clients 10] [--arch CNN]

Each round stores what a live round leaves: one update per client (the model's safetensors bytes), the
new global model and their database rows, then the worker's retention pass runs
(``fedloom_core.storage.retention.apply_retention``). The blob directory's size is read from disk
after every round. Rounds are written directly, not trained: the bytes per file are the real model's.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
from pathlib import Path

from fedloom_core.learning.weights import save_state
from fedloom_core.learning.zoo import build_model
from fedloom_core.settings import Settings
from fedloom_core.storage import retention
from fedloom_core.storage.blobstore import LocalBlobStore
from fedloom_core.storage.db import Experiment, GlobalModel, RoundMetrics, Update, create_schema, make_engine
from fedloom_core.storage.keys import model_id_for, model_key, update_key
from fedloom_core.storage.repo import session_scope

SETTINGS = {
    "keep everything (FEDLOOM_RETENTION=false)": {"retention": False},
    "defaults (updates deleted, last 3 + every 10th model)": {},
    "updates kept (FEDLOOM_KEEP_UPDATES=true)": {"keep_updates": True},
    "tightest (last model only, no every-k)": {"keep_last_models": 1, "keep_model_every": 0},
}


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def run(name: str, overrides: dict, model: bytes, rounds: int, clients: int, tmp: Path) -> dict:
    root = tmp / name.split(" ")[0]
    settings = Settings(data_dir=root, **overrides)
    engine = make_engine(f"sqlite:///{root / 'db.sqlite'}")
    create_schema(engine)
    blobs = LocalBlobStore(root / "blobs")
    exp_id = "bench"

    def put_model(s, rnd: int) -> None:  # type: ignore[no-untyped-def]
        info = blobs.put_stream(model_key(exp_id, rnd), io.BytesIO(model))
        s.add(
            GlobalModel(
                model_id=model_id_for(exp_id, rnd),
                experiment_id=exp_id,
                round=rnd,
                blob_key=info.key,
                sha256=info.sha256,
                size_bytes=info.size,
            )
        )

    with session_scope(engine) as s:
        s.add(Experiment(experiment_id=exp_id, status="running"))
        put_model(s, 0)
    swept: dict[str, int] = {}
    per_round = []
    for rnd in range(1, rounds + 1):
        with session_scope(engine) as s:
            for c in range(clients):
                key = update_key(exp_id, rnd, f"c{c}", f"{rnd:04d}{c:04d}".ljust(32, "0"))
                info = blobs.put_stream(key, io.BytesIO(model))
                s.add(
                    Update(
                        update_id=f"{rnd}-{c}",
                        experiment_id=exp_id,
                        round=rnd,
                        client_id=f"c{c}",
                        blob_key=key,
                        sha256=info.sha256,
                        size_bytes=info.size,
                        num_samples=1,
                    )
                )
            put_model(s, rnd)
            s.add(
                RoundMetrics(
                    experiment_id=exp_id, round=rnd, participating_clients=clients, round_duration=0, aggregation_time=0
                )
            )
        retention.apply_retention(engine, blobs, settings, swept)
        per_round.append(disk_bytes(root / "blobs"))
    engine.dispose()
    last10 = (per_round[-1] - per_round[-11]) / 10 if rounds > 10 else per_round[-1] / rounds
    return {"setting": name, "after_rounds": per_round, "final_bytes": per_round[-1], "growth_per_round_last10": last10}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--arch", default="CNN")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedloom-bench-retention-") as tmp:
        path = Path(tmp) / "model.safetensors"
        save_state(build_model(args.arch, (8, 8, 1), 10, seed=0).state_dict(), path)
        model = path.read_bytes()
        print(f"model {args.arch} on digits: {len(model)} bytes; {args.clients} clients, {args.rounds} rounds")
        results = [run(n, o, model, args.rounds, args.clients, Path(tmp)) for n, o in SETTINGS.items()]
    for r in results:
        mb = len(model)
        print(
            f"{r['setting']}: after {args.rounds} rounds {r['final_bytes'] / 1e6:.2f} MB "
            f"({r['final_bytes'] / mb:.1f} model sizes); growth over the last 10 rounds "
            f"{r['growth_per_round_last10'] / 1e6:.3f} MB/round ({r['growth_per_round_last10'] / mb:.2f} model sizes)"
        )
    print(json.dumps({"model_bytes": len(model), "results": results}))


if __name__ == "__main__":
    main()
