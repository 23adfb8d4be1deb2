"""Query-time retrieval: analyse the query like the chunks, rank lexically and by vector, fuse."""

from __future__ import annotations

import functools
import logging
import math
from concurrent.futures import Future
from dataclasses import dataclass, replace

import numpy as np
from spacy.language import Language

from rag_assets import settings
from rag_assets.common.errors import RagError
from rag_assets.index.backend import (
    SEMANTIC,
    AnalysisMismatchError,
    Candidate,
    SearchBackend,
    UnknownCourseError,
)
from rag_assets.index.lexical import searchable
from rag_assets.index.ranking import FusionSettings, reciprocal_rank_fusion
from rag_assets.index.reranking import (
    MODE_FEATURES,
    RERANK_DEPTH,
    SENTENCE_CANDIDATES,
    RerankModel,
    candidate_features,
    sentence_features,
    term_evidence,
)
from rag_assets.ingest.chunking import doc_id_of
from rag_assets.nlp.analysis import QueryTerms, analyse_query, load_pipeline, model_fingerprint
from rag_assets.nlp.sentence import sentence_encoder

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    doc_id: str
    chunk_id: str
    course: str
    section: str
    question: str
    text: str
    score: float  # the rank's score: fused (RRF) or the reranker's; comparable within one search
    relevance: float  # how well the entry matches the query, on a fixed scale (`relevance`)


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


@dataclass(frozen=True)
class FirstStage:
    """A search before reranking: the fused entries, the rankings found (the semantic mode's
    sentence kNN among them, which the fusion leaves out), the chunk shown for each entry, and
    each lexically found entry's BM25 score (its best chunk's)."""

    fused: list[tuple[str, float]]
    entry_rankings: dict[str, list[str]]
    shown: dict[str, str]
    lexical_scores: dict[str, float]

    def to_rerank(self) -> list[str]:
        """The entries the reranker orders: the fused top RERANK_DEPTH, then up to
        SENTENCE_CANDIDATES of the sentence kNN's that they lack."""
        top = [doc_id for doc_id, _ in self.fused[:RERANK_DEPTH]]
        held = set(top)
        found = [doc_id for doc_id in self.entry_rankings.get("sentence", ()) if doc_id not in held]
        return top + found[:SENTENCE_CANDIDATES]

    def widened(self, sentence_ranking: list[str]) -> FirstStage:
        """With the sentence kNN's chunk ranking, which the fusion leaves out: it widens what the
        other rankings found and answers no query alone, since every text has nearest neighbours
        and gibberish's are about as close as an unrelated question's (docs/retrieval.md). An
        entry it adds is shown by the chunk it found, the one that made it a candidate."""
        entry_rankings, nearest = rank_entries({"sentence": sentence_ranking})
        widened = replace(self, entry_rankings={**self.entry_rankings, **entry_rankings})
        added = widened.to_rerank()[len(self.to_rerank()) :]
        return replace(widened, shown={**self.shown, **{doc_id: nearest[doc_id] for doc_id in added}})


@dataclass(frozen=True)
class RerankTable:
    """What a search reranks: its first stage (widened by the sentence kNN in the semantic mode),
    the entries, their feature rows in `mode`, and the candidates read for them."""

    first: FirstStage
    entries: list[str]
    matrix: np.ndarray
    found: dict[str, Candidate]
    mode: str  # features when a semantic search meets an index without sentence vectors


class QueryError(RagError):
    """A request no search can answer; `parameter` names the culprit (the server's 422 says it)."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter


def check_query(query: str, k: int) -> None:
    """Refuse what no search can answer, naming the parameter."""
    if not query.replace("\ufeff", "").strip():  # str.strip() keeps the byte-order mark
        raise QueryError("query", "the query is blank")
    try:
        query.encode("utf-8")
    except UnicodeEncodeError as exc:
        # Command-line arguments with invalid UTF-8 bytes arrive as lone surrogates.
        message = f"the query is not valid UTF-8 (character {exc.start + 1} of {len(query)})"
        raise QueryError("query", message) from None
    if k < 1:
        raise QueryError("k", f"k must be at least 1, got {k}")


# The least relevance a hit needs to be returned, chosen on dev (docs/retrieval.md, "No good match"): each
# loses under 1 % of the dev questions' gold entries from the top 5 (0.75 % and 0.57 %) and
# refuses over 90 % of generated questions the FAQ does not answer (91.2 % and 94.3 %).
MIN_RELEVANCE = {"lexical": 0.25, "cosine": 0.2}  # by scale: every mode's, the semantic mode's


def smoothed_idf(rows: int, holding: int) -> float:
    """Lucene's BM25 idf: a term few chunks hold says more about a match. Never 0, unlike the
    FTS5 idf the embedded ranking uses (`lexical.idf`), so a common word still counts a little."""
    return math.log(1 + (rows - holding + 0.5) / (holding + 0.5))


def relevance(weights: dict[str, float], candidate: Candidate, query_sentence: np.ndarray | None) -> float:
    """How well an entry matches a query, on a scale that means the same for every query: the
    cosine of their MiniLM sentence vectors when both have one (semantic mode), else the larger of
    the shares of the query's content words (`weights`: each word's idf) that the entry's question
    and its answer hold. Weighted by idf, a common word shared with an unrelated question ("best",
    "long") counts for little, and a word the FAQ never uses for much.

    A fused or reranker score only orders one query's hits; a query that nothing answers still
    gets a first hit. These say how much the first hit matches at all (docs/retrieval.md, "No good match").
    """
    if query_sentence is not None:  # a negative cosine is as unrelated as texts get: 0
        return max(0.0, float(candidate.sentence @ query_sentence))
    total = sum(weights.values())
    if not total:
        return 0.0
    held = (set(candidate.lemmas[field].split()) for field in ("question_lemmas", "text_lemmas"))
    return max(sum(weights[term] for term in weights if term in field_terms) / total for field_terms in held)


class Retriever:
    """Lexical and vector rankings fused, then (unless `reranker` is none) the top
    RERANK_DEPTH entries, in the semantic mode with up to SENTENCE_CANDIDATES more of the
    sentence kNN's, ordered again by the mode's model (`reranking`)."""

    def __init__(
        self,
        backend: SearchBackend,
        nlp: Language | None = None,
        fusion: FusionSettings = FusionSettings(),
        fingerprint: str | None = None,
        reranker: str | None = None,
    ) -> None:
        self.backend = backend
        self.nlp = nlp or load_pipeline()
        self.fusion = fusion
        self.fingerprint = fingerprint or model_fingerprint()
        self.reranker = reranker or settings.reranker()
        # features is also the fallback when the index holds no sentence vectors
        used = {"none": (), "features": ("features",), SEMANTIC: (SEMANTIC, "features")}[self.reranker]
        self.models = {mode: RerankModel.load(mode) for mode in used}
        self.fallbacks = 0  # semantic searches answered in the features mode

    def search(
        self, query: str, course: str | None = None, k: int = 5, min_relevance: float | None = None
    ) -> list[Hit]:
        """Of the best `k` entries, those whose relevance is at least `min_relevance` (default:
        the mode's `MIN_RELEVANCE`; 0 keeps every hit). An empty list says no entry matches."""
        check_query(query, k)
        query_sentence = self._encode(query, self.reranker)
        terms = analyse_query(self.nlp, query)
        with self.backend.snapshot():  # ranking and fetching read the same version
            self._check_analysis()
            depth = max(self.fusion.candidates, k)
            first = self._first_stage(terms, course, depth)
            if first is None:
                self._check_course(course)
                return []
            found: dict[str, Candidate] = {}
            fused, shown = first.fused, first.shown
            if self.reranker != "none":
                table = self._rerank_table(query_sentence, terms, first, course, depth, self.reranker)
                top, found, shown = table.entries, table.found, table.first.shown
                scores = self.models[table.mode].scores(table.matrix)
                reranked = [(top[i], float(scores[i])) for i in np.argsort(-scores, kind="stable")]
                reranked_ids = set(top)
                fused = reranked + [(doc_id, score) for doc_id, score in fused if doc_id not in reranked_ids]
            fused = fused[:k]
            found.update(self.backend.candidates([shown[d] for d, _ in fused if shown[d] not in found]))
            candidates = [found[shown[doc_id]] for doc_id, _ in fused]
            sentence = query_sentence.result() if query_sentence is not None else None
            if sentence is not None and any(c.sentence is None for c in candidates):
                sentence = None  # an index without sentence vectors: the lexical scale for all
            weights = self._term_weights(terms) if sentence is None else {}
        floor = (
            MIN_RELEVANCE["cosine" if sentence is not None else "lexical"]
            if min_relevance is None
            else min_relevance
        )
        hits = [
            Hit(**vars(c.chunk), score=round(score, 6), relevance=round(relevance(weights, c, sentence), 4))
            for (_, score), c in zip(fused, candidates, strict=True)
        ]
        return [hit for hit in hits if hit.relevance >= floor]

    def candidate_table(self, query: str, course: str | None, mode: str) -> tuple[list[str], np.ndarray]:
        """The entries a search in `mode` reranks and their features: what the reranker is
        fitted on (`fitting`)."""
        query_sentence = self._encode(query, mode)
        terms = analyse_query(self.nlp, query)
        with self.backend.snapshot():
            first = self._first_stage(terms, course, self.fusion.candidates)
            if first is None:
                return [], np.empty((0, len(MODE_FEATURES[mode])))
            table = self._rerank_table(query_sentence, terms, first, course, self.fusion.candidates, mode)
        return table.entries, table.matrix

    def _first_stage(self, terms: QueryTerms, course: str | None, depth: int) -> FirstStage | None:
        """None when neither ranking found anything."""
        rankings: dict[str, list[str]] = {}
        entry_scores: dict[str, float] = {}
        if self.fusion.weights.get("lexical", 0) > 0:
            scored = self.backend.lexical_search(terms.lemmas, course, depth)
            rankings["lexical"] = [chunk_id for chunk_id, _ in scored]
            for chunk_id, score in scored:  # best first: an entry's first chunk is its best
                entry_scores.setdefault(doc_id_of(chunk_id), score)
        if self.fusion.weights.get("vector", 0) > 0 and np.any(terms.vector):
            rankings["vector"] = self.backend.vector_search(terms.vector, course, depth)
        if not any(rankings.values()):
            return None
        entry_rankings, shown = rank_entries(rankings)
        fused = reciprocal_rank_fusion(entry_rankings, self.fusion.weights, self.fusion.rrf_k)
        return FirstStage(fused, entry_rankings, shown, entry_scores)

    def _encode(self, query: str, mode: str) -> Future[np.ndarray] | None:
        """The query's sentence vector, under way while spaCy and the first stage run, when
        `mode` needs one: a semantic search waits for the longer of the two, not their sum."""
        return sentence_encoder().encode_later(query) if mode == SEMANTIC else None

    def _rerank_table(
        self,
        query_sentence: Future[np.ndarray] | None,
        terms: QueryTerms,
        first: FirstStage,
        course: str | None,
        depth: int,
        mode: str,
    ) -> RerankTable:
        """The fused top's candidates are read and their term evidence computed while the query's
        sentence vector is made; then, in the semantic mode, its kNN adds entries, read in a
        second request. A semantic search meeting an index without sentence vectors reranks
        with features."""
        top = first.to_rerank()
        found = self.backend.candidates([first.shown[doc_id] for doc_id in top])
        candidates = [found[first.shown[doc_id]] for doc_id in top]
        evidence = term_evidence(terms.lemmas, candidates)
        if mode == SEMANTIC and any(c.sentence is None for c in candidates):
            if not self.fallbacks:
                _log.warning(
                    "RAG_RERANKER=semantic, but the index at %s holds no sentence vectors (it was built in "
                    "another mode): reranking with features until a refresh with RAG_RERANKER=semantic "
                    "publishes one that has them",
                    self.backend.location,
                )
            self.fallbacks += 1
            mode = "features"
        sentence = query_sentence.result() if mode == SEMANTIC and query_sentence is not None else None
        if sentence is not None:
            first = first.widened(self.backend.sentence_search(sentence, course, depth))
            added = first.to_rerank()[len(top) :]
            found.update(self.backend.candidates([first.shown[doc_id] for doc_id in added]))
            more = [found[first.shown[doc_id]] for doc_id in added]
            top, candidates = top + added, candidates + more
            evidence = np.vstack([evidence, term_evidence(terms.lemmas, more)])
        matrix = candidate_features(top, first.entry_rankings, first.lexical_scores, evidence)
        if sentence is not None:
            matrix = np.hstack([matrix, sentence_features(top, candidates, sentence)])
        return RerankTable(first, top, matrix, found, mode)

    def _term_weights(self, terms: QueryTerms) -> dict[str, float]:
        """Each distinct query term that can match, weighted by its idf in the served index."""
        rows, holding = self.backend.term_frequencies(searchable(terms.lemmas))
        return {term: smoothed_idf(rows, held) for term, held in holding.items()}

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
