"""Configuration from the environment, read in one place for the Dagster definitions and the CLI."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import dagster as dg

from rag_assets.resources import (
    DocumentSourceResource,
    ElasticsearchResource,
    NlpResource,
    SearchIndexResource,
)
from rag_assets.sources import DEFAULT_DOCUMENTS_URL

DEFAULT_DATA_DIR = ".rag"
# ELASTICSEARCH_* variable -> ElasticsearchResource field; only variables that are set are used.
ELASTICSEARCH_SETTINGS = {
    "ELASTICSEARCH_URL": "url",
    "ELASTICSEARCH_API_KEY": "api_key",
    "ELASTICSEARCH_USERNAME": "username",
    "ELASTICSEARCH_PASSWORD": "password",
    "ELASTICSEARCH_VERIFY_CERTS": "verify_certs",
    "ELASTICSEARCH_CA_CERTS": "ca_certs",
    "ELASTICSEARCH_TIMEOUT_S": "request_timeout_s",
    "ELASTICSEARCH_MAX_RETRIES": "max_retries",
    "ELASTICSEARCH_ALIAS": "alias",
    "ELASTICSEARCH_SHARDS": "shards",
    "ELASTICSEARCH_REPLICAS": "replicas",
    "ELASTICSEARCH_KEEP_PREVIOUS": "keep_previous",
}
SECRETS = {"ELASTICSEARCH_API_KEY", "ELASTICSEARCH_PASSWORD"}


def data_dir(env: Mapping[str, str] = os.environ) -> Path:
    return Path(env.get("RAG_DATA_DIR") or DEFAULT_DATA_DIR)


def document_source(env: Mapping[str, str] = os.environ) -> DocumentSourceResource:
    return DocumentSourceResource(url=env.get("DOCUMENTS_URL") or DEFAULT_DOCUMENTS_URL)


def nlp_resource(env: Mapping[str, str] = os.environ) -> NlpResource:
    processes = env.get("RAG_NLP_PROCESSES")
    return NlpResource(**({"processes": int(processes)} if processes else {}))


def elasticsearch(env: Mapping[str, str] = os.environ, *, for_dagster: bool) -> ElasticsearchResource | None:
    """None unless ELASTICSEARCH_URL is set. For Dagster, secrets stay `dg.EnvVar`s: Dagster
    resolves them at run time and shows only the variable's name, never its value."""
    if not env.get("ELASTICSEARCH_URL"):
        return None
    fields: dict[str, object] = {
        field: dg.EnvVar(name) if for_dagster and name in SECRETS else env[name]
        for name, field in ELASTICSEARCH_SETTINGS.items()
        if env.get(name)
    }
    return ElasticsearchResource(**fields)  # pydantic converts "false", "30", ... to the field types


def search_index(env: Mapping[str, str] = os.environ, *, for_dagster: bool = False) -> SearchIndexResource:
    return SearchIndexResource(
        data_dir=str(data_dir(env)), elasticsearch=elasticsearch(env, for_dagster=for_dagster)
    )
