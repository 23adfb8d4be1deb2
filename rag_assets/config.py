"""Configuration from the environment, read in one place for the Dagster definitions and the CLI."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from rag_assets.resources import DocumentSourceResource, NlpResource, SearchIndexResource
from rag_assets.sources import DEFAULT_DOCUMENTS_URL

DEFAULT_DATA_DIR = ".rag"


def data_dir(env: Mapping[str, str] = os.environ) -> Path:
    return Path(env.get("RAG_DATA_DIR") or DEFAULT_DATA_DIR)


def document_source(env: Mapping[str, str] = os.environ) -> DocumentSourceResource:
    return DocumentSourceResource(url=env.get("DOCUMENTS_URL") or DEFAULT_DOCUMENTS_URL)


def nlp_resource(env: Mapping[str, str] = os.environ) -> NlpResource:
    processes = env.get("RAG_NLP_PROCESSES")
    return NlpResource(**({"processes": int(processes)} if processes else {}))


def search_index(env: Mapping[str, str] = os.environ) -> SearchIndexResource:
    return SearchIndexResource(data_dir=str(data_dir(env)))
