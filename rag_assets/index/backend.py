"""What every search backend offers, so the assets, retrieval and the CLI do not care which runs."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd

from rag_assets.common.errors import RagError
from rag_assets.common.stored import Chained, InMemory, StoredValue, digest
from rag_assets.ingest.chunking import CHUNK_COLUMNS
from rag_assets.ingest.sources import stable_hash
from rag_assets.nlp.analysis import VECTOR_DIM
from rag_assets.nlp.features import LEMMA_FIELDS, ChunkVectors
from rag_assets.nlp.sentence import SENTENCE_MODEL

LEMMA_FIELD_COLUMNS = [f"{f}_lemmas" for f in LEMMA_FIELDS]
INDEX_COLUMNS = [*CHUNK_COLUMNS, *LEMMA_FIELD_COLUMNS, "row_hash"]
# RAG_RERANKER: how the fused top of a search is ordered again (docs/retrieval.md, Modes). Only
# `semantic` changes the index: its rows carry sentence vectors.
RERANKER_MODES = ("none", "features", "semantic")
SEMANTIC = "semantic"


def made_by(fingerprint: str, reranker: str) -> tuple[str, ...]:
    """What makes a chunk's vectors in this mode: the analysis, and the sentence model in the
    semantic mode. Named by the embeddings value's digest and by every row's hash, so changing
    either makes them anew."""
    return (fingerprint, SENTENCE_MODEL) if reranker == SEMANTIC else (fingerprint,)


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


class Parts(Protocol):
    """A value read part by part: a stored value, or one in memory (`InMemory`)."""

    def parts(self) -> Iterator[Any]: ...


@dataclass(frozen=True)
class ContentBlock:
    """Some rows of the content (`INDEX_COLUMNS`) with their positions in it and their vectors."""

    positions: np.ndarray
    rows: pd.DataFrame
    vectors: np.ndarray
    sentences: np.ndarray | None  # the rows' sentence vectors, in the semantic mode


@dataclass(frozen=True)
class CourseValues:
    """One course's stored chunks, lemmas and vectors: what a publish takes of each course."""

    chunks: StoredValue
    lemmas: StoredValue
    embeddings: StoredValue

    def digests(self) -> list[str]:
        return [self.chunks.digest, self.lemmas.digest, self.embeddings.digest]


@dataclass
class IndexContent:
    """Everything one publish writes: chunk rows aligned with their vectors.

    Only the ids and row hashes are held; the rows and vectors are read block by block from
    the upstream values (`blocks`), so a million chunks with their lemmas and vectors (3 GB)
    are never in memory at once. `row_hash` changes when the chunk's content or the analysis
    fingerprint changes, which is what lets a publish skip rows already indexed as they should be.
    """

    chunks: Parts  # frames with CHUNK_COLUMNS
    lemmas: Parts  # frames with chunk_id and LEMMA_FIELD_COLUMNS
    vectors: Parts  # ChunkVectors
    chunk_ids: list[str]
    row_hashes: list[str]
    fingerprint: str  # how the rows were analysed (`model_fingerprint`); recorded by the index
    # What the content was made from (the stored values' digests); recorded by the index, so a
    # refresh that makes the same content can confirm it without reading it ("": unknown).
    digest: str = ""
    # Per course, the digests of its values (`CourseValues.digests`); recorded by the index, so
    # the next publish of one course takes the others as they are served.
    sources: dict[str, list[str]] = field(default_factory=dict)
    # The RAG_RERANKER mode the content was made for; recorded by the index. In the semantic
    # mode the vectors carry sentence vectors and the row hashes name the sentence model.
    reranker: str = "none"

    @classmethod
    def read(
        cls,
        chunks: Parts,
        lemmas: Parts,
        vectors: Parts,
        fingerprint: str,
        digest: str = "",
        reranker: str = "none",
    ) -> IndexContent:
        """The content of three upstream values; reads the chunks' ids and content hashes once.

        The three must hold the same chunk ids in the same order: `blocks` refuses any mismatch.
        """
        analysis = made_by(fingerprint, reranker)
        chunk_ids: list[str] = []
        row_hashes: list[str] = []
        for part in chunks.parts():
            chunk_ids.extend(part["chunk_id"])
            row_hashes.extend(stable_hash(h, *analysis) for h in part["content_hash"])
        if len(set(chunk_ids)) != len(chunk_ids):
            raise PublishError("duplicate chunk ids in the chunks to publish")
        return cls(chunks, lemmas, vectors, chunk_ids, row_hashes, fingerprint, digest, reranker=reranker)

    @staticmethod
    def courses_digest(courses: dict[str, CourseValues], reranker: str) -> str:
        """The digest `of_courses` gives the content, known without reading a value: an index
        published from it is confirmed before a million chunk hashes are read."""
        named = (f"{name}\x1d{'/'.join(courses[name].digests())}" for name in sorted(courses))
        return digest(reranker, *named)

    @classmethod
    def of_courses(cls, courses: dict[str, CourseValues], fingerprint: str, reranker: str) -> IndexContent:
        """The content of every course's values, course after course in name order."""
        names = sorted(courses)
        content = cls.read(
            Chained([courses[name].chunks for name in names]),
            Chained([courses[name].lemmas for name in names]),
            Chained([courses[name].embeddings for name in names]),
            fingerprint,
            cls.courses_digest(courses, reranker),
            reranker,
        )
        content.sources = {name: courses[name].digests() for name in names}
        return content

    @classmethod
    def assemble(
        cls,
        chunks: pd.DataFrame,
        lemmas: pd.DataFrame,
        vectors: ChunkVectors,
        fingerprint: str,
        digest: str = "",
        reranker: str = "none",
    ) -> IndexContent:
        """The content of values in memory (evaluation, tests)."""
        return cls.read(InMemory(chunks), InMemory(lemmas), InMemory(vectors), fingerprint, digest, reranker)

    def __len__(self) -> int:
        return len(self.chunk_ids)

    def blocks(self, positions: np.ndarray | None = None) -> Iterator[ContentBlock]:
        """The rows at ascending `positions` (default: all) and their vectors, block by block."""
        if positions is not None and not len(positions):
            return
        start = 0
        for chunks, lemmas, vectors in itertools.zip_longest(
            self.chunks.parts(), self.lemmas.parts(), self.vectors.parts()
        ):
            if chunks is None or lemmas is None or vectors is None:
                raise _disagreement("they hold different numbers of parts")
            end = start + len(chunks)
            ids = self.chunk_ids[start:end]
            if list(lemmas["chunk_id"]) != ids or vectors.chunk_ids != ids or list(chunks["chunk_id"]) != ids:
                raise _disagreement(f"rows {start}-{end - 1}")
            if (self.reranker == SEMANTIC) != (vectors.sentences is not None):
                raise PublishError(
                    f"the embeddings of rows {start}-{end - 1} "
                    f"{'lack' if vectors.sentences is None else 'hold'} sentence vectors, and the "
                    f"content is for RAG_RERANKER={self.reranker}; materialize embeddings again"
                )
            inside = np.arange(start, end)
            if positions is not None:
                inside = positions[np.searchsorted(positions, start) : np.searchsorted(positions, end)]
            if len(inside):
                yield self._block(inside, inside - start, chunks, lemmas, vectors)
            start = end
        if start != len(self):
            raise _disagreement(f"{start} rows read of {len(self)}")

    def _block(
        self,
        positions: np.ndarray,
        offsets: np.ndarray,
        chunks: pd.DataFrame,
        lemmas: pd.DataFrame,
        vectors: ChunkVectors,
    ) -> ContentBlock:
        rows = chunks[CHUNK_COLUMNS].iloc[offsets].reset_index(drop=True)
        for column in LEMMA_FIELD_COLUMNS:
            rows[column] = lemmas[column].to_numpy()[offsets]
        rows["row_hash"] = [self.row_hashes[p] for p in positions]
        matrix = np.ascontiguousarray(vectors.matrix[offsets], dtype=np.float32)
        sentences = None if vectors.sentences is None else np.ascontiguousarray(vectors.sentences[offsets])
        return ContentBlock(positions, rows[INDEX_COLUMNS], matrix, sentences)

    def vectors_at(self, positions: np.ndarray) -> np.ndarray:
        """The vectors at ascending `positions`, reading only the vectors."""
        found = np.empty((len(positions), VECTOR_DIM), dtype=np.float32)
        if not len(positions):
            return found
        start = done = 0
        for part in self.vectors.parts():
            end = start + len(part)
            inside = positions[np.searchsorted(positions, start) : np.searchsorted(positions, end)]
            found[done : done + len(inside)] = part.matrix[inside - start]
            done += len(inside)
            start = end
        if done != len(positions):
            raise _disagreement(f"{done} of {len(positions)} vectors found")
        return found


def _disagreement(where: str) -> PublishError:
    return PublishError(
        f"chunks, lemmas and embeddings disagree on the chunk ids ({where}); "
        "materialize the upstream assets together"
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
class Candidate:
    """What reranking needs of a candidate chunk, read with it in one request."""

    chunk: StoredChunk
    lemmas: dict[str, str]  # lemma field -> its space-joined terms
    sentence: np.ndarray | None  # its sentence vector; None: the index holds none


@dataclass(frozen=True)
class IndexStats:
    backend: str
    location: str
    entries: int
    chunks: int
    courses: dict[str, int]
    published_at: str | None  # when the content last changed
    confirmed_at: str | None  # when a refresh last found it current (changed or not)
    reranker: str | None = None  # the RAG_RERANKER mode it was built for (None: not recorded)


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

    def lexical_search(self, lemmas: Sequence[str], course: str | None, k: int) -> list[tuple[str, float]]:
        """(chunk id, score) ranked by weighted BM25 over the lemma fields, best first."""
        ...

    def vector_search(self, vector: np.ndarray, course: str | None, k: int) -> list[str]:
        """Chunk ids ranked by cosine similarity to `vector`."""
        ...

    def sentence_search(self, sentence: np.ndarray, course: str | None, k: int) -> list[str]:
        """Chunk ids ranked by cosine similarity of their sentence vectors to `sentence` (the
        semantic mode's first stage); [] when the index holds none."""
        ...

    def fetch(self, chunk_ids: Sequence[str]) -> dict[str, StoredChunk]: ...

    def term_frequencies(self, terms: Sequence[str]) -> tuple[int, dict[str, int]]:
        """The chunks served, and how many of them hold each term in a lemma field (0: none):
        what a term's idf is made of."""
        ...

    def candidates(self, chunk_ids: Sequence[str]) -> dict[str, Candidate]:
        """The chunks with their lemma fields and sentence vectors, in one request."""
        ...

    def stats(self) -> IndexStats:
        """Raises IndexNotFoundError when nothing was ever published."""
        ...

    def chunk_hashes(self) -> dict[str, str]:
        """chunk_id -> content_hash of what is served now."""
        ...

    def analysis_fingerprint(self) -> str | None:
        """How the served chunks were analysed (None: an index from before this was recorded)."""
        ...

    def served_sources(self) -> dict[str, list[str]]:
        """Per course, the digests of the values the served index was published from ({}: none
        published, or published before this was recorded)."""
        ...
