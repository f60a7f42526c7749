"""schemathesis fuzzes every operation of /openapi.json on a live server: no 5xx, no answer off-schema."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import LiveServer

pytestmark = pytest.mark.e2e


def test_schemathesis_finds_no_server_error_and_no_schema_violation(live_server: LiveServer, tmp_path: Path) -> None:
    cli = Path(sys.executable).parent / "schemathesis"
    result = subprocess.run(
        [
            str(cli),
            "run",
            f"{live_server.url}/openapi.json",
            "-H",
            f"Authorization: Bearer {live_server.admin_key}",
            "--checks",
            "not_a_server_error,response_schema_conformance",
            "--phases",
            "examples,fuzzing",
            "--max-examples",
            "15",
            "--seed",
            "1",
            "--no-shrink",
            "--generation-database",
            "none",
            "--no-color",
            "--workers",
            "2",
            # The task long-poll holds each request up to its `wait` (30 s at most), which would spend the
            # run's time budget waiting; its inputs are plain numbers and an id, covered by other tests.
            "--exclude-path",
            "/api/v1/clients/{client_id}/task",
            "--request-timeout",
            "40",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    tail = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    counts = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert counts and int(counts[1]) > 100 and counts[1] == counts[2], tail
