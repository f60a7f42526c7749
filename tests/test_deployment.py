"""docker-compose.yml cannot run here (no Docker engine), so it is checked by reading it."""

from __future__ import annotations

from pathlib import Path

import yaml

from fedloom.cli import build_parser
from fedloom_core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_every_role_and_its_dependencies() -> None:
    services = _compose()["services"]
    assert {"postgres", "minio", "temporal", "temporal-ui", "api", "worker", "aggregator"} <= services.keys()
    for name in ("api", "worker", "aggregator"):
        svc = services[name]
        assert svc["build"] == "."
        assert {"postgres", "minio", "temporal"} <= set(svc["depends_on"])


def test_fedloom_services_run_real_subcommands_with_valid_settings() -> None:
    services = _compose()["services"]
    parser = build_parser()
    fields = {f"FEDLOOM_{name.upper()}" for name in Settings.model_fields}
    for name in ("api", "worker", "aggregator"):
        svc = services[name]
        cmd = svc["command"]
        assert cmd[0] == "fedloom"
        args = parser.parse_args(cmd[1:])  # exits (fails the test) on an unknown flag
        if args.command == "worker":
            assert set(args.queues.split(",")) <= {"experiments", "aggregation"}
        env = {k: str(v) for k, v in svc["environment"].items()}
        unknown = {k for k in env if k.startswith("FEDLOOM_")} - fields
        assert not unknown, f"{name} sets settings that do not exist: {unknown}"
        settings = Settings(
            **{
                k.removeprefix("FEDLOOM_").lower(): v
                for k, v in env.items()
                if k.startswith("FEDLOOM_") and "${" not in v
            }
        )
        assert settings.database_url.startswith("postgresql+psycopg://")
        assert settings.blob_url.startswith("s3://") and settings.s3_endpoint_url
    queues = {services[n]["command"][-1] for n in ("worker", "aggregator")}
    assert queues == {"experiments", "aggregation"}, "both task queues need a worker"


def test_dockerfile_installs_cpu_torch_before_the_project() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.index("torch==2.13.0") < text.index("pip install .")


def test_every_image_has_a_pinned_version_tag() -> None:
    for name, svc in _compose()["services"].items():
        if "image" not in svc:
            assert svc.get("build") == ".", name
            continue
        image = svc["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and any(ch.isdigit() for ch in tag), f"{name}: {image}"


def test_demo_clients_are_a_profile() -> None:
    svc = _compose()["services"]["demo-client"]
    assert svc["profiles"] == ["demo"] and "fedloom client" in svc["entrypoint"][-1]
