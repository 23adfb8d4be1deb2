"""Query-time retrieval: analyse the query like the chunks, rank lexically and by vector, fuse."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from spacy.language import Language

from rag_assets import settings
from rag_assets.common.errors import RagError
from rag_assets.index.backend import AnalysisMismatchError, SearchBackend, UnknownCourseError
from rag_assets.index.ranking import FusionSettings, reciprocal_rank_fusion
from rag_assets.ingest.chunking import doc_id_of
from rag_assets.nlp.analysis import analyse_query, load_pipeline, model_fingerprint


@dataclass(frozen=True)
class Hit:
    doc_id: str
    chunk_id: str
    course: str
    section: str
    question: str
    text: str
    score: float


def rank_entries(rankings: dict[str, list[str]]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Turn chunk rankings into entry rankings (each entry at its best chunk's rank).

    Also returns the chunk shown for each entry: its best chunk in the first ranking that has it.
    Entries come from the chunk ids themselves, so only the chunks finally shown are fetched.
    """
    shown: dict[str, str] = {}
    entry_rankings: dict[str, list[str]] = {}
    for name, ranking in rankings.items():
        doc_ids = [doc_id_of(chunk_id) for chunk_id in ranking]
        for doc_id, chunk_id in zip(doc_ids, ranking, strict=True):
            shown.setdefault(doc_id, chunk_id)
        entry_rankings[name] = list(dict.fromkeys(doc_ids))
    return entry_rankings, shown


class QueryError(RagError):
    """A request no search can answer; `parameter` names the culprit (the server's 422 says it)."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter


def check_query(query: str, k: int) -> None:
    """Refuse what no search can answer, naming the parameter."""
    if not query or not query.strip():
        raise QueryError("query", "the query is empty")
    try:
        query.encode("utf-8")
    except UnicodeEncodeError as exc:
        # Command-line arguments with invalid UTF-8 bytes arrive as lone surrogates.
        message = f"the query is not valid UTF-8 (character {exc.start + 1} of {len(query)})"
        raise QueryError("query", message) from None
    if k < 1:
        raise QueryError("k", f"k must be at least 1, got {k}")


class Retriever:
    def __init__(
        self,
        backend: SearchBackend,
        nlp: Language | None = None,
        fusion: FusionSettings = FusionSettings(),
        fingerprint: str | None = None,
    ) -> None:
        self.backend = backend
        self.nlp = nlp or load_pipeline()
        self.fusion = fusion
        self.fingerprint = fingerprint or model_fingerprint()

    def search(self, query: str, course: str | None = None, k: int = 5) -> list[Hit]:
        check_query(query, k)
        terms = analyse_query(self.nlp, query)
        depth = max(self.fusion.candidates, k)
        with self.backend.snapshot():  # ranking and fetching read the same version
            self._check_analysis()
            rankings: dict[str, list[str]] = {}
            if self.fusion.weights.get("lexical", 0) > 0:
                rankings["lexical"] = self.backend.lexical_search(terms.lemmas, course, depth)
            if self.fusion.weights.get("vector", 0) > 0 and np.any(terms.vector):
                rankings["vector"] = self.backend.vector_search(terms.vector, course, depth)
            if not any(rankings.values()):
                self._check_course(course)
                return []
            entry_rankings, shown = rank_entries(rankings)
            fused = reciprocal_rank_fusion(entry_rankings, self.fusion.weights, self.fusion.rrf_k)[:k]
            chunks = self.backend.fetch([shown[doc_id] for doc_id, _ in fused])
        return [Hit(**vars(chunks[shown[doc_id]]), score=round(score, 6)) for doc_id, score in fused]

    def _check_analysis(self) -> None:
        """Stems ranked against lemmas would rank quietly wrong: refuse instead."""
        served = self.backend.analysis_fingerprint()
        if served != self.fingerprint:
            raise AnalysisMismatchError(
                f"the index at {self.backend.location} was analysed as "
                f"{served or 'an older version that recorded none'}, this query would be analysed as "
                f"{self.fingerprint}; run the refresh (make run) to rebuild it"
            )

    def _check_course(self, course: str | None) -> None:
        """Tell an unknown course apart from a query that matched nothing."""
        if course is None:
            return
        known = self.backend.stats().courses
        if course not in known:
            raise UnknownCourseError(
                f"unknown course {course!r}; the index has: {', '.join(sorted(known)) or 'none'}"
            )


@functools.cache
def default_retriever() -> Retriever:
    """The retriever for the index configured by the environment (RAG_DATA_DIR, ...)."""
    return Retriever(settings.open_backend(), load_pipeline())
