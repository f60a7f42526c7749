"""The JavaScript client's ``uploadInitialModel`` through a resumable session against a live ``fedloom
serve``: a chunk cut mid-request at 90% resumes from the server's offset, and the experiment starts
from the file (``clients/js/e2e/resume.mjs`` with ``FEDLOOM_TARGET=initial_model``)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.api.test_initial_model_sessions import custom_experiment, custom_weights, starts_from
from tests.conftest import start_serve, stop_serve

pytestmark = pytest.mark.e2e
PACKAGE = Path(__file__).resolve().parents[2] / "clients" / "js"

if shutil.which("node") is None:
    pytest.skip("Node.js is not installed (.ci/run and the Dockerfile's CI image have it)", allow_module_level=True)


def test_js_client_resumes_an_initial_model_dropped_at_90_percent(tmp_path: Path) -> None:
    chunk = 4096
    server = start_serve(tmp_path / "data", {"FEDLOOM_UPLOAD_CHUNK_MB": str(chunk / 1e6)})
    try:
        data = custom_weights(4)
        path = tmp_path / "initial.safetensors"
        path.write_bytes(data)
        cut_at = int(len(data) * 0.9)
        with httpx.Client(base_url=server.api, headers=server.headers(), timeout=60) as http:
            exp_id = custom_experiment(http, "js-resumed")
            env = {
                **os.environ,
                "FEDLOOM_URL": server.url,
                "FEDLOOM_KEY": server.admin_key,
                "FEDLOOM_TARGET": "initial_model",
                "FEDLOOM_EXPERIMENT": exp_id,
                "FEDLOOM_FILE": str(path),
                "FEDLOOM_CUT_AT": str(cut_at),
            }
            done = subprocess.run(
                ["node", str(PACKAGE / "e2e" / "resume.mjs")], env=env, capture_output=True, text=True, timeout=120
            )
            assert done.returncode == 0, done.stdout + done.stderr
            out = json.loads(done.stdout.strip().splitlines()[-1])
            stored = out["initial_model"]
            assert out["cut"] and stored["model_id"] == f"model_{exp_id}_round_0"
            assert stored["sha256"] == hashlib.sha256(data).hexdigest() and stored["size_bytes"] == len(data)
            firsts = [int(r.split()[1].split("-")[0]) for r in out["ranges"]]
            cut_index = next(i for i, r in enumerate(out["ranges"]) if int(r.split("-")[1].split("/")[0]) >= cut_at)
            # After the drop it went on from the server's offset (past 80% of the file), not from the start.
            assert firsts[cut_index + 1] > 0.8 * len(data), out["ranges"][cut_index:]
            # The experiment starts from the file, byte for byte.
            starts_from(http, exp_id, stored["model_id"], data, "js")
            http.post("/training/stop", json={"experiment_id": exp_id, "reason": "test over"})
    finally:
        stop_serve(server)
