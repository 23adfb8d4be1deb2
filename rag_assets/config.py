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
    QualityResource,
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
QUALITY_SETTINGS = {
    "RAG_MAX_ENTRY_DROP": "max_entry_drop",
    "RAG_MAX_ZERO_VECTOR_SHARE": "max_zero_vector_share",
    "RAG_MAX_EMPTY_LEMMA_SHARE": "max_empty_lemma_share",
    "RAG_GROUND_TRUTH": "ground_truth",
    "RAG_EVAL_MIN_HIT_RATE": "min_hit_rate",
    "RAG_EVAL_MIN_MRR": "min_mrr",
    "RAG_EVAL_K": "eval_k",
}


def data_dir(env: Mapping[str, str] = os.environ) -> Path:
    return Path(env.get("RAG_DATA_DIR") or DEFAULT_DATA_DIR)


def document_source(env: Mapping[str, str] = os.environ) -> DocumentSourceResource:
    return DocumentSourceResource(url=env.get("DOCUMENTS_URL") or DEFAULT_DOCUMENTS_URL)


NLP_SETTINGS = {
    "RAG_NLP_PROCESSES": "processes",
    "RAG_NLP_BATCH_SIZE": "batch_size",
    "RAG_NLP_MIN_TEXTS_PER_PROCESS": "min_texts_per_process",
    "RAG_NLP_CACHE_TTL_DAYS": "cache_ttl_days",
}


def nlp_resource(env: Mapping[str, str] = os.environ) -> NlpResource:
    settings = {field: env[name] for name, field in NLP_SETTINGS.items() if env.get(name)}
    return NlpResource(cache_dir=str(data_dir(env) / "cache"), **settings)


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


def quality(env: Mapping[str, str] = os.environ) -> QualityResource:
    return QualityResource(**{field: env[name] for name, field in QUALITY_SETTINGS.items() if env.get(name)})


def schedule_cron(env: Mapping[str, str] = os.environ) -> str:
    return env.get("RAG_SCHEDULE_CRON") or "0 0 * * *"


def schedule_timezone(env: Mapping[str, str] = os.environ) -> str:
    return env.get("RAG_SCHEDULE_TIMEZONE") or "UTC"


def max_runtime_s(env: Mapping[str, str] = os.environ) -> int:
    return int(env.get("RAG_MAX_RUNTIME_S") or 3600)


def freshness_hours(env: Mapping[str, str] = os.environ) -> tuple[float, float]:
    """(warn, fail): warn once a daily refresh was missed (24 h plus an hour for the run itself),
    fail after a further margin."""
    warn = float(env.get("RAG_FRESHNESS_WARN_HOURS") or 25)
    fail = float(env.get("RAG_FRESHNESS_FAIL_HOURS") or 37)
    if fail <= warn:
        raise ValueError(f"RAG_FRESHNESS_FAIL_HOURS ({fail}) must exceed RAG_FRESHNESS_WARN_HOURS ({warn})")
    return warn, fail
