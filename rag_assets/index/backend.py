"""What every search backend offers, so the assets, retrieval and the CLI do not care which runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd

from rag_assets.ingest.chunking import CHUNK_COLUMNS
from rag_assets.ingest.sources import stable_hash
from rag_assets.nlp.features import LEMMA_FIELDS, ChunkVectors

LEMMA_FIELD_COLUMNS = [f"{f}_lemmas" for f in LEMMA_FIELDS]
INDEX_COLUMNS = [*CHUNK_COLUMNS, *LEMMA_FIELD_COLUMNS, "row_hash"]


class RagError(Exception):
    """An error a user can act on; the CLI prints its message without a traceback."""


class IndexNotFoundError(RagError):
    pass


class UnknownCourseError(RagError):
    pass


class PublishError(RagError):
    pass


@dataclass
class IndexContent:
    """Everything one publish writes: chunk rows aligned with their vectors."""

    rows: pd.DataFrame
    vectors: np.ndarray

    @classmethod
    def assemble(
        cls, chunks: pd.DataFrame, lemmas: pd.DataFrame, vectors: ChunkVectors, fingerprint: str
    ) -> IndexContent:
        """Join the three upstream outputs by chunk id, refusing any mismatch between them.

        `row_hash` changes when the chunk's content or the analysis fingerprint changes, which is
        what lets a publish skip rows that are already in the index as they should be.
        """
        ids = list(chunks["chunk_id"])
        if list(lemmas["chunk_id"]) != ids or vectors.chunk_ids != ids:
            raise PublishError(
                "chunks, lemmas and embeddings disagree on the chunk ids; "
                "materialize the upstream assets together"
            )
        if len(set(ids)) != len(ids):
            raise PublishError("duplicate chunk ids in the chunks to publish")
        rows = chunks[CHUNK_COLUMNS].reset_index(drop=True).copy()
        for column in LEMMA_FIELD_COLUMNS:
            rows[column] = lemmas[column].to_numpy()
        rows["row_hash"] = [stable_hash(h, fingerprint) for h in rows["content_hash"]]
        return cls(rows=rows[INDEX_COLUMNS], vectors=np.ascontiguousarray(vectors.matrix))


@dataclass(frozen=True)
class PublishReport:
    location: str
    chunks: int
    upserted: int
    deleted: int
    unchanged: int
    version: str | None = None  # the concrete index now served, where the backend keeps versions
    previous: str | None = None
    warnings: tuple[str, ...] = ()  # problems after the new index was served (e.g. retention)


@dataclass(frozen=True)
class StoredChunk:
    chunk_id: str
    doc_id: str
    course: str
    section: str
    question: str
    text: str


@dataclass(frozen=True)
class IndexStats:
    backend: str
    location: str
    entries: int
    chunks: int
    courses: dict[str, int]
    published_at: str | None


class SearchBackend(Protocol):
    kind: str
    location: str

    def publish(self, content: IndexContent) -> PublishReport:
        """Make the index hold exactly `content`, all at once or not at all."""
        ...

    def lexical_search(self, lemmas: Sequence[str], course: str | None, k: int) -> list[str]:
        """Chunk ids ranked by weighted BM25 over the lemma fields."""
        ...

    def vector_search(self, vector: np.ndarray, course: str | None, k: int) -> list[str]:
        """Chunk ids ranked by cosine similarity to `vector`."""
        ...

    def fetch(self, chunk_ids: Sequence[str]) -> dict[str, StoredChunk]: ...

    def stats(self) -> IndexStats:
        """Raises IndexNotFoundError when nothing was ever published."""
        ...

    def chunk_hashes(self) -> dict[str, str]:
        """chunk_id -> content_hash of what is served now."""
        ...
