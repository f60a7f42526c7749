"""The API process does not import torch (about 260 MB) when it starts experiments and checks their strategy.

Each check runs in a fresh interpreter, so what other tests imported cannot hide an import.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# An in-process app (no Temporal: its client is a stand-in that accepts the workflow) answering
# /training/start with valid and invalid aggregation configs; prints what it saw as JSON.
SCRIPT = r"""
import json, sys
from fastapi.testclient import TestClient
import api.app as app_module
from api.deps import get_temporal
from fedloom_core.learning.strategies import canonical_strategy_name, strategy_params_schema
from fedloom_core.learning.strategies.specs import SPECS, check_strategy
from fedloom_core.settings import Settings

async def no_temporal(*_args, **_kwargs):
    return None

class Handle:
    async def describe(self):
        return None

class Temporal:
    async def start_workflow(self, *_args, **_kwargs):
        return None

    def get_workflow_handle(self, *_args, **_kwargs):
        return Handle()

key = "no-torch-admin-key-0123456789abcdef"
app_module._connect_temporal = no_temporal
app = app_module.create_app(Settings(data_dir=sys.argv[1], admin_api_key=key))
app.dependency_overrides[get_temporal] = Temporal
seen = {"torch_after_app": "torch" in sys.modules, "answers": []}

def start(exp_id, strategy, params):
    body = {
        "experiment_config": {"experiment_id": exp_id, "rounds": 2, "min_clients": 2, "dataset": "digits",
                              "model_architecture": "MLP"},
        "aggregation_config": {"strategy": strategy, "weighted": True, "min_updates": 2, "params": params},
    }
    resp = http.post("/training/start", json=body)
    seen["answers"].append([resp.status_code, resp.json().get("status") or resp.json()["error"]["details"]])

with TestClient(app, base_url="http://test/api/v1", headers={"Authorization": f"Bearer {key}"}) as http:
    for cid in ("c1", "c2"):
        assert http.post("/clients/register", json={"client_id": cid}).status_code == 200
    start("bad", "FedTrimmedAvg", {"trim_fraction": 0.7})
    start("few", "Krum", {"num_byzantine": 1})
    start("ok", "fedadam", {"server_lr": 0.1})
required = {"NormClipping": {"max_norm": 1.0}, "DPFedAvg": {"clip_norm": 1.0}}
for name in SPECS:
    strategy_params_schema(canonical_strategy_name(name.lower()))
    check_strategy(name, required.get(name, {}), True)
seen["torch"] = "torch" in sys.modules
print(json.dumps(seen))
"""


def test_starting_and_checking_strategies_does_not_import_torch(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["answers"] == [
        [
            400,
            "aggregation_config: invalid parameter 'trim_fraction' of strategy FedTrimmedAvg: must be in [0, 0.5), "
            "not 0.7; valid parameters of FedTrimmedAvg: trim_fraction (float in [0, 0.5), default 0.1); "
            "chunk_elems (int in [1, 1073741824], default 1048576)",
        ],
        [
            400,
            "aggregation_config: Krum needs at least 5 updates a round, but a round may close with 2 "
            "(min_updates, else min_clients); raise it or lower num_byzantine",
        ],
        [200, "started"],
    ]
    assert seen["torch_after_app"] is False
    assert seen["torch"] is False, "the API imported torch while starting an experiment or checking a strategy"
