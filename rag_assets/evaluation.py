"""Retrieval evaluation with the course's metrics: hit rate and MRR of the top k, course-filtered."""

from __future__ import annotations

import csv
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from spacy.language import Language

from rag_assets.common.errors import RagError
from rag_assets.common.progress import Progress
from rag_assets.index.backend import SEMANTIC, IndexContent, UnknownCourseError
from rag_assets.index.embedded import EmbeddedIndex
from rag_assets.ingest.chunking import ChunkingConfig, make_chunks
from rag_assets.ingest.sources import Fetcher, load_documents
from rag_assets.nlp.analysis import NlpSettings, model_fingerprint
from rag_assets.nlp.features import embed_chunks, lemmatize_chunks
from rag_assets.nlp.sentence import chunk_sentences, sentence_encoder
from rag_assets.retrieval import Retriever


@dataclass(frozen=True)
class GroundTruth:
    question: str
    course: str
    document: str


@dataclass(frozen=True)
class EvalResult:
    reranker: str  # the mode the searches ran in (features when semantic fell back)
    hit_rate: float
    mrr: float
    questions: int
    p50_ms: float


def read_ground_truth(path: Path | str) -> list[GroundTruth]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"question", "course", "document"} - set(reader.fieldnames or [])
        if missing:
            raise RagError(f"{path}: ground truth lacks column(s) {', '.join(sorted(missing))}")
        rows = [GroundTruth(r["question"], r["course"], r["document"]) for r in reader]
    if not rows:
        raise RagError(f"{path}: ground truth has no rows")
    return rows


def build_index(
    documents: str,
    data_dir: Path,
    nlp: Language,
    chunking: ChunkingConfig = ChunkingConfig(),
    log: Callable[[str], None] | None = None,
    ground_truth: list[GroundTruth] | None = None,
    nlp_settings: NlpSettings = NlpSettings(),
    reranker: str = "none",
) -> EmbeddedIndex:
    """Index a source file with the same steps as the assets, into a throwaway directory, for
    the RAG_RERANKER mode `reranker` (semantic: with sentence vectors).

    With a ground truth, refuse (before the costly analysis) documents whose ids it never names:
    every answer would count as a miss and the figures would mean nothing.
    """
    loaded = load_documents(documents, Fetcher())
    if ground_truth is not None:
        check_ids_match(ground_truth, set(loaded.frame["doc_id"]), documents)
    chunks = make_chunks(loaded.frame, chunking)
    lemmas = lemmatize_chunks(nlp, chunks, nlp_settings, log)
    vectors = embed_chunks(nlp, lemmas)
    if reranker == SEMANTIC:
        vectors.sentences = sentence_encoder().encode(chunk_sentences(chunks), log)
    content = IndexContent.assemble(chunks, lemmas, vectors, model_fingerprint(), reranker=reranker)
    index = EmbeddedIndex(data_dir)
    index.publish(content)
    return index


def check_ids_match(ground_truth: list[GroundTruth], doc_ids: set[str], documents: str) -> None:
    wanted = {row.document for row in ground_truth}
    if not wanted & doc_ids:
        example = next(iter(sorted(wanted)))
        raise RagError(
            f"none of the {len(wanted)} entry ids in the ground truth (e.g. {example!r}) is an entry of "
            f"{documents}; its entries need the ids the ground truth was written for (an 'id' field)"
        )


def hit_rate_and_mrr(reciprocal_ranks: list[float]) -> tuple[float, float]:
    """The course's metrics from each question's 1/rank of its entry (0: not in the top k)."""
    n = len(reciprocal_ranks)
    return round(sum(1 for r in reciprocal_ranks if r > 0) / n, 4), round(sum(reciprocal_ranks) / n, 4)


def evaluate(
    retriever: Retriever,
    ground_truth: list[GroundTruth],
    k: int = 5,
    log: Callable[[str], None] | None = None,
    min_relevance: float = 0.0,
) -> EvalResult:
    """Hit rate and MRR of the top k; by default of the ranking alone (`min_relevance` 0: no hit
    dropped for its relevance), else of what a search with that floor returns."""
    reciprocal_ranks: list[float] = []
    latencies_ms: list[float] = []
    progress = Progress("evaluate", len(ground_truth), log)
    for row in ground_truth:
        started = time.perf_counter()
        try:
            hits = retriever.search(row.question, course=row.course, k=k, min_relevance=min_relevance)
        except UnknownCourseError:  # an index without the course answers nothing about it
            hits = []
        latencies_ms.append((time.perf_counter() - started) * 1000)
        ranks = [rank for rank, hit in enumerate(hits, start=1) if hit.doc_id == row.document]
        reciprocal_ranks.append(1.0 / ranks[0] if ranks else 0.0)
        progress.update()
    progress.close()
    hit_rate, mrr = hit_rate_and_mrr(reciprocal_ranks)
    fell_back = f"features ({retriever.fallbacks} semantic searches fell back)" if retriever.fallbacks else ""
    return EvalResult(
        reranker=fell_back or retriever.reranker,
        hit_rate=hit_rate,
        mrr=mrr,
        questions=len(reciprocal_ranks),
        p50_ms=round(statistics.median(latencies_ms), 2),
    )
