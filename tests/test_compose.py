"""The container deployment files: docker-compose.yml wires the distributed service, the Dockerfile builds it."""
import posixpath
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES = COMPOSE["services"]
APP = ("migrate", "api", "worker")


def _command(name):
    cmd = SERVICES[name]["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def _env(name):
    env = SERVICES[name]["environment"]
    return env if isinstance(env, dict) else dict(item.split("=", 1) for item in env)


def _store_mount(name):
    for vol in SERVICES[name]["volumes"]:
        source, target = vol.split(":")[:2] if isinstance(vol, str) else (vol["source"], vol["target"])
        if source == "store":
            return target
    raise AssertionError(f"{name} does not mount the store volume")


def test_all_services_present():
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(SERVICES)
    assert {"pgdata", "store"} <= set(COMPOSE["volumes"])


@pytest.mark.parametrize("name", ["api", "worker"])
def test_app_waits_for_migrations_and_healthy_backends(name):
    deps = SERVICES[name]["depends_on"]
    assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert deps["postgres"]["condition"] == "service_healthy"
    assert deps["redis"]["condition"] == "service_healthy"


def test_migrate_waits_for_postgres():
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert _command("migrate")[:2] == ["peer-service", "migrate"]


@pytest.mark.parametrize("name", APP)
def test_app_points_at_postgres_and_redis(name):
    env = _env(name)
    db = urlsplit(env["PEER_DATABASE_URL"])
    assert db.scheme == "postgresql+psycopg" and db.hostname == "postgres"
    assert env["PEER_BROKER_URL"].startswith("redis://redis:6379")


def test_the_front_publishes_8000_on_the_hosts_loopback_only_and_the_api_scales():
    # without PEER_API_KEYS every mutating route is open: only this machine may reach the published port
    assert [str(p) for p in SERVICES["front"]["ports"]] == ["127.0.0.1:8000:8000"]
    assert "ports" not in SERVICES["api"]  # nothing fixed on the host: `--scale api=N` starts N replicas
    assert _env("api")["PEER_ALLOW_OPEN"] == "true"  # the containers' 0.0.0.0 is reached through the front only
    assert _command("api")[:2] == ["peer-service", "api"]
    assert "/healthz" in " ".join(SERVICES["api"]["healthcheck"]["test"])


def test_the_front_proxies_to_every_api_replica_and_streams():
    mount = SERVICES["front"]["volumes"][0].split(":")
    conf = (ROOT / mount[0]).read_text()
    assert mount[1] == "/etc/nginx/nginx.conf"
    assert "resolver 127.0.0.11" in conf and "set $api http://api:8000;" in conf  # re-resolved: new replicas join
    assert "proxy_buffering off;" in conf and "proxy_request_buffering off;" in conf
    assert SERVICES["front"]["depends_on"]["api"]["condition"] == "service_healthy"


def test_worker_runs_worker():
    assert _command("worker")[:2] == ["peer-service", "worker"]


def test_store_volume_shared_and_holds_store_dir():
    api_path, worker_path = _store_mount("api"), _store_mount("worker")
    assert api_path == worker_path
    store_dir = posixpath.normpath(_env("worker")["PEER_STORE_DIR"])
    assert store_dir == api_path or store_dir.startswith(api_path.rstrip("/") + "/")


def test_gpu_reservation_is_commented_out():
    assert "deploy" not in SERVICES["worker"]
    lines = [line.strip() for line in COMPOSE_TEXT.splitlines()]
    assert any(line.startswith("#") and "driver: nvidia" in line for line in lines)
    assert not any("driver: nvidia" in line and not line.startswith("#") for line in lines)


def test_dockerfile_installs_cpu_torch_and_copies_migrations():
    text = (ROOT / "Dockerfile").read_text()
    torch_line = next(l for l in text.splitlines() if "pip install" in l and "torch==" in l)
    assert "torch==2.13.0" in torch_line
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_line
    assert any(l.startswith("COPY") and "migrations" in l for l in text.splitlines())
