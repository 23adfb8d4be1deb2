"""What every search backend offers, so the assets, retrieval and the CLI do not care which runs."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd

from rag_assets.common.errors import RagError
from rag_assets.ingest.chunking import CHUNK_COLUMNS
from rag_assets.ingest.sources import stable_hash
from rag_assets.nlp.features import LEMMA_FIELDS, ChunkVectors

LEMMA_FIELD_COLUMNS = [f"{f}_lemmas" for f in LEMMA_FIELDS]
INDEX_COLUMNS = [*CHUNK_COLUMNS, *LEMMA_FIELD_COLUMNS, "row_hash"]


class IndexNotFoundError(RagError):
    pass


class IndexDamagedError(RagError):
    """The served index cannot be read; the next publish replaces it."""


class IndexUnreadableError(RagError):
    """The index exists but could not be read now (permissions, I/O): not the same as no index,
    which would let the shrink guard pass anything."""


class UnknownCourseError(RagError):
    pass


class PublishError(RagError):
    pass


class AnalysisMismatchError(RagError):
    """The query would be analysed differently from the served chunks."""


@dataclass(frozen=True)
class GateVerdict:
    """Whether a new version may replace the live one, and the figures of both."""

    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


class PublishRefusedError(PublishError):
    """The publish gate found the new version worse than the live one; nothing was served."""

    def __init__(self, verdict: GateVerdict) -> None:
        super().__init__(f"publish refused, the served index is unchanged: {verdict.description}")
        self.verdict = verdict


class PublishGate(Protocol):
    def __call__(self, candidate: SearchBackend, live: SearchBackend | None) -> GateVerdict:
        """Compare the new version (built, not yet served) with the live one (None: none yet)."""
        ...


@dataclass
class IndexContent:
    """Everything one publish writes: chunk rows aligned with their vectors."""

    rows: pd.DataFrame
    vectors: np.ndarray
    fingerprint: str  # how the rows were analysed (`model_fingerprint`); recorded by the index
    # What the content was made from (the stored values' digests); recorded by the index, so a
    # refresh that makes the same content can confirm it without reading it ("": unknown).
    digest: str = ""

    @classmethod
    def assemble(
        cls,
        chunks: pd.DataFrame,
        lemmas: pd.DataFrame,
        vectors: ChunkVectors,
        fingerprint: str,
        digest: str = "",
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
        return cls(
            rows=rows[INDEX_COLUMNS],
            vectors=np.ascontiguousarray(vectors.matrix),
            fingerprint=fingerprint,
            digest=digest,
        )


@dataclass(frozen=True)
class PublishReport:
    location: str
    chunks: int
    upserted: int
    deleted: int
    unchanged: int
    version: str | None = None  # the concrete index now served, where the backend keeps versions
    previous: str | None = None
    warnings: tuple[str, ...] = ()  # problems that did not stop the publish (retention, a damaged file)
    gate: GateVerdict | None = None  # the publish gate's comparison, when it ran


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
    published_at: str | None  # when the content last changed
    confirmed_at: str | None  # when a refresh last found it current (changed or not)


class SearchBackend(Protocol):
    kind: str
    location: str

    def publish(self, content: IndexContent, gate: PublishGate | None = None) -> PublishReport:
        """Make the index hold exactly `content`, all at once or not at all.

        When content changed and a gate is given, the new version is built, shown to the gate
        beside the live one, and served only if the gate passes (else PublishRefusedError).
        """
        ...

    def confirm(self, digest: str) -> PublishReport | None:
        """If the served index was published from the content named `digest` and is intact,
        record that a refresh found it current and report so; else None: publish the content."""
        ...

    def snapshot(self) -> AbstractContextManager[None]:
        """Reads inside see one version of the index, even if a publish completes meanwhile."""
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

    def analysis_fingerprint(self) -> str | None:
        """How the served chunks were analysed (None: an index from before this was recorded)."""
        ...
