"""The JavaScript client and the dashboard against one live ``fedloom serve`` and one real three-round run.

Headless Chromium (Debian's ``chromium``, driven by puppeteer-core) opens ``/dashboard#api_key=...``
before the run starts and follows it live; then the client, installed with ``npm install`` into an
empty Node project, reads the finished run and replays its events under ``node --test``.
``.ci/run`` installs chromium and the npm packages; the tests skip only where Node itself is missing.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer, small_run_body, spawn_clients, start_serve, stop_serve, wait_registered

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "clients" / "js"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
ROUNDS, CLIENTS = 3, 2
EXPERIMENT = "webrun"
# No test here may fetch a browser; npm reads its cache first.
NPM_ENV = {"PUPPETEER_SKIP_DOWNLOAD": "1", "npm_config_fund": "false", "npm_config_audit": "false"}

if shutil.which("node") is None or shutil.which("npm") is None:
    pytest.skip(
        "Node.js and npm are not installed (.ci/run and the Dockerfile's CI image have them)", allow_module_level=True
    )


def _npm(args: list[str], cwd: Path) -> None:
    done = subprocess.run(
        ["npm", *args, "--prefer-offline", "--no-progress"],
        cwd=cwd,
        env={**os.environ, **NPM_ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"npm {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


@dataclass
class Run:
    """The live server, its two client processes and the run's state."""

    server: LiveServer
    http: httpx.Client
    procs: list[subprocess.Popen]
    started: bool = False

    def start(self) -> None:
        # Both evaluations, so both the central and the federated series have a point every round.
        body = {
            **small_run_body(EXPERIMENT, ROUNDS, CLIENTS),
            "evaluation_config": {"central": True, "federated": True},
        }
        answer = self.http.post("/training/start", json=body)
        assert answer.status_code == 200, answer.text
        self.started = True

    def wait_done(self, timeout: float = 240) -> dict:
        if not self.started:
            self.start()
        deadline = time.monotonic() + timeout
        while (status := self.http.get("/training/status").json())["status"] == "running":
            assert time.monotonic() < deadline, f"the run did not finish: {status}"
            time.sleep(0.5)
        assert status["status"] == "completed", status
        return status


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """``fedloom serve`` with two registered client processes; one training start allowed."""
    if not (PACKAGE / "node_modules" / "puppeteer-core").is_dir():
        _npm(["ci"], PACKAGE)
    base = tmp_path_factory.mktemp("web")
    # One training start in a window that ends in 2033 (windows are aligned to the epoch: an hour's could
    # end between the run's start and the start the tests expect to be refused).
    one_start = {"FEDLOOM_RATE_LIMIT_TRAINING_START": "1", "FEDLOOM_RATE_LIMIT_TRAINING_START_WINDOW_S": "1000000000"}
    server = start_serve(base / "data", one_start)
    procs: list[subprocess.Popen] = []
    http = httpx.Client(base_url=server.api, headers=server.headers(), timeout=60)
    try:
        procs = spawn_clients(server, CLIENTS, base)
        wait_registered(http, CLIENTS, procs)
        yield Run(server, http, procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        http.close()
        stop_serve(server)


def _read_json_line(proc: subprocess.Popen, timeout: float) -> dict:
    """The next stdout line of ``proc`` as JSON, waiting at most ``timeout`` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"the browser script said nothing within {timeout:.0f} s:\n{err}")
    return json.loads(line)


def test_dashboard_follows_a_run_live_and_plots_its_rounds(run: Run, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    shots = Path(os.environ.get("FEDLOOM_SCREENSHOTS_DIR", tmp_path))
    env = {
        **os.environ,
        **NPM_ENV,
        "FEDLOOM_URL": run.server.url,
        "FEDLOOM_ADMIN_KEY": run.server.admin_key,
        "FEDLOOM_ROUNDS": str(ROUNDS),
        "FEDLOOM_SHOTS": str(shots),
        "CHROMIUM_PATH": CHROMIUM,
    }
    script = PACKAGE / "e2e" / "dashboard.mjs"
    proc = subprocess.Popen(
        ["node", str(script)], cwd=PACKAGE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert _read_json_line(proc, 90) == {"ready": True}
        run.start()  # the page is open and listening before the experiment exists
        out = _read_json_line(proc, 300)
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
    run.wait_done()
    metrics = run.http.get("/metrics/training", params={"experiment_id": EXPERIMENT}).json()
    rounds = metrics["rounds"]
    final = out["final"]
    print(f"dashboard: mid-run view after {out['secondsToDuring']:.1f} s, final after {out['secondsToFinal']:.1f} s")

    assert out["problems"] == []
    assert "default-src 'none'" in out["csp"] and "script-src 'self'" in out["csp"]
    assert "#" not in out["addressAfterLoad"] and run.server.admin_key not in out["addressAfterLoad"]
    assert out["keyInRequests"] == [] and out["requested"] == [run.server.url]
    assert final["experimentIdShown"] == EXPERIMENT and final["statusShown"] == "completed"
    assert f"{ROUNDS} of {ROUNDS} rounds completed" in final["progressText"]

    # The plots hold the run's values, round by round (and the lines were drawn on the canvases).
    plotted = final["plotted"]
    assert plotted["accuracy"]["rounds"] == list(range(1, ROUNDS + 1))
    assert plotted["accuracy"]["series"]["central"] == [r["global_accuracy"] for r in rounds]
    assert plotted["loss"]["series"]["central"] == [r["global_loss"] for r in rounds]
    assert plotted["accuracy"]["series"]["federated"] == [r["federated_metrics"]["accuracy"] for r in rounds]
    assert plotted["loss"]["series"]["federated"] == [r["federated_metrics"]["loss"] for r in rounds]
    assert plotted["duration"]["series"]["round duration"] == [r["round_duration"] for r in rounds]
    assert all(a is not None and 0 < a <= 1 for a in plotted["accuracy"]["series"]["central"])
    scores = run.http.get("/metrics/scores", params={"experiment_id": EXPERIMENT}).json()["scores"]
    for name, field in (("trust", "trust_score"), ("contribution", "contribution")):
        assert plotted[name]["rounds"] == list(range(1, ROUNDS + 1))
        assert sorted(plotted[name]["series"]) == [f"c{i}" for i in range(1, CLIENTS + 1)]
        for cid, values in plotted[name]["series"].items():
            assert values == [s[field] for s in scores if s["client_id"] == cid]
    assert all(count > 20 for count in final["inked"].values()), final["inked"]
    assert set(final["inked"]) == {f"chart-{n}" for n in ("accuracy", "loss", "duration", "trust", "contribution")}

    # Live: everything about the experiment arrived after the page opened, over the WebSocket.
    assert final["connected"] and final["eventsReceived"] > 0
    lines = final["eventLines"]
    assert sum("completed: accuracy" in line for line in lines) == ROUNDS
    assert sum("update from" in line for line in lines) == ROUNDS * CLIENTS
    assert any("round 1 started: selected c1, c2" in line for line in lines)
    if out["during"] is not None:  # seen mid-run: a prefix of the final plot
        seen = out["during"]["accuracy"]["rounds"]
        assert 1 <= len(seen) < ROUNDS + 1 and seen == list(range(1, len(seen) + 1))

    assert [row[:4] for row in final["experiments"]] == [[EXPERIMENT, EXPERIMENT, "completed", "100%"]]
    clients = {row[0]: row for row in final["clients"]}
    assert sorted(clients) == ["c1", "c2"]
    for cid, (_, status, reliability, last_round, _trust) in clients.items():
        assert status == "active" and reliability == "1" and last_round == str(ROUNDS), clients[cid]
    assert [row[:2] for row in final["selection"]] == [["c1", "yes"], ["c2", "yes"]]
    assert out["loginError"].startswith("UNAUTHORIZED")
    forms = out["forms"]
    assert forms["stop"]["className"] == "error" and forms["stop"]["text"].startswith("EXPERIMENT_NOT_ACTIVE"), forms
    assert forms["start"]["className"] == "error" and forms["start"]["text"].startswith("RATE_LIMITED"), forms


def test_js_client_installed_in_an_empty_project_reads_and_replays_the_run(run: Run, tmp_path: Path) -> None:
    run.wait_done()
    project = tmp_path / "project"
    project.mkdir()
    (project / "package.json").write_text(json.dumps({"name": "empty", "version": "1.0.0", "private": True}))
    # --install-links copies the package as a registry install would, so `ws` resolves from this project.
    _npm(["install", "--install-links", str(PACKAGE), "ws@8"], project)
    installed = project / "node_modules" / "@fedloom" / "client"
    assert (installed / "src" / "index.d.ts").is_file() and not installed.is_symlink()
    shutil.copy(PACKAGE / "test" / "live.test.mjs", project / "live.test.mjs")
    env = {
        **os.environ,
        "FEDLOOM_URL": run.server.url,
        "FEDLOOM_ADMIN_KEY": run.server.admin_key,
        "FEDLOOM_EXPERIMENT": EXPERIMENT,
        "FEDLOOM_ROUNDS": str(ROUNDS),
        "FEDLOOM_CLIENTS": str(CLIENTS),
    }
    done = subprocess.run(
        ["node", "--test", "--test-reporter=spec", "live.test.mjs"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ℹ pass 4" in done.stdout, done.stdout


def test_js_client_resumes_an_upload_dropped_at_90_percent(tmp_path: Path) -> None:
    """``uploadModelUpdate`` through a resumable session: a chunk cut mid-request resumes from the server's offset."""
    import hashlib

    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from fedloom_core.storage.keys import update_key
    from tests.api.test_training_api import register, start_body, wait_task

    chunk = 4096
    server = start_serve(tmp_path / "data", {"FEDLOOM_UPLOAD_CHUNK_MB": str(chunk / 1e6)})
    try:
        with httpx.Client(base_url=server.api, headers=server.headers(), timeout=60) as http:
            keys = {cid: register(http, cid) for cid in ("j1", "j2")}
            started = http.post("/training/start", json=start_body("exp-js-resume", rounds=1, round_timeout_s=3600))
            assert started.status_code == 200, started.text
            state = st_load(http.get(f"/model/download/{wait_task(http, 'j1')['model_id']}").content)
        data = st_save({k: v + 0.05 for k, v in state.items()})
        path = tmp_path / "update.safetensors"
        path.write_bytes(data)
        cut_at = int(len(data) * 0.9)
        env = {
            **os.environ,
            "FEDLOOM_URL": server.url,
            "FEDLOOM_KEY": keys["j1"],
            "FEDLOOM_CLIENT": "j1",
            "FEDLOOM_FILE": str(path),
            "FEDLOOM_CUT_AT": str(cut_at),
            "FEDLOOM_EXPERIMENT": "exp-js-resume",
        }
        done = subprocess.run(
            ["node", str(PACKAGE / "e2e" / "resume.mjs")], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr
        out = json.loads(done.stdout.strip().splitlines()[-1])
        assert out["cut"] and out["update"]["client_id"] == "j1" and out["update"]["round"] == 1
        assert out["update"]["experiment_id"] == "exp-js-resume"
        firsts = [int(r.split()[1].split("-")[0]) for r in out["ranges"]]
        cut_index = next(i for i, r in enumerate(out["ranges"]) if int(r.split("-")[1].split("/")[0]) >= cut_at)
        # After the drop it went on from the server's offset (past 80% of the file), not from the start.
        assert firsts[cut_index + 1] > 0.8 * len(data), out["ranges"][cut_index:]
        stored = server.data_dir / "blobs" / update_key("exp-js-resume", 1, "j1", hashlib.sha256(data).hexdigest())
        assert stored.read_bytes() == data
    finally:
        stop_serve(server)
