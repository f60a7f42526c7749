"""docker-compose.yml cannot run here (no Docker engine), so it is checked by reading it."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from fedloom.cli import build_parser
from fedloom_core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


# ${VAR:?message}: compose refuses to start while VAR is unset or empty.
REQUIRED_VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*):\?[^}]*\}")
# Anything that may hold a secret, by the variable's name.
SECRET_NAME = re.compile(r"PASSWORD|PWD|SECRET|_KEY$|ROOT_USER|ACCESS_KEY_ID")


def _interpolate(value: str) -> str:
    """``value`` with every required variable replaced by a stand-in, as compose would with them set."""
    return REQUIRED_VAR.sub(lambda m: f"x-{m.group(1).lower()}", value)


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
            **{k.removeprefix("FEDLOOM_").lower(): _interpolate(v) for k, v in env.items() if k.startswith("FEDLOOM_")}
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


def _published(svc: dict) -> list[str]:
    return [str(p) for p in svc.get("ports", [])]


def test_only_the_api_is_published_beyond_loopback() -> None:
    """Temporal's frontend has no authentication: whoever reaches 7233 can cancel or signal workflows."""
    services = _compose()["services"]
    for name, svc in services.items():
        if name == "api":
            continue
        for port in _published(svc):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
    for name in ("postgres", "temporal"):
        assert not _published(services[name]), f"{name} must not be published at all"
        assert "expose" not in services[name]
    for name, container_port in (("temporal-ui", "8080"), ("minio", "9001")):
        assert any(p.endswith(f":{container_port}") for p in _published(services[name])), name


def test_backing_services_sit_on_an_internal_network() -> None:
    compose = _compose()
    networks, services = compose["networks"], compose["services"]
    assert networks["backend"]["internal"] is True
    for name in ("postgres", "minio", "temporal", "worker", "aggregator"):
        assert services[name]["networks"] == ["backend"] or (
            name == "minio" and set(services[name]["networks"]) == {"backend", "ops"}
        ), name
    for name, svc in services.items():
        for net in svc.get("networks", []):
            assert net in networks, f"{name} joins undeclared network {net}"
        if _published(svc) and not all(p.startswith("127.0.0.1:") for p in _published(svc)):
            assert name == "api"
    # Postgres and Temporal are reachable from no network that has a route out.
    for name in ("postgres", "temporal"):
        assert all(networks[n] and networks[n].get("internal") for n in services[name]["networks"]), name


def test_secrets_come_from_the_environment_without_defaults() -> None:
    compose = _compose()
    seen = 0
    for name, svc in compose["services"].items():
        env = svc.get("environment", {})
        assert isinstance(env, dict), f"{name}: environment as a mapping, so it can be checked"
        for key, value in env.items():
            value = str(value)
            if SECRET_NAME.search(key):
                seen += 1
                assert REQUIRED_VAR.fullmatch(value), f"{name}.{key} must be ${{VAR:?...}}, got {value!r}"
            if key.endswith("DATABASE_URL"):
                password = value.split("://", 1)[1].split("@", 1)[0].partition(":")[2]
                assert REQUIRED_VAR.fullmatch(password), f"{name}.{key} holds a fixed password"
    assert seen >= 8, "the database, MinIO and admin secrets were not found"
    text = (ROOT / "docker-compose.yml").read_text()
    assert "fedloom-secret" not in text and not re.search(r"\$\{[A-Z_]+:-", text), "a secret with a default"


def test_fedloom_roles_wait_for_a_healthy_temporal() -> None:
    services = _compose()["services"]
    temporal = services["temporal"]
    assert "healthcheck" in temporal and "health" in " ".join(temporal["healthcheck"]["test"])
    for name in ("api", "worker", "aggregator"):
        depends = services[name]["depends_on"]
        assert depends["temporal"] == {"condition": "service_healthy"}, name
        assert depends["postgres"] == {"condition": "service_healthy"}, name
        for dep, spec in depends.items():
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"


def test_tls_settings_reach_uvicorn(tmp_path: Path) -> None:
    import pydantic

    from fedloom_tools.serve import uvicorn_options

    plain = uvicorn_options(Settings(_env_file=None, data_dir=tmp_path))
    assert "ssl_certfile" not in plain and plain["forwarded_allow_ips"] == "127.0.0.1"
    tls = uvicorn_options(
        Settings(
            _env_file=None,
            data_dir=tmp_path,
            tls_certfile="/c.pem",
            tls_keyfile="/k.pem",
            forwarded_allow_ips="10.0.0.2",
        )
    )
    assert (
        tls["ssl_certfile"] == "/c.pem" and tls["ssl_keyfile"] == "/k.pem" and tls["forwarded_allow_ips"] == "10.0.0.2"
    )
    try:
        Settings(_env_file=None, data_dir=tmp_path, tls_certfile="/c.pem")
    except pydantic.ValidationError as exc:
        assert "FEDLOOM_TLS_KEYFILE" in str(exc)
    else:
        raise AssertionError("a certificate without its key was accepted")
