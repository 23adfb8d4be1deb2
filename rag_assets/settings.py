"""Configuration from the environment, read in one place for the Dagster layer and the CLI."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from rag_assets.common.errors import RagError
from rag_assets.index.backend import RERANKER_MODES, SearchBackend
from rag_assets.index.elasticsearch import ElasticsearchSettings
from rag_assets.index.embedded import EmbeddedIndex

DEFAULT_DATA_DIR = ".rag"
# Chosen by measurement (docs/retrieval.md, The default mode): the features mode ranks better than
# the fused order on dev and on the held-out courses at no index cost and about a millisecond per
# query; the semantic mode's sentence vectors cost hours per million chunks on two cores.
DEFAULT_RERANKER = "features"
# ELASTICSEARCH_* variable -> ElasticsearchSettings field; only variables that are set are used.
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
SOURCE_SETTINGS = {
    "RAG_FETCH_TIMEOUT_S": "timeout_s",
    "RAG_FETCH_RETRIES": "retries",
    "RAG_FETCH_DEADLINE_S": "deadline_s",
    "RAG_FETCH_MAX_RETRY_AFTER_S": "max_retry_after_s",
    "RAG_MAX_ENTRY_CHARS": "max_entry_chars",
}
NLP_SETTINGS = {
    "RAG_NLP_PROCESSES": "processes",
    "RAG_NLP_BATCH_SIZE": "batch_size",
    "RAG_NLP_MIN_TEXTS_PER_PROCESS": "min_texts_per_process",
    "RAG_NLP_CACHE_TTL_DAYS": "cache_ttl_days",
}
QUALITY_SETTINGS = {
    "RAG_MAX_ENTRY_DROP": "max_entry_drop",
    "RAG_MAX_COURSE_ENTRY_DROP": "max_course_entry_drop",
    "RAG_MAX_ZERO_VECTOR_SHARE": "max_zero_vector_share",
    "RAG_MAX_EMPTY_LEMMA_SHARE": "max_empty_lemma_share",
    "RAG_MAX_BLANK_ANSWER_SHARE": "max_blank_answer_share",
    "RAG_MAX_DUPLICATE_SHARE": "max_duplicate_share",
    "RAG_MAX_ANSWER_CHURN": "max_answer_churn",
    "RAG_GROUND_TRUTH": "ground_truth",
    "RAG_EVAL_MIN_HIT_RATE": "min_hit_rate",
    "RAG_EVAL_MIN_MRR": "min_mrr",
    "RAG_EVAL_K": "eval_k",
    "RAG_MAX_QUALITY_DROP": "max_quality_drop",
    "RAG_GATE_PROBES": "gate_probes",
    "RAG_GATE_ANSWER_PROBES": "answer_probes",
    "RAG_MAX_ANSWER_PROBE_DROP": "max_answer_probe_drop",
}


def present(env: Mapping[str, str], table: Mapping[str, str]) -> dict[str, str]:
    """field -> value for the variables of `table` that are set and not empty."""
    return {field: env[name] for name, field in table.items() if env.get(name)}


def data_dir(env: Mapping[str, str] = os.environ, cwd: Path | None = None) -> Path:
    """RAG_DATA_DIR, else the nearest `.rag` in the current directory or above it (as git finds
    `.git`), so `rag` finds the index `make run` wrote from anywhere in the project; else ./.rag.
    Always absolute, so every message names the real place."""
    if env.get("RAG_DATA_DIR"):
        return Path(env["RAG_DATA_DIR"]).absolute()
    here = (cwd or Path.cwd()).absolute()
    found = next(
        (d / DEFAULT_DATA_DIR for d in (here, *here.parents) if (d / DEFAULT_DATA_DIR).is_dir()), None
    )
    return found or here / DEFAULT_DATA_DIR


def elasticsearch(env: Mapping[str, str] = os.environ) -> ElasticsearchSettings | None:
    """None unless ELASTICSEARCH_URL is set."""
    if not env.get("ELASTICSEARCH_URL"):
        return None
    return ElasticsearchSettings.parse(present(env, ELASTICSEARCH_SETTINGS))


def open_backend(env: Mapping[str, str] = os.environ) -> SearchBackend:
    """The index the environment points at: Elasticsearch when configured, else the embedded one."""
    cluster = elasticsearch(env)
    return cluster.open_index() if cluster is not None else EmbeddedIndex(data_dir(env))


def api_key(env: Mapping[str, str] = os.environ) -> str | None:
    """RAG_API_KEY: when set, `rag serve` asks every client for it (X-API-Key header)."""
    return env.get("RAG_API_KEY") or None


def schedule_cron(env: Mapping[str, str] = os.environ) -> str:
    return env.get("RAG_SCHEDULE_CRON") or "0 0 * * *"


def schedule_timezone(env: Mapping[str, str] = os.environ) -> str:
    return env.get("RAG_SCHEDULE_TIMEZONE") or "UTC"


def number[T: (int, float)](env: Mapping[str, str], name: str, default: T) -> T:
    """The variable `name` as a number of `default`'s type, refused naming it when it is not one."""
    raw = env.get(name) or ""
    if not raw.strip():
        return default
    try:
        return type(default)(raw)
    except ValueError:
        kind = "a whole number" if isinstance(default, int) else "a number"
        raise RagError(f"{name}={raw!r} is not {kind}") from None


def max_runtime_s(env: Mapping[str, str] = os.environ) -> int:
    return number(env, "RAG_MAX_RUNTIME_S", 3600)


def freshness_hours(env: Mapping[str, str] = os.environ) -> tuple[float, float]:
    """(warn, fail): warn once a daily refresh was missed (24 h plus an hour for the run itself),
    fail after a further margin."""
    warn = number(env, "RAG_FRESHNESS_WARN_HOURS", 25.0)
    fail = number(env, "RAG_FRESHNESS_FAIL_HOURS", 37.0)
    if fail <= warn:
        raise RagError(f"RAG_FRESHNESS_FAIL_HOURS ({fail}) must exceed RAG_FRESHNESS_WARN_HOURS ({warn})")
    return warn, fail


def reranker(env: Mapping[str, str] = os.environ) -> str:
    """RAG_RERANKER: how a search orders its fused top 20 again (docs/retrieval.md, Modes)."""
    mode = env.get("RAG_RERANKER") or DEFAULT_RERANKER
    if mode not in RERANKER_MODES:
        raise RagError(f"RAG_RERANKER={mode!r} is not one of {', '.join(RERANKER_MODES)}")
    return mode


IN_PROCESS, MULTIPROCESS, CELERY = "in_process", "multiprocess", "celery"
EXECUTORS = (IN_PROCESS, MULTIPROCESS, CELERY)


def executor(env: Mapping[str, str] = os.environ) -> str:
    """RAG_EXECUTOR: where a run's steps execute (docs/deployment.md, Scaling out)."""
    name = env.get("RAG_EXECUTOR") or IN_PROCESS
    if name not in EXECUTORS:
        raise RagError(f"RAG_EXECUTOR={name!r} is not one of {', '.join(EXECUTORS)}")
    return name


def celery_broker(env: Mapping[str, str] = os.environ) -> str:
    """The Celery broker the celery executor sends steps to (the compose Redis)."""
    url = env.get("DAGSTER_CELERY_BROKER_URL")
    if not url:
        raise RagError("RAG_EXECUTOR=celery needs DAGSTER_CELERY_BROKER_URL (e.g. redis://127.0.0.1:6379/0)")
    return url
