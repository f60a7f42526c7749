"""Each example in examples/ runs end to end on a live ``fedloom serve``: two sites with the SDK script,
one with ``fedloom client --app``, and the operator's start script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer, start_serve, stop_serve

pytestmark = pytest.mark.e2e
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    live = start_serve(tmp_path / "data")
    yield live
    stop_serve(live)


def _env(server: LiveServer, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDLOOM_")}
    return env | {"FEDLOOM_API_KEY": server.admin_key, **extra}


def _run_example(server: LiveServer, example: Path, sites: list[tuple[list[str], dict[str, str]]], tmp: Path) -> None:
    """Start the sites (script arguments, extra environment), then the experiment; all end cleanly."""
    procs = []
    for i, (argv, extra) in enumerate(sites):
        log = open(tmp / f"site{i}.log", "wb")  # noqa: SIM115 - the process writes it
        cmd = [sys.executable, *argv, "--server", server.url]
        procs.append(
            subprocess.Popen(cmd, cwd=example, env=_env(server, **extra), stdout=log, stderr=subprocess.STDOUT)
        )
    try:
        start = [sys.executable, "start_experiment.py", "--server", server.url, "--sites", str(len(sites))]
        done = subprocess.run(
            [*start, "--rounds", "3", "--wait"],
            cwd=example,
            env=_env(server),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert "round 3: federated" in done.stdout, done.stdout
        for i, p in enumerate(procs):
            assert p.wait(timeout=60) == 0, (tmp / f"site{i}.log").read_text()
            assert "trained 3 rounds" in (tmp / f"site{i}.log").read_text() or "--app" in sites[i][0]
    finally:
        for p in procs:
            p.kill()


def _final_federated(server: LiveServer) -> dict:
    http = httpx.Client(base_url=server.api, headers=server.headers(), timeout=30)
    rounds = http.get("/metrics/training").json()["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    return rounds[-1]["federated_metrics"]


def _app(client_id: str) -> list[str]:
    return ["-m", "fedloom.cli", "client", "--app", "site_app:app", "--client-id", client_id]


def test_tabular_csv_example(server: LiveServer, tmp_path: Path) -> None:
    example = EXAMPLES / "tabular_csv"
    data = tmp_path / "csv"
    made = subprocess.run(
        [sys.executable, "make_data.py", "--sites", "3", "--out", str(data)],
        cwd=example,
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    sites = [
        (["site_app.py", "--client-id", "hospital1", "--data", str(data / "site1")], {}),
        (["site_app.py", "--client-id", "hospital2", "--data", str(data / "site2")], {}),
        (_app("hospital3"), {"SITE_DATA": str(data / "site3")}),
    ]
    _run_example(server, example, sites, tmp_path)
    final = _final_federated(server)
    assert final["accuracy"] >= 0.9 and final["data_samples"] == sum(
        len((data / f"site{i}" / "test.csv").read_text().splitlines()) - 1 for i in (1, 2, 3)
    ), final


def test_resnet_images_example(server: LiveServer, tmp_path: Path) -> None:
    example = EXAMPLES / "resnet_images"
    sites = [
        (["site_app.py", "--client-id", "lab1", "--site", "1"], {}),
        (["site_app.py", "--client-id", "lab2", "--site", "2"], {}),
        (_app("lab3"), {"SITE_NUMBER": "3"}),
    ]
    _run_example(server, example, sites, tmp_path)
    final = _final_federated(server)
    assert final["accuracy"] >= 0.6 and final["data_samples"] == 3 * 75, final
