"""Prometheus and Grafana in docker-compose.yml, checked by reading them (no Docker engine here).

The dashboard's queries must name metrics that fedloom exports: the ``fedloom_*`` names are checked
here against the collectors themselves; the ``temporal_*`` names against a live worker's in
``test_metrics_run.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from fedloom_core.storage.db import create_schema, make_engine

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "fedloom.json"
METRIC_NAME = re.compile(r"\b((?:fedloom|temporal)_[a-z0-9_]+)")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def dashboard_metrics() -> set[str]:
    """Every metric name the dashboard's queries use."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    assert exprs
    return {name for expr in exprs for name in METRIC_NAME.findall(expr)}


def _exported_fedloom_names(tmp_path: Path) -> set[str]:
    """The sample names fedloom's collectors can produce: the database's and the processes' own."""
    import api.prometheus as prom
    import workers.metrics  # noqa: F401 - defines the worker's metrics in the default registry

    engine = make_engine(f"sqlite:///{tmp_path / 'metrics.db'}")
    create_schema(engine)
    families = list(prom.DatabaseCollector(engine).collect()) + list(REGISTRY.collect())
    names = set()
    for family in families:
        for suffix in SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def test_every_fedloom_metric_on_the_dashboard_is_exported(tmp_path: Path) -> None:
    used = {name for name in dashboard_metrics() if name.startswith("fedloom_")}
    exported = _exported_fedloom_names(tmp_path)
    assert len(used) >= 10
    assert used <= exported, used - exported


def test_the_dashboard_is_provisioned_from_prometheus() -> None:
    board = json.loads(DASHBOARD.read_text())
    sources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    uids = {t["datasource"]["uid"] for panel in board["panels"] for t in panel["targets"]}
    assert uids == {source["uid"]}
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/fedloom.yml").read_text())["providers"][0]
    grafana = _compose()["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"] if v.startswith("./")}
    assert mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"


def test_prometheus_scrapes_the_api_with_the_admin_key_and_the_workers_ports() -> None:
    compose = _compose()
    services = compose["services"]
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    api = jobs["fedloom-api"]
    assert api["metrics_path"] == "/metrics"
    secret = Path(api["authorization"]["credentials_file"])
    assert secret.parent == Path("/run/secrets") and secret.name in services["prometheus"]["secrets"]
    assert compose["secrets"][secret.name] == {"environment": "FEDLOOM_ADMIN_API_KEY"}
    (api_sd,) = api["dns_sd_configs"]
    assert api_sd["names"] == ["api"] and str(api_sd["port"]) in services["api"]["command"]
    (workers_sd,) = jobs["fedloom-workers"]["dns_sd_configs"]
    assert set(workers_sd["names"]) == {"worker", "aggregator"}
    address = compose["x-fedloom-env"]["FEDLOOM_WORKER_METRICS_ADDRESS"]
    assert address.rpartition(":")[2] == str(workers_sd["port"])
    for name in ("api", "worker", "aggregator"):
        assert services[name]["environment"]["FEDLOOM_WORKER_METRICS_ADDRESS"] == address
        # Prometheus reaches every scraped service on a network they share.
        assert set(services[name]["networks"]) & set(services["prometheus"]["networks"]), name
    assert set(services["grafana"]["networks"]) & set(services["prometheus"]["networks"])


def test_grafana_and_prometheus_are_loopback_only_without_fixed_passwords() -> None:
    services = _compose()["services"]
    for name in ("prometheus", "grafana"):
        ports = [str(p) for p in services[name]["ports"]]
        assert ports and all(p.startswith("127.0.0.1:") for p in ports), name
    env = services["grafana"]["environment"]
    assert re.fullmatch(r"\$\{FEDLOOM_GRAFANA_PASSWORD:\?[^}]*\}", env["GF_SECURITY_ADMIN_PASSWORD"])
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
