"""Start and stop a ``fedloom serve`` process from Python: the demo, the tests and the benchmarks use it.

One place knows the command line, which ports are safe to pick, how to tell that the server is up,
and how to find its children (the ``api`` and ``worker`` processes and the Temporal dev server).
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from fedloom_tools.supervisor import terminate

# Far above any rate a test or benchmark reaches; the rate-limit tests pass their own values.
GENEROUS_LIMITS = {
    "FEDLOOM_RATE_LIMIT_GENERAL": "100000000",
    "FEDLOOM_RATE_LIMIT_UPLOADS": "100000000",
    "FEDLOOM_RATE_LIMIT_TRAINING_START": "100000000",
    "FEDLOOM_RATE_LIMIT_AUTH_FAILURES": "100000000",
}


_PICK = random.SystemRandom()  # not the global generator: tests seed that, and parallel workers would pick alike
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free port on 127.0.0.1 below the kernel's ephemeral range (32768 and up).

    Ports handed out by the kernel (port 0) come from the range that Temporal's dev server also uses
    for its internal services and that every outgoing connection uses, so when several servers start
    at once such a port can be taken before it is bound. A random port in 20000-32000 that binds now
    avoids both. A port is never handed out twice in one process, nor one next to an earlier one
    (the dev server may bind its port's neighbour).
    """
    for _ in range(200):
        port = _PICK.randrange(20000, 32000)
        if any(abs(port - taken) <= 1 for taken in _HANDED_OUT):
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free port in 20000-32000")


def memory_bytes(pid: int | str = "self", field: str = "VmRSS") -> int | None:
    """A memory figure of ``pid`` from /proc (``VmRSS``, ``VmHWM``, ...) in bytes; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def spawn_client(
    server_url: str,
    api_key: str,
    client_id: str,
    partition: str,
    log_path: Path,
    *extra: str,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """A real ``fedloom client`` process joining ``server_url`` as ``client_id`` with shard ``partition``
    ("i/N"). The key goes by environment, not argv, where ``ps`` would show it."""
    env = dict(env) if env is not None else {k: v for k, v in os.environ.items() if not k.startswith("FEDLOOM_")}
    env["FEDLOOM_API_KEY"] = api_key
    cmd = [sys.executable, "-m", "fedloom.cli", "client", "--server", server_url, "--client-id", client_id]
    with open(log_path, "wb") as log:
        return subprocess.Popen([*cmd, "--partition", partition, *extra], env=env, stdout=log, stderr=subprocess.STDOUT)


@dataclass
class ServeProcess:
    """A running ``fedloom serve`` (embedded Temporal dev server, worker, API)."""

    url: str
    admin_key: str
    data_dir: Path
    proc: subprocess.Popen
    temporal_port: int = 0

    @property
    def api(self) -> str:
        return f"{self.url}/api/v1"

    @property
    def temporal_address(self) -> str:
        return f"127.0.0.1:{self.temporal_port}"

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.admin_key}"}

    def children(self) -> dict[str, int]:
        """The pids of serve's children by role (``api``, ``worker``, ``temporal``), found through /proc.

        A Python child's role is the word after its ``-m <module>`` (``python -m fedloom.cli worker``).
        """
        roles: dict[str, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid != self.proc.pid:
                    continue
                words = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
            except (OSError, IndexError, ValueError):
                continue
            if words and Path(words[0]).name == "temporal":
                roles["temporal"] = int(entry.name)
            elif "-m" in words:
                role = words[words.index("-m") + 2 :][:1]
                if role:
                    roles[role[0]] = int(entry.name)
        return roles

    def child_pid(self, role: str) -> int:
        """The pid of serve's ``api``, ``worker`` or ``temporal`` child."""
        found = self.children().get(role)
        if found is None:
            raise LookupError(f"no {role} process under fedloom serve {self.proc.pid}")
        return found

    def stop(self) -> None:
        terminate(self.proc)


def start_serve(
    data_dir: Path,
    env_extra: dict[str, str] | None = None,
    *,
    port: int | None = None,
    temporal_port: int | None = None,
    log_path: Path | None = None,
    generous_limits: bool = True,
    headless: bool = True,
    timeout: float = 120,
    command: Sequence[str] | None = None,
    separate_worker: bool = False,
) -> ServeProcess:
    """Start ``fedloom serve`` on ``data_dir`` and wait until its API answers healthy.

    The environment is this process's without any ``FEDLOOM_`` setting, plus ``env_extra``. Output
    goes to ``log_path`` (default ``<data_dir's parent>/serve-<data_dir's name>.log``). ``command``
    replaces ``python -m fedloom.cli serve`` (it must take the same flags); ``separate_worker`` adds
    ``--separate-worker`` (the worker as its own child, not inside the API). Raises ``RuntimeError``
    if serve exits or is not healthy within ``timeout`` seconds.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    temporal_port = temporal_port or free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDLOOM_")}
    env.update({"FEDLOOM_DATA_DIR": str(data_dir), **(GENEROUS_LIMITS if generous_limits else {}), **(env_extra or {})})
    cmd = [*(command or [sys.executable, "-m", "fedloom.cli", "serve"])]
    cmd += ["--separate-worker"] if separate_worker else []
    cmd += ["--port", str(port), "--temporal-port", str(temporal_port)]
    cmd += ["--temporal-ui-port", str(free_port())] + (["--temporal-headless"] if headless else [])
    log_path = log_path or data_dir.parent / f"serve-{data_dir.name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fedloom serve exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"{url}/api/v1/health", timeout=2).status_code == 200:
                admin = (env_extra or {}).get("FEDLOOM_ADMIN_API_KEY")
                admin = admin or (data_dir / "admin_api_key").read_text().strip()
                return ServeProcess(url, admin, data_dir, proc, temporal_port)
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.3)
    terminate(proc, timeout=10)
    raise RuntimeError(f"fedloom serve did not become healthy in {timeout:.0f} s; see {log_path}")
