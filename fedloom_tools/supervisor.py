"""The loop behind ``fedloom serve``: start its children, wait for their ports, restart the ones that die.

Standard library only. ``fedloom serve`` works out its plan (settings, admin key, commands) and then
replaces itself with this module (``os.execve``), so the process that waits on the children for the
whole run holds about 12 MB instead of the ~45 MB of the settings and CLI imports.

    python fedloom_tools/supervisor.py '<plan as JSON>'   # the environment is the children's
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1
# A crash loop: more than this many restarts within a minute stops everything.
MAX_RESTARTS_PER_MINUTE = 5


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: children may outlive a killed parent
        pass


def spawn(cmd: list[str], env: dict[str, str], log_path: Path | None = None) -> subprocess.Popen:
    """Start a child that dies with us; its output goes to ``log_path`` or ours."""
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - lives as long as the child
    return subprocess.Popen(
        cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None, preexec_fn=_die_with_parent
    )


def terminate(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM ``proc`` and wait for it; SIGKILL it if it has not ended after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_all(procs: list[subprocess.Popen], timeout: float = 15.0) -> None:
    """SIGTERM children in reverse start order, then SIGKILL what is left."""
    for proc in reversed(procs):
        terminate(proc, timeout)


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


@dataclass
class Plan:
    """What serve runs: its children in start order, the ports to wait for, and what to print then."""

    children: list[tuple[str, list[str]]]
    logs: str
    # (child name, host, port, timeout in seconds), waited for in this order once all have started.
    waits: list[tuple[str, str, int, float]] = field(default_factory=list)
    announce: list[str] = field(default_factory=list)
    metrics_dir: str | None = None
    # Settings for one child only, by name, on top of the shared environment.
    child_env: dict[str, dict[str, str]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        raw: dict[str, Any] = json.loads(text)
        raw["children"] = [(name, list(cmd)) for name, cmd in raw["children"]]
        raw["waits"] = [tuple(w) for w in raw.get("waits", [])]
        return cls(**raw)


@dataclass
class Child:
    """A child process of serve, restarted with the same command when it dies."""

    name: str
    cmd: list[str]
    log_path: Path
    proc: subprocess.Popen
    env: dict[str, str]

    @classmethod
    def start(cls, name: str, cmd: list[str], env: dict[str, str], logs: Path) -> Child:
        log_path = logs / f"{name}.log"
        return cls(name, cmd, log_path, spawn(cmd, env, log_path), env)


def run(plan: Plan, env: dict[str, str]) -> int:
    """Run the plan until SIGTERM or Ctrl-C, or until a child keeps dying; children are stopped at the end."""
    stopping = False

    def _on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    children: list[Child] = []
    try:
        # All start at once: the worker waits for Temporal, the API reports Temporal down on /health
        # until it is up. One after the other, start-up paid for Temporal's start, then the imports.
        for name, cmd in plan.children:
            children.append(Child.start(name, cmd, env | plan.child_env.get(name, {}), Path(plan.logs)))
        by_name = {child.name: child for child in children}
        for name, host, port, timeout in plan.waits:
            wait_for_port(host, port, timeout, by_name[name].proc)
        for line in plan.announce:
            print(line, flush=True)
        return supervise(children, lambda: stopping, plan.metrics_dir)
    finally:
        stop_all([child.proc for child in children])


def forget_metrics(metrics_dir: str | None, pid: int) -> None:
    """Drop a dead child's live gauges (prometheus-client's ``gauge_live*_<pid>.db`` files); counters stay."""
    if metrics_dir:
        for path in Path(metrics_dir).glob(f"gauge_live*_{pid}.db"):
            path.unlink(missing_ok=True)


def supervise(children: list[Child], stopping: Callable[[], bool], metrics_dir: str | None = None) -> int:
    """Restart children that exit (each with its own command and environment) until ``stopping()``;
    1 if they crash in a loop, else 0.

    A crashed child is restarted: the workflow resumes from Temporal's history and clients retry.
    """
    restarts: list[float] = []
    while not stopping():
        for child in children:
            if child.proc.poll() is None:
                continue
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < 60] + [now]
            code = child.proc.returncode
            if len(restarts) > MAX_RESTARTS_PER_MINUTE:
                print(f"fedloom: {child.name} keeps exiting ({code}); stopping", file=sys.stderr, flush=True)
                return 1
            print(f"fedloom: {child.name} exited with {code}; restarting it", file=sys.stderr, flush=True)
            forget_metrics(metrics_dir, child.proc.pid)
            child.proc = spawn(child.cmd, child.env, child.log_path)
        time.sleep(0.3)
    return 0


def exec_into(plan: Plan, env: dict[str, str]) -> None:
    """Replace this process with the supervisor running ``plan`` (same pid, so signals still reach it)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), plan.to_json()], env)


if __name__ == "__main__":
    sys.exit(run(Plan.from_json(sys.argv[1]), dict(os.environ)))
