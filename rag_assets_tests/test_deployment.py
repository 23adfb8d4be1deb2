"""The docker-compose deployment, checked without Docker: every file, port and variable it uses exists."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster._core.instance.config import dagster_instance_config
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def compose_variables() -> set[str]:
    return set(re.findall(r"(?<!\$)\$\{(\w+)", (ROOT / "docker-compose.yml").read_text()))


def env_example() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_services_volumes_ports_and_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {
        "elasticsearch",
        "postgres",
        "redis",
        "celery-worker",
        "webserver",
        "daemon",
        "search-api",
    }
    assert services["webserver"]["ports"] == ["3000:3000"]
    assert services["search-api"]["ports"] == ["127.0.0.1:8000:8000"]  # not beyond the host
    assert services["search-api"]["command"][:2] == ["rag", "serve"]
    assert "/readyz" in " ".join(services["search-api"]["healthcheck"]["test"])
    assert services["elasticsearch"]["ports"] == ["9200:9200"]
    for name in ("elasticsearch", "postgres", "redis"):
        assert services[name]["healthcheck"]["test"]
    for name in ("elasticsearch", "postgres"):
        [volume] = services[name]["volumes"]
        assert volume.split(":")[0] in compose["volumes"]
    for name in ("webserver", "daemon", "search-api", "celery-worker"):
        service = services[name]
        assert service["build"] == "."
        for needed in ("elasticsearch", "postgres", "redis"):
            assert service["depends_on"][needed]["condition"] == "service_healthy"
    for name in ("webserver", "daemon"):
        assert services[name]["command"][-2:] == ["-w", "workspace.yaml"]
    assert services["daemon"]["command"][:2] == ["dagster-daemon", "run"]
    worker = services["celery-worker"]
    assert worker["command"][:4] == ["celery", "-A", "dagster_celery.app", "worker"]
    # dagster_celery.app reads dagster_celery_config from the path; the image has it there
    assert (ROOT / "deploy/dagster_celery_config.py").exists()
    assert worker["environment"]["PYTHONPATH"] == "/opt/dagster/app/deploy"


def test_every_variable_has_an_example_value() -> None:
    assert compose_variables() == {
        "POSTGRES_PASSWORD",
        "ELASTIC_PASSWORD",
        "DOCUMENTS_URL",
        "RAG_API_KEY",
        "RAG_RERANKER",
    }
    assert compose_variables() <= set(env_example())


def test_the_instance_config_gets_every_variable_it_reads(compose: dict[str, Any]) -> None:
    text = (ROOT / "deploy/dagster.yaml").read_text()
    needed = set(re.findall(r"\{env: (\w+)\}", text))
    assert needed == {
        "DAGSTER_POSTGRES_USER",
        "DAGSTER_POSTGRES_PASSWORD",
        "DAGSTER_POSTGRES_HOST",
        "DAGSTER_POSTGRES_DB",
        "DAGSTER_CELERY_BROKER_URL",
    }
    for name in ("webserver", "daemon", "celery-worker"):
        assert needed <= set(compose["services"][name]["environment"])
    config = yaml.safe_load(text)
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["run_monitoring"]["enabled"] is True
    # runs go to the Celery workers; the daemon's monitoring reads their state from Redis
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_celery.launcher", "CeleryRunLauncher")
    assert launcher["config"]["backend"] == {"env": "DAGSTER_CELERY_BROKER_URL"}


def test_the_local_instance_config_is_valid() -> None:
    config, _ = dagster_instance_config(str(ROOT), "dagster.yaml")
    assert config["run_monitoring"]["enabled"] is True


def test_every_file_the_image_copies_exists() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    sources = [
        part for line in dockerfile.splitlines() if line.startswith("COPY ") for part in line.split()[1:-1]
    ]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
    assert "--require-hashes -r requirements/deploy.lock" in dockerfile
    assert "--require-hashes -r requirements/dev.lock" in (ROOT / "Makefile").read_text()


def locked(name: str) -> dict[str, str]:
    """Package -> exact version of a lock file, refusing any line without a pin and a hash."""
    pins: dict[str, str] = {}
    for block in (ROOT / "requirements" / name).read_text().split("\n"):
        if block and not block.startswith((" ", "#")):
            requirement, _, rest = block.partition(" ")
            package, pinned, version_ = requirement.partition("==")
            assert pinned and rest.strip() == "\\", block
            pins[canonicalize_name(package.partition("[")[0])] = version_  # gql[requests]==...
    return pins


@pytest.mark.parametrize(("lock", "extras"), [("deploy.lock", ["deploy"]), ("dev.lock", ["dev", "deploy"])])
def test_the_lock_files_pin_every_dependency_within_its_range(lock: str, extras: list[str]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = locked(lock)
    text = (ROOT / "requirements" / lock).read_text()
    assert text.count("--hash=sha256:") >= len(pins)
    wanted = project["dependencies"] + [
        d for extra in extras for d in project["optional-dependencies"][extra]
    ]
    for dependency in map(Requirement, wanted):
        name = canonicalize_name(dependency.name)
        assert name in pins, f"{name} is not in {lock}: run make lock"
        assert dependency.specifier.contains(pins[name]), f"{lock} pins {name}=={pins[name]}: run make lock"


def test_the_tests_run_on_the_locked_versions() -> None:
    """`make setup` installs dev.lock: what is tested is what the lock (and the image) holds."""
    drifted = {
        name: (pinned, version(name))
        for name, pinned in locked("dev.lock").items()
        if version(name) != pinned
    }
    assert not drifted, f"installed versions differ from requirements/dev.lock: {drifted}"


def test_the_client_major_matches_the_server_image(compose: dict[str, Any]) -> None:
    image = compose["services"]["elasticsearch"]["image"]
    server_major = image.rsplit(":", 1)[1].split(".")[0]
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [pin] = [d for d in dependencies if d.startswith("elasticsearch")]
    assert pin == f"elasticsearch>={server_major},<{int(server_major) + 1}"
    assert version("elasticsearch").split(".")[0] == server_major


def test_the_deployment_uses_the_elasticsearch_variables_the_code_reads(compose: dict[str, Any]) -> None:
    from rag_assets.settings import ELASTICSEARCH_SETTINGS

    environment = compose["services"]["daemon"]["environment"]
    used = {name for name in environment if name.startswith("ELASTICSEARCH_")}
    assert used == {"ELASTICSEARCH_URL", "ELASTICSEARCH_USERNAME", "ELASTICSEARCH_PASSWORD"}
    assert used <= set(ELASTICSEARCH_SETTINGS)
    assert environment["RAG_DATA_DIR"] in {v.split(":")[1] for v in compose["services"]["daemon"]["volumes"]}
