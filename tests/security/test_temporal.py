"""Temporal faults and transport security, against a real API process and a real Temporal dev server.

The API is started with Temporal not yet running and serves HTTPS with a certificate made here; the
dev server is then started, killed and started again, and the API follows without a restart.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import select
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import (
    ExecuteWorkflowInput,
    Interceptor,
    StartLocalActivityInput,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)

from activities.experiment import ExperimentActivities
from fedloom_core.messages import ExperimentInput
from fedloom_core.schemas import StartRequest
from fedloom_core.settings import Settings
from fedloom_core.storage.blobstore import LocalBlobStore
from fedloom_core.storage.db import Event, Experiment, create_schema, make_engine
from fedloom_core.storage.repo import session_scope
from fedloom_tools.launch import GENEROUS_LIMITS, free_port, memory_bytes, terminate
from fedloom_tools.serve import _temporal_command, wait_for_port
from tests.conftest import start_dev_server
from workers import watchdog
from workers.main import WORKFLOW_FAILURES, build_workers
from workflows.experiment import ExperimentWorkflow, workflow_id

pytestmark = pytest.mark.e2e
ADMIN = "temporal-faults-admin-key"


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made now (no download, no fixture file)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    keyfile.chmod(0o600)
    return certfile, keyfile


@dataclass
class Api:
    proc: subprocess.Popen
    url: str
    http: httpx.Client
    temporal_port: int
    data_dir: Path
    temporal: subprocess.Popen | None = None

    def start_temporal(self) -> None:
        settings = Settings(_env_file=None, data_dir=self.data_dir)
        cmd = _temporal_command(settings, self.temporal_port, free_port(), headless=True)
        log = open(self.data_dir / "temporal.log", "ab")  # noqa: SIM115 - lives as long as the server
        self.temporal = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port("127.0.0.1", self.temporal_port, 60, self.temporal)

    def kill_temporal(self) -> None:
        assert self.temporal is not None
        self.temporal.kill()
        self.temporal.wait()
        self.temporal = None


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """``fedloom api`` over HTTPS, pointed at a Temporal port where nothing listens yet."""
    root = tmp_path_factory.mktemp("temporal-faults")
    data_dir = root / "data"
    data_dir.mkdir()
    certfile, keyfile = make_certificate(root)
    port, temporal_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDLOOM_")}
    env |= GENEROUS_LIMITS | {
        "FEDLOOM_DATA_DIR": str(data_dir),
        "FEDLOOM_ADMIN_API_KEY": ADMIN,
        "FEDLOOM_TEMPORAL_ADDRESS": f"127.0.0.1:{temporal_port}",
        "FEDLOOM_TLS_CERTFILE": str(certfile),
        "FEDLOOM_TLS_KEYFILE": str(keyfile),
    }
    cmd = [sys.executable, "-m", "fedloom.cli", "api", "--host", "127.0.0.1", "--port", str(port)]
    with open(root / "api.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"https://127.0.0.1:{port}"
    trust = ssl.create_default_context(cafile=str(certfile))
    http = httpx.Client(base_url=f"{url}/api/v1", verify=trust, headers={"Authorization": f"Bearer {ADMIN}"})
    handle = Api(proc, url, http, temporal_port, data_dir)
    try:
        wait_for_port("127.0.0.1", port, 60, proc)
        yield handle
    finally:
        http.close()
        terminate(proc)
        if handle.temporal is not None:
            terminate(handle.temporal)


def _stop(api: Api) -> tuple[httpx.Response, float]:
    """POST /training/stop with nothing running: 409 when Temporal is reachable, 503 when it is not."""
    started = time.monotonic()
    resp = api.http.post("/training/stop", json={"reason": "probe"}, timeout=15)
    return resp, time.monotonic() - started


def _wait_for_stop_status(api: Api, status: int, bound_s: float) -> float:
    """Seconds until /training/stop answers ``status``; fails past ``bound_s``."""
    started = time.monotonic()
    while True:
        resp, took = _stop(api)
        assert took < 1.0, f"answered in {took:.2f} s"
        if resp.status_code == status:
            return time.monotonic() - started
        assert time.monotonic() - started < bound_s, f"still {resp.status_code} after {bound_s} s: {resp.text}"
        time.sleep(0.25)


def _assert_unavailable(resp: httpx.Response) -> None:
    assert resp.status_code == 503, resp.text
    error = resp.json()["error"]
    assert error["code"] == "SERVICE_UNAVAILABLE" and error["message"] and "Temporal" in error["details"]
    assert 1 <= int(resp.headers["Retry-After"]) <= 10


def test_the_api_serves_https_with_the_configured_certificate(api: Api) -> None:
    resp = api.http.get("/health")
    assert resp.status_code in (200, 503) and resp.url.scheme == "https"
    assert set(resp.json()["components"]) == {"database", "blob_store", "temporal"}
    # A client that does not trust the self-signed certificate is refused the connection.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{api.url}/api/v1/health", timeout=5)
    # Plain HTTP on the HTTPS port gets no API answer.
    with pytest.raises(httpx.HTTPError):
        httpx.get(api.url.replace("https", "http") + "/api/v1/health", timeout=5).raise_for_status()


def test_the_api_follows_temporal_going_away_and_coming_back_without_a_restart(api: Api) -> None:
    pid, rss_before = api.proc.pid, memory_bytes(api.proc.pid)
    # Temporal not yet running: routes that need it are 503 at once; the others serve.
    resp, took = _stop(api)
    _assert_unavailable(resp)
    assert took < 1.0
    health = api.http.get("/health")
    assert health.status_code == 503 and health.json()["components"]["temporal"].startswith("down")
    assert "Retry-After" in health.headers
    assert api.http.get("/status").status_code == 200

    api.start_temporal()
    came_up = _wait_for_stop_status(api, 409, bound_s=30)
    assert api.http.get("/health").json()["components"]["temporal"] == "up"

    # Lost while the API runs: noticed by the periodic check (every 5 s, 3 s timeout) or on use.
    api.kill_temporal()
    noticed = _wait_for_stop_status(api, 503, bound_s=15)
    _assert_unavailable(_stop(api)[0])

    api.start_temporal()
    back = _wait_for_stop_status(api, 409, bound_s=30)
    assert api.http.get("/health").status_code == 200
    assert api.proc.poll() is None and api.proc.pid == pid
    growth = (memory_bytes(pid) or 0) - (rss_before or 0)

    # Lost again, found by a request's own RPC before the periodic check runs: a running experiment
    # makes stop ask Temporal about its workflow.
    engine = make_engine(Settings(_env_file=None, data_dir=api.data_dir).database_url)
    with session_scope(engine) as s:
        s.add(Experiment(experiment_id="probe-running", status="running", total_rounds=1, config={}))
    engine.dispose()
    api.kill_temporal()
    resp, on_use = _stop(api)
    _assert_unavailable(resp)
    assert on_use < 3.0, f"a request on a lost Temporal took {on_use:.1f} s"
    print(f"lost Temporal found on use in {on_use:.2f} s")
    print(f"up after {came_up:.1f} s, loss noticed after {noticed:.1f} s, back after {back:.1f} s")
    print(f"API RSS growth {growth / 1e6:+.1f} MB")
    assert growth < 50e6


# --- workflow-task failures: a real dev server, the real workers, a fault brought by the test ------------------


class _RaiseBeforeRun(WorkflowInboundInterceptor):
    """Fails every workflow task of the run before the workflow's own code runs (no cleanup possible)."""

    async def execute_workflow(self, input: ExecuteWorkflowInput) -> Any:
        raise RuntimeError("injected fault: the workflow cannot start")


class _FailInitStep(WorkflowOutboundInterceptor):
    def start_local_activity(self, input: StartLocalActivityInput) -> Any:
        if input.activity == "init_experiment":
            raise RuntimeError("injected fault: a bug in workflow code")
        return super().start_local_activity(input)


class _RaiseInRun(WorkflowInboundInterceptor):
    """Makes the workflow's code raise where it starts its first step, as a bug in it would."""

    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        super().init(_FailInitStep(outbound))


class Fault(Interceptor):
    def __init__(self, inbound: type[WorkflowInboundInterceptor]) -> None:
        self.inbound = inbound

    def workflow_interceptor_class(self, input: WorkflowInterceptorClassInput) -> type[WorkflowInboundInterceptor]:
        return self.inbound


@pytest.fixture(scope="module")
async def dev_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await start_dev_server("--log-level", "error")
    yield env
    await env.shutdown()


def _experiment(engine: Any, exp_id: str) -> ExperimentInput:
    req = StartRequest.model_validate(
        {
            "experiment_config": {"experiment_id": exp_id, "rounds": 1, "min_clients": 1, "model_architecture": "MLP"},
            "training_config": {},
            "aggregation_config": {},
        }
    )
    with session_scope(engine) as s:
        s.add(Experiment(experiment_id=exp_id, status="running", total_rounds=1, config=req.model_dump(mode="json")))
    return ExperimentInput(
        experiment_id=exp_id, config=req, input_shape=[64], num_classes=10, round_timeout_s=30, selection_timeout_s=30
    )


@pytest.mark.parametrize(
    ("fault", "workflow_failures", "code", "closed_as"),
    [
        # An exception in workflow code fails the workflow; the workflow records why.
        (_RaiseInRun, WORKFLOW_FAILURES, "WORKFLOW_ERROR", WorkflowExecutionStatus.FAILED),
        # One outside it (here: before it runs) fails the workflow too; the watchdog records why.
        (_RaiseBeforeRun, WORKFLOW_FAILURES, watchdog.WORKFLOW_CLOSED, WorkflowExecutionStatus.FAILED),
        # A workflow task that keeps failing whatever the worker's settings (as a payload over the server's
        # limit does), here a worker without failure types: the watchdog terminates it and records why.
        (_RaiseBeforeRun, (), watchdog.WORKFLOW_TASK_FAILED, WorkflowExecutionStatus.TERMINATED),
    ],
    ids=["in-workflow-code", "before-workflow-code", "task-keeps-failing"],
)
async def test_a_workflow_that_cannot_proceed_fails_its_experiment_with_the_reason(
    dev_env: WorkflowEnvironment,
    tmp_path: Path,
    fault: type[WorkflowInboundInterceptor],
    workflow_failures: tuple,
    code: str,
    closed_as: WorkflowExecutionStatus,
) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path)
    engine = make_engine(settings.database_url)
    create_schema(engine)
    acts = ExperimentActivities(engine, LocalBlobStore(tmp_path / "blobs"))
    exp_id = f"wf-fault-{uuid.uuid4().hex[:8]}"
    queue = f"q-{exp_id}"
    workers = build_workers(
        dev_env.client,
        settings,
        ("experiments",),
        workflow_queue=queue,
        aggregation_queue=f"agg-{exp_id}",
        interceptors=[Fault(fault)],
        workflow_failures=workflow_failures,
    )
    started = time.monotonic()
    async with workers[0]:
        handle = await dev_env.client.start_workflow(
            ExperimentWorkflow.run, _experiment(engine, exp_id), id=workflow_id(exp_id), task_queue=queue
        )
        while True:
            # What the worker's watchdog does every 10 s, here every half second.
            await watchdog.check_all(dev_env.client, engine, acts.finish_experiment)
            with session_scope(engine) as s:
                exp = s.get(Experiment, exp_id)
                assert exp is not None
                if exp.status != "running":
                    break
            assert time.monotonic() - started < 30, "the experiment still runs 30 s after its workflow broke"
            await asyncio.sleep(0.5)
        took = time.monotonic() - started
        desc = await handle.describe()
    assert exp.status == "failed" and exp.error_code == code, (exp.status, exp.error_code, exp.error)
    assert "injected fault" in (exp.error or ""), exp.error
    assert desc.status == closed_as
    with session_scope(engine) as s:
        events = s.exec(select(Event).where(Event.experiment_id == exp_id)).all()
    assert any(e.type == "training_failed" and "injected fault" in str(e.payload) for e in events)
    # Once failed, the watchdog leaves it alone.
    assert await watchdog.check_all(dev_env.client, engine, acts.finish_experiment) == {}
    print(f"{code}: failed {took:.1f} s after the start")
