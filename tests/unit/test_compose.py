"""The compose deployment, checked by parsing (no Docker engine on CI machines)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from backend.app.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
SETTINGS_ENV = {name.upper() for name in Settings.model_fields}


def _env(service: str) -> dict:
    return SERVICES[service].get("environment", {})


def test_all_services_present():
    assert {"redis", "postgres", "api", "worker", "ui"} <= set(SERVICES)


@pytest.mark.parametrize("service", ["redis", "postgres", "api", "worker", "ui"])
def test_every_service_has_a_healthcheck(service):
    check = SERVICES[service]["healthcheck"]
    assert check["test"] and check["interval"] and check["retries"] >= 3


def test_ports():
    assert SERVICES["api"]["ports"] == ["${API_PORT:-8000}:8000"]
    assert SERVICES["ui"]["ports"] == ["${UI_PORT:-7860}:7860"]
    assert "ports" not in SERVICES["postgres"] and "ports" not in SERVICES["redis"]


def test_worker_reserves_a_gpu_and_consumes_the_gpu_queue():
    devices = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    command = SERVICES["worker"]["command"]
    assert command[command.index("-Q") + 1] == "gpu"
    assert command[command.index("--concurrency") + 1] == "1"
    assert SERVICES["worker"]["build"]["dockerfile"] == "docker/Dockerfile.cuda"


def test_cpu_override_drops_the_gpu_reservation():
    text = (ROOT / "docker-compose.cpu.yml").read_text()
    assert "deploy: !reset {}" in text
    assert "docker/Dockerfile\n" in text


def test_named_volumes_and_read_only_datasets():
    volumes = COMPOSE["volumes"]
    assert {"pg-data", "models", "checkpoints", "embedding-cache", "datasets"} <= set(volumes)
    assert "pg-data:/var/lib/postgresql/data" in SERVICES["postgres"]["volumes"]
    for service in ("api", "worker"):
        mounts = SERVICES[service]["volumes"]
        assert "datasets:/srv/datasets:ro" in mounts
        assert "checkpoints:/srv/runs" in mounts and "models:/srv/models" in mounts
    assert "embedding-cache:/srv/cache" in SERVICES["worker"]["volumes"]


def test_start_order_migrations_before_api_and_worker():
    for service in ("api", "worker"):
        depends = SERVICES[service]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["redis"]["condition"] == "service_healthy"
    assert SERVICES["ui"]["depends_on"]["api"]["condition"] == "service_healthy"
    assert SERVICES["migrate"]["command"] == ["ultrarefiner", "db-upgrade"]


@pytest.mark.parametrize("service", ["migrate", "api", "worker"])
def test_backend_services_get_every_setting_they_need(service):
    env = _env(service)
    for required in ("DATABASE_URL", "REDIS_URL", "ADMIN_TOKEN", "MODELS_DIR", "RUNS_DIR", "CACHE_DIR"):
        assert env.get(required), f"{service} lacks {required}"
    assert env["DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    # Every variable set is one the settings actually read (no silently ignored typo).
    assert set(env) <= SETTINGS_ENV, set(env) - SETTINGS_ENV


def test_shared_paths_are_the_mounted_volumes():
    for service in ("api", "worker"):
        env, mounts = _env(service), SERVICES[service]["volumes"]
        mounted = {m.split(":")[1] for m in mounts}
        for variable in ("MODELS_DIR", "RUNS_DIR"):
            assert env[variable] in mounted
    # The API's ONNX exports live on the shared models volume, not inside one container.
    assert _env("api")["ONNX_CACHE_DIR"].startswith(_env("api")["MODELS_DIR"] + "/")
    assert _env("api")["INFERENCE_ENGINE"] == "${INFERENCE_ENGINE:-auto}"


def test_ui_points_at_the_api():
    assert _env("ui")["API_URL"] == "http://api:8000"
    assert set(_env("ui")) <= SETTINGS_ENV


def test_env_example_covers_every_compose_variable():
    text = (ROOT / "docker-compose.yml").read_text()
    referenced = set(re.findall(r"\$\{([A-Z_]+)(?::[-?][^}]*)?\}", text))
    example = {
        line.split("=", 1)[0]
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert referenced <= example, referenced - example


@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile", "docker/Dockerfile.cuda"])
def test_dockerfiles_install_like_the_readme(dockerfile):
    text = (ROOT / dockerfile).read_text()
    assert "FROM python:3.11" in text
    assert "bash scripts/setup.sh" in text
