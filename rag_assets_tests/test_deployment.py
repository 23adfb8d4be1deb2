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

from .conftest import ROOT, env_example


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def compose_variables() -> set[str]:
    return set(re.findall(r"(?<!\$)\$\{(\w+)", (ROOT / "docker-compose.yml").read_text()))


def test_services_volumes_ports_and_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {
        "es-certs",
        "elasticsearch",
        "es-users",
        "postgres",
        "redis",
        "celery-worker",
        "webserver",
        "webserver-readonly",
        "daemon",
        "search-api",
        "mcp",
    }
    assert services["search-api"]["command"][:2] == ["rag", "serve"]
    assert "/readyz" in " ".join(services["search-api"]["healthcheck"]["test"])
    assert services["mcp"]["command"][:3] == ["rag", "mcp", "--http"]
    assert services["es-users"]["command"] == ["rag", "es-users"]
    assert services["webserver-readonly"]["profiles"] == ["readonly"]  # opt-in
    assert "--read-only" in services["webserver-readonly"]["command"]
    for name in ("elasticsearch", "postgres", "redis"):
        assert services[name]["healthcheck"]["test"]
    for name in ("elasticsearch", "postgres"):
        volume = services[name]["volumes"][0]
        assert volume.split(":")[0] in compose["volumes"]
    for name in ("webserver", "webserver-readonly", "daemon", "celery-worker"):
        service = services[name]
        assert service["build"] == "."
        for needed in ("postgres", "redis"):
            assert service["depends_on"][needed]["condition"] == "service_healthy"
        assert service["depends_on"]["es-users"]["condition"] == "service_completed_successfully"
    for name in ("search-api", "mcp"):
        assert services[name]["depends_on"] == {"es-users": {"condition": "service_completed_successfully"}}
    assert services["es-users"]["depends_on"]["elasticsearch"]["condition"] == "service_healthy"
    assert (
        services["elasticsearch"]["depends_on"]["es-certs"]["condition"] == "service_completed_successfully"
    )
    for name in ("webserver", "daemon"):
        assert services[name]["command"][-2:] == ["-w", "workspace.yaml"]
    assert services["daemon"]["command"][:2] == ["dagster-daemon", "run"]
    worker = services["celery-worker"]
    command = worker["command"]
    assert command[:4] == ["celery", "-A", "dagster_celery.app", "worker"]
    # the queue dagster_celery's executor sends every step to; one step at a time per worker
    assert command[command.index("-Q") + 1] == "dagster"
    assert command[command.index("--concurrency") + 1] == "1"
    assert worker["deploy"]["replicas"] == 2
    # dagster_celery.app reads dagster_celery_config from the path; the image has it there
    assert (ROOT / "deploy/dagster_celery_config.py").exists()
    assert worker["environment"]["PYTHONPATH"] == "/opt/dagster/app/deploy"


def test_the_runs_steps_go_to_the_celery_workers(compose: dict[str, Any]) -> None:
    """Every service that loads the definitions runs the celery executor on the one broker: the
    daemon's runs send the steps, the workers run them (and keep the run's claim on the data
    directory between steps, which needs RAG_EXECUTOR there too)."""
    from dagster_celery.make_app import make_app

    from rag_assets.defs.execution import executor_for
    from rag_assets.settings import CELERY

    environments = [
        compose["services"][name]["environment"] for name in ("webserver", "daemon", "celery-worker")
    ]
    assert {env["RAG_EXECUTOR"] for env in environments} == {CELERY}
    assert len({env["DAGSTER_CELERY_BROKER_URL"] for env in environments}) == 1
    broker = environments[0]["DAGSTER_CELERY_BROKER_URL"]
    assert broker.startswith("redis://:${REDIS_PASSWORD:?") and broker.endswith("@redis:6379/0")
    assert executor_for(dict(environments[0])).name == "celery"
    # the workers consume the queue the executor sends to
    assert make_app().conf.task_queues[0].name == "dagster"


def test_the_celery_workers_read_the_broker_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setenv("DAGSTER_CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
    spec = importlib.util.spec_from_file_location("config", ROOT / "deploy/dagster_celery_config.py")
    assert spec is not None and spec.loader is not None
    config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config)
    # results come back where the executor reads them; no step is reserved by a busy worker
    assert config.broker_url == config.result_backend == "redis://127.0.0.1:6379/0"
    assert config.worker_prefetch_multiplier == 1
    assert config.worker_disable_prefetch is True


def test_every_variable_has_an_example_value() -> None:
    assert compose_variables() == {
        "POSTGRES_PASSWORD",
        "ELASTIC_PASSWORD",
        "RAG_ES_PIPELINE_PASSWORD",
        "RAG_ES_READER_PASSWORD",
        "REDIS_PASSWORD",
        "DOCUMENTS_URL",
        "RAG_API_KEY",
        "RAG_RERANKER",
        "DAGSTER_UI_BIND",
        "DAGSTER_READONLY_UI_BIND",
        "SEARCH_API_BIND",
        "MCP_BIND",
        "ELASTICSEARCH_BIND",
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
    }
    # the workers open the run's instance (its storage) to record each step's events
    for name in ("webserver", "daemon", "celery-worker"):
        assert needed <= set(compose["services"][name]["environment"])
    config = yaml.safe_load(text)
    # one refresh at a time: a second run would only fail on the data directory's lock
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["run_coordinator"]["config"]["max_concurrent_runs"] == 1
    assert config["run_monitoring"]["enabled"] is True
    # the daemon starts each run as a process; the run hands its steps to Celery (RAG_EXECUTOR)
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster.core.launcher", "DefaultRunLauncher")
    assert "config" not in launcher


def test_the_deployment_instance_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/dagster.yaml as the image holds it: valid, and its launcher and coordinator load
    (storage is Postgres, so the instance itself is not opened here)."""
    from dagster._core.instance.ref import configurable_class_data
    from dagster._core.launcher import DefaultRunLauncher
    from dagster._core.run_coordinator import QueuedRunCoordinator

    (tmp_path / "dagster.yaml").write_bytes((ROOT / "deploy/dagster.yaml").read_bytes())
    config, _ = dagster_instance_config(str(tmp_path), "dagster.yaml")
    for key, cls in (("run_launcher", DefaultRunLauncher), ("run_coordinator", QueuedRunCoordinator)):
        assert type(configurable_class_data(config[key]).rehydrate()) is cls


def test_the_local_instance_config_is_valid() -> None:
    config, _ = dagster_instance_config(str(ROOT), "dagster-instance.yaml")
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
    assert used == {
        "ELASTICSEARCH_URL",
        "ELASTICSEARCH_CA_CERTS",
        "ELASTICSEARCH_USERNAME",
        "ELASTICSEARCH_PASSWORD",
    }
    assert used <= set(ELASTICSEARCH_SETTINGS)
    assert environment["RAG_DATA_DIR"] in {v.split(":")[1] for v in compose["services"]["daemon"]["volumes"]}
