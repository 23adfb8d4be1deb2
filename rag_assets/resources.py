"""Dagster resources: the outside world the assets talk to (the source, the model, the index)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field
from spacy.language import Language

from rag_assets.embedded_index import EmbeddedIndex
from rag_assets.nlp import MODEL_NAME, NlpSettings, default_processes, load_pipeline, model_fingerprint
from rag_assets.search_backend import SearchBackend
from rag_assets.sources import DEFAULT_DOCUMENTS_URL, Fetcher, LoadedDocuments, load_documents


class DocumentSourceResource(dg.ConfigurableResource):
    """Where the FAQ comes from: http(s)://, file:// or a plain path."""

    url: str = Field(default=DEFAULT_DOCUMENTS_URL, description="Source URL or path (DOCUMENTS_URL)")
    timeout_s: float = Field(default=30.0, description="Per-request timeout in seconds")
    retries: int = Field(default=3, description="Retries for connection errors and HTTP 429/5xx")

    def load(self) -> LoadedDocuments:
        return load_documents(self.url, Fetcher(timeout_s=self.timeout_s, retries=self.retries))


class NlpResource(dg.ConfigurableResource):
    """The spaCy pipeline used for chunks and for queries alike."""

    model: str = Field(default=MODEL_NAME, description="spaCy package name or model directory")
    batch_size: int = Field(default=256, description="Texts per nlp.pipe batch")
    processes: int = Field(default_factory=default_processes, description="Worker processes for large inputs")

    def pipeline(self) -> Language:
        return load_pipeline(self.model)

    def settings(self) -> NlpSettings:
        return NlpSettings(batch_size=self.batch_size, processes=self.processes)

    def fingerprint(self) -> str:
        return model_fingerprint(self.model)


class SearchIndexResource(dg.ConfigurableResource):
    """The search backend the index is published to and served from."""

    data_dir: str = Field(default=".rag", description="Embedded index directory (RAG_DATA_DIR)")

    def backend(self) -> SearchBackend:
        return EmbeddedIndex(Path(self.data_dir))
