"""The deployment is safe to start on a shared network (issue 30): local binds, least-privilege
Elasticsearch users, TLS verified with the cluster's CA, an authenticated broker; checked on the
compose file and by the requests each component sends."""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import re
import secrets
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from elasticsearch import ApiError

from rag_assets import settings
from rag_assets.defs.resources import environment_resources
from rag_assets.index.backend import IndexContent
from rag_assets.index.elasticsearch import (
    PIPELINE_ROLE,
    READER_ROLE,
    ElasticsearchSettings,
    create_users,
    roles,
)

from .conftest import ROOT, env_example, rag
from .fake_elasticsearch import FakeElasticsearch

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
SECRETS = {
    "ELASTIC_PASSWORD",
    "RAG_ES_PIPELINE_PASSWORD",
    "RAG_ES_READER_PASSWORD",
    "POSTGRES_PASSWORD",
    "REDIS_PASSWORD",
    "RAG_API_KEY",
}
# What each service does with each credential it gets; anything more fails the test below.
USES: dict[str, set[str]] = {
    "es-certs": set(),  # makes the CA and the node's certificate
    "elasticsearch": {"ELASTIC_PASSWORD"},  # the superuser's password is set on first start
    "es-users": {"ELASTIC_PASSWORD", "RAG_ES_PIPELINE_PASSWORD", "RAG_ES_READER_PASSWORD"},  # creates them
    "postgres": {"POSTGRES_PASSWORD"},
    "redis": {"REDIS_PASSWORD"},  # requirepass, and its own health check
    # run storage, the steps' queue, the index (publishing it; the daemon's sensor reads it)
    "daemon": {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "RAG_ES_PIPELINE_PASSWORD"},
    "celery-worker": {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "RAG_ES_PIPELINE_PASSWORD"},
    # run storage; the broker only as the celery executor's setting of the definitions it loads
    "webserver": {"POSTGRES_PASSWORD", "REDIS_PASSWORD"},
    "webserver-readonly": {"POSTGRES_PASSWORD", "REDIS_PASSWORD"},
    "search-api": {"RAG_ES_READER_PASSWORD", "RAG_API_KEY"},  # reads the index, asks its clients
    "mcp": {"RAG_ES_READER_PASSWORD", "RAG_API_KEY"},
}
EXAMPLE = env_example()


def substituted(value: str, values: dict[str, str]) -> str:
    """Compose's `${NAME}`, `${NAME:-default}` and `${NAME:?message}` with `values` (an .env)."""

    def one(match: re.Match[str]) -> str:
        name, kind, rest = match.group(1), match.group(2) or "", match.group(3) or ""
        if values.get(name):
            return values[name]
        if kind == ":-":
            return rest
        raise AssertionError(f"{name} unset: {rest}")

    return re.sub(r"(?<!\$)\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


def test_every_published_port_binds_this_host_unless_env_says_otherwise() -> None:
    published = {name: service.get("ports", []) for name, service in SERVICES.items()}
    assert {name for name, ports in published.items() if ports} == {
        "elasticsearch",
        "webserver",
        "webserver-readonly",
        "search-api",
        "mcp",
    }
    for name, ports in published.items():
        for port in ports:
            for env in ({}, EXAMPLE):  # the defaults, and .env.example as shipped
                host, _, _ = substituted(port, env).rpartition(":")[0].rpartition(":")
                assert host == "127.0.0.1", f"{name} publishes {port} on {host or 'every interface'}"
            assert port.startswith("${") and "_BIND:-127.0.0.1}" in port, f"{name}: bind not set by .env"


def test_each_service_gets_only_the_credentials_it_uses() -> None:
    assert set(USES) == set(SERVICES)
    for name, service in SERVICES.items():
        given = {
            secret
            for value in (service.get("environment") or {}).values()
            for secret in re.findall(r"\$\{(\w+)", str(value))
            if secret in SECRETS
        }
        assert given == USES[name], f"{name} gets {sorted(given - USES[name])}, uses {sorted(USES[name])}"
    # the CA's and the node's keys stay with Elasticsearch; the others mount the CA's certificate
    for name, service in SERVICES.items():
        mounted = {volume.split(":")[0] for volume in service.get("volumes", [])}
        assert ("es-certs" in mounted) == (name in {"es-certs", "elasticsearch"}), name
        assert ("dagster-data" in mounted) == (USES[name] >= {"POSTGRES_PASSWORD"} and name != "postgres")
    users = {
        name: s["environment"].get("ELASTICSEARCH_USERNAME")
        for name, s in SERVICES.items()
        if "environment" in s
    }
    assert {n: u for n, u in users.items() if u} == {
        "es-users": "elastic",
        "daemon": "rag_pipeline",
        "celery-worker": "rag_pipeline",
        "search-api": "rag_reader",
        "mcp": "rag_reader",
    }


def test_every_client_verifies_the_cluster_over_https() -> None:
    for name, service in SERVICES.items():
        env = service.get("environment") or {}
        if "ELASTICSEARCH_URL" in env:
            assert env["ELASTICSEARCH_URL"].startswith("https://"), name
            assert env["ELASTICSEARCH_CA_CERTS"] == "/certs/ca.crt", name
            assert "ELASTICSEARCH_VERIFY_CERTS" not in env, name
    cluster = SERVICES["elasticsearch"]["environment"]
    assert cluster["xpack.security.http.ssl.enabled"] == "true"


def test_redis_asks_for_its_password_which_no_file_or_argument_holds() -> None:
    redis = SERVICES["redis"]
    command = " ".join(redis["command"])
    assert "requirepass" in command and "| redis-server -" in command  # the config on stdin
    assert "$$REDIS_PASSWORD" in command  # expanded by the container's shell, not by compose
    for name in ("daemon", "celery-worker", "webserver"):
        broker = SERVICES[name]["environment"]["DAGSTER_CELERY_BROKER_URL"]
        assert broker.startswith("redis://:${REDIS_PASSWORD:?")


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def cluster() -> Any:
    fake = FakeElasticsearch()
    yield fake
    fake.close()


def test_es_users_creates_a_pipeline_and_a_read_only_user(cluster: FakeElasticsearch, tmp_path: Path) -> None:
    env = {
        "ELASTICSEARCH_URL": cluster.url,
        "ELASTICSEARCH_USERNAME": "elastic",
        "ELASTICSEARCH_PASSWORD": "superuser-secret",
        "ELASTICSEARCH_ALIAS": "faq",
    }
    missing = rag("es-users", data_dir=tmp_path, **env)
    assert missing.returncode == 1 and cluster.requests == []
    assert missing.stderr == (
        "rag: error: set RAG_ES_PIPELINE_PASSWORD and RAG_ES_READER_PASSWORD: the passwords of the "
        "users this creates\n"
    )
    done = rag(
        "es-users",
        data_dir=tmp_path,
        RAG_ES_PIPELINE_PASSWORD="pipe-secret",
        RAG_ES_READER_PASSWORD="read-secret",
        **env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "role and user rag_pipeline: create_index, delete_index, manage, read, write, view_index_metadata "
        "on faq and faq-*",
        "role and user rag_reader: read, view_index_metadata on faq and faq-*",
    ]
    assert "secret" not in done.stdout + done.stderr
    assert cluster.security["role"] == roles("faq")
    assert cluster.security["role"]["rag_reader"]["cluster"] == []
    assert cluster.security["user"] == {
        "rag_pipeline": {"password": "pipe-secret", "roles": ["rag_pipeline"]},
        "rag_reader": {"password": "read-secret", "roles": ["rag_reader"]},
    }
    assert {r.headers["authorization"] for r in cluster.requests} == {basic("elastic", "superuser-secret")}


def component_environment(service: str, cluster: FakeElasticsearch) -> dict[str, str]:
    """The ELASTICSEARCH_* variables compose gives `service`, valued from .env.example, pointed
    at the fake on 127.0.0.1 (which speaks http)."""
    env = {
        name: substituted(str(value), EXAMPLE)
        for name, value in SERVICES[service]["environment"].items()
        if name.startswith("ELASTICSEARCH_")
    }
    env.pop("ELASTICSEARCH_CA_CERTS")
    return env | {"ELASTICSEARCH_URL": cluster.url}


@pytest.mark.parametrize("service", ["search-api", "mcp"])
def test_the_search_services_send_the_read_only_users_credentials(
    service: str, cluster: FakeElasticsearch, tmp_path: Path
) -> None:
    done = rag("stats", data_dir=tmp_path, **component_environment(service, cluster))
    assert done.returncode == 1  # nothing published: the reader asked, and only read
    assert {(r.method, r.headers["authorization"]) for r in cluster.requests} == {
        ("GET", basic("rag_reader", EXAMPLE["RAG_ES_READER_PASSWORD"]))
    }


def test_the_pipeline_publishes_with_its_own_users_credentials(
    cluster: FakeElasticsearch, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content_2025: IndexContent
) -> None:
    env = component_environment("celery-worker", cluster) | {"RAG_DATA_DIR": str(tmp_path)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # the resource reads the password as a dg.EnvVar
    resources = environment_resources(env)
    search_index = resources["search_index"]
    backend = search_index.model_copy(
        update={"elasticsearch": search_index.elasticsearch.process_config_and_initialize()}
    ).backend()
    backend.publish(content_2025)
    assert {"PUT", "POST", "GET"} <= {r.method for r in cluster.requests}
    assert {r.headers["authorization"] for r in cluster.requests} == {
        basic("rag_pipeline", EXAMPLE["RAG_ES_PIPELINE_PASSWORD"])
    }


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ca")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test CA",
         "-keyout", str(directory / "ca.key"), "-out", str(directory / "ca.crt")],
        check=True, capture_output=True,
    )  # fmt: skip
    return directory / "ca.crt"


def test_the_client_verifies_with_the_named_ca(ca_file: Path) -> None:
    configured = ElasticsearchSettings(
        url="https://elasticsearch:9200", username="rag_reader", password="x", ca_certs=str(ca_file)
    )
    [node] = configured.client().transport.node_pool.all()
    assert node.config.verify_certs is True and node.config.ca_certs == str(ca_file)
    assert configured.risks() == []


@pytest.mark.filterwarnings("ignore:Connecting to .* verify_certs=False")  # the client's own
@pytest.mark.parametrize(
    ("url", "verify", "credentials", "warned"),
    [
        (
            "http://elasticsearch:9200",
            True,
            True,
            "the credentials and every document cross the network in clear",
        ),
        ("http://elasticsearch:9200", True, False, None),  # nothing secret to leak
        ("http://127.0.0.1:9200", True, True, None),  # loopback: no network
        ("https://elasticsearch:9200", False, True, "the cluster's certificate is not checked"),
        ("https://elasticsearch:9200", True, True, None),
    ],
)
def test_a_risky_connection_is_logged_naming_the_risk(
    url: str, verify: bool, credentials: bool, warned: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    configured = ElasticsearchSettings(
        url=url, verify_certs=verify, **({"api_key": "k"} if credentials else {})
    )
    with caplog.at_level(logging.WARNING, logger="rag_assets.index.elasticsearch"):
        configured.client()
    said = [record.getMessage() for record in caplog.records]
    if warned is None:
        assert said == []
    else:
        assert len(said) == 1 and warned in said[0] and ("ELASTICSEARCH_" in said[0]), said


@pytest.mark.elasticsearch
@pytest.mark.skipif(
    not os.environ.get("ELASTICSEARCH_URL"), reason="ELASTICSEARCH_URL is not set: no live cluster"
)
def test_the_restricted_users_can_do_their_work_and_no_more(content_2025: IndexContent) -> None:
    """On a live cluster, as a user that may manage security: the pipeline user publishes, the
    reader searches and is refused a write, neither may touch another alias's indices."""
    admin = settings.elasticsearch(os.environ)
    assert admin is not None
    alias = f"rag-security-{uuid.uuid4().hex[:8]}"
    passwords = {role: secrets.token_urlsafe(16) for role in (PIPELINE_ROLE, READER_ROLE)}
    create_users(admin.client(), alias, passwords)
    as_user = {
        role: dataclasses.replace(admin, alias=alias, api_key=None, username=role, password=passwords[role])
        for role in passwords
    }
    pipeline = as_user[PIPELINE_ROLE].open_index()
    try:
        pipeline.publish(content_2025)
        reader = as_user[READER_ROLE].open_index()
        assert reader.stats().entries == 948
        assert reader.lexical_search(["join", "course"], None, 3)
        with pytest.raises(ApiError) as refused:
            reader.client.indices.create(index=f"{alias}-by-the-reader")
        assert refused.value.meta.status == 403
        with pytest.raises(ApiError) as elsewhere:
            pipeline.client.indices.create(index=f"other-{alias}")
        assert elsewhere.value.meta.status == 403
    finally:
        for version in dataclasses.replace(admin, alias=alias).open_index().versions():
            admin.client().options(ignore_status=404).indices.delete(index=version.name)
        for role in passwords:
            admin.client().options(ignore_status=404).security.delete_user(username=role)
            admin.client().options(ignore_status=404).security.delete_role(name=role)
