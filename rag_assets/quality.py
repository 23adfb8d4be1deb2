"""Data-quality rules for each stage, as plain functions; `checks.py` runs them as asset checks."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from spacy.language import Language

from rag_assets.evaluation import GroundTruth, evaluate
from rag_assets.index.backend import GateVerdict, SearchBackend
from rag_assets.ingest.chunking import CHUNK_COLUMNS
from rag_assets.ingest.sources import DOCUMENT_COLUMNS
from rag_assets.nlp.analysis import VECTOR_DIM
from rag_assets.nlp.features import LEMMA_COLUMNS, LEMMA_FIELDS, ChunkVectors
from rag_assets.retrieval import Retriever


@dataclass
class Verdict:
    """Whether a rule passed, what is wrong if not, and the numbers behind it."""

    problems: list[str] = field(default_factory=list)
    metadata: dict[str, float | int | str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def description(self) -> str:
        return "; ".join(self.problems) if self.problems else "ok"


def _table_problems(
    frame: pd.DataFrame, columns: list[str], id_column: str, required: list[str]
) -> tuple[list[str], dict[str, float | int | str]]:
    problems: list[str] = []
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        return [f"missing columns: {', '.join(missing)}"], {"rows": len(frame)}
    if frame.empty:
        problems.append("no rows")
    duplicates = int(frame[id_column].duplicated().sum())
    if duplicates:
        first = frame.loc[frame[id_column].duplicated(), id_column].iloc[0]
        problems.append(f"{duplicates} duplicate {id_column} values (first: {first})")
    for column in required:
        empty = int((frame[column].fillna("").astype(str).str.strip() == "").sum())
        if empty:
            problems.append(f"{empty} rows with an empty {column}")
    return problems, {"rows": len(frame), f"duplicate_{id_column}s": duplicates}


def check_documents(frame: pd.DataFrame) -> Verdict:
    problems, metadata = _table_problems(
        frame, DOCUMENT_COLUMNS, "doc_id", ["doc_id", "course", "question", "answer", "content_hash"]
    )
    return Verdict(problems, metadata)


def check_chunks(frame: pd.DataFrame, max_chars: int) -> Verdict:
    """Every chunk text within max_chars, unless it is one unbreakable word."""
    problems, metadata = _table_problems(frame, CHUNK_COLUMNS, "chunk_id", ["chunk_id", "doc_id", "text"])
    if problems and "missing columns" in problems[0]:
        return Verdict(problems, metadata)
    sizes = frame["text"].str.len()
    oversized = int(((sizes > max_chars) & frame["text"].str.contains(r"\s")).sum())
    if oversized:
        problems.append(f"{oversized} chunks longer than {max_chars} characters")
    metadata.update(max_text_chars=int(sizes.max() if len(sizes) else 0), oversized_chunks=oversized)
    return Verdict(problems, metadata)


def check_lemmas(frame: pd.DataFrame, chunk_ids: list[str], max_empty_share: float) -> Verdict:
    """Lemmas line up with the chunks, and few chunks have nothing to match lexically."""
    problems, metadata = _table_problems(frame, LEMMA_COLUMNS, "chunk_id", [])
    if problems and "missing columns" in problems[0]:
        return Verdict(problems, metadata)
    if list(frame["chunk_id"]) != chunk_ids:
        problems.append("chunk ids differ from the chunks asset")
    empty = np.logical_and.reduce([(frame[f"{f}_lemmas"].str.strip() == "").to_numpy() for f in LEMMA_FIELDS])
    empty_share = float(empty.mean()) if len(frame) else 0.0
    if empty_share > max_empty_share:
        problems.append(f"{empty_share:.1%} of chunks have no lemmas (at most {max_empty_share:.0%} allowed)")
    metadata["empty_share"] = round(empty_share, 4)
    return Verdict(problems, metadata)


def check_vectors(vectors: ChunkVectors, chunk_ids: list[str], max_zero_share: float) -> Verdict:
    problems: list[str] = []
    matrix = vectors.matrix
    if matrix.ndim != 2 or matrix.shape[1] != VECTOR_DIM:
        problems.append(f"vectors have shape {matrix.shape}, expected (n, {VECTOR_DIM})")
        return Verdict(problems, {"rows": int(matrix.shape[0])})
    if len(matrix) == 0:
        problems.append("no vectors")
    if vectors.chunk_ids != chunk_ids:
        problems.append("chunk ids differ from the chunks asset")
    nan_rows = int(np.isnan(matrix).any(axis=1).sum())
    if nan_rows:
        problems.append(f"{nan_rows} vectors contain NaN")
    zero_share = float((~matrix.any(axis=1)).mean()) if len(matrix) else 0.0
    if zero_share > max_zero_share:
        problems.append(f"{zero_share:.1%} zero vectors (at most {max_zero_share:.0%} allowed)")
    norms = np.linalg.norm(matrix, axis=1)
    off_unit = int(((norms > 0) & (np.abs(norms - 1) > 1e-3)).sum())
    if off_unit:
        problems.append(f"{off_unit} vectors are not unit length")
    return Verdict(
        problems,
        {
            "rows": len(matrix),
            "dimensions": int(matrix.shape[1]),
            "nan_vectors": nan_rows,
            "zero_share": round(zero_share, 4),
        },
    )


def check_course_drops(
    current: Mapping[str, int],
    served: Mapping[str, int] | None,
    max_drop: float,
    max_course_drop: float,
    why_none: str = "none published yet",
) -> Verdict:
    """Refuse a source that lost more than `max_drop` of the entries the served index has, or
    more than `max_course_drop` of any one course's (a course gone from the source lost all)."""
    total = sum(current.values())
    metadata: dict[str, float | int | str] = {"entries": total, "max_drop": max_drop}
    if served is None:
        metadata["served_entries"] = why_none
        return Verdict([], metadata)
    served_total = sum(served.values())
    drop = _drop(served_total, total)
    gone = sorted(set(served) - set(current))
    metadata.update(served_entries=served_total, drop=round(drop, 4), courses_gone=", ".join(gone))
    problems = []
    if drop > max_drop:
        problems.append(
            f"entries dropped from {served_total} (served index) to {total} ({drop:.1%}), "
            f"more than the allowed {max_drop:.0%} (RAG_MAX_ENTRY_DROP)"
        )
    for course, had in sorted(served.items()):
        now = current.get(course, 0)
        if _drop(had, now) > max_course_drop:
            what = "is no longer in the source" if course in gone else f"dropped from {had} to {now} entries"
            problems.append(
                f"course {course!r} {what} ({_drop(had, now):.1%} of its {had} served entries), more than "
                f"the allowed {max_course_drop:.0%} (RAG_MAX_COURSE_ENTRY_DROP)"
            )
    return Verdict(problems, metadata)


def _drop(served: int, current: int) -> float:
    return (served - current) / served if served else 0.0


_DIGEST_MODULUS = 1 << 256


def hashes_digest(chunk_hashes: Iterable[tuple[str, str]]) -> str:
    """One digest of (chunk_id, content_hash) pairs, whatever their order: what an index must hold.

    The sum of the pairs' SHA-256 values, so the digest of several courses' chunks is the sum of
    theirs (`combined_digest`) and a served index can be compared with them without loading them.
    """
    total = 0
    for chunk_id, content_hash in chunk_hashes:
        total += int.from_bytes(hashlib.sha256(f"{chunk_id}\x1f{content_hash}".encode()).digest())
    return f"{total % _DIGEST_MODULUS:064x}"


def combined_digest(digests: Iterable[str]) -> str:
    """`hashes_digest` of the union of disjoint sets of pairs, from their digests."""
    return f"{sum(int(d, 16) for d in digests) % _DIGEST_MODULUS:064x}"


def check_index_matches(served: Mapping[str, str], chunks: pd.DataFrame) -> Verdict:
    """The served index holds exactly the current chunks, with their current content."""
    expected = dict(zip(chunks["chunk_id"], chunks["content_hash"], strict=True))
    missing = sorted(set(expected) - set(served))
    extra = sorted(set(served) - set(expected))
    stale = sorted(c for c in set(expected) & set(served) if expected[c] != served[c])
    problems = [
        f"{len(ids)} {what} (first: {ids[0]})"
        for ids, what in (
            (missing, "chunks missing"),
            (extra, "chunks not in the source"),
            (stale, "chunks with outdated content"),
        )
        if ids
    ]
    return Verdict(
        problems,
        {
            "served_chunks": len(served),
            "expected_chunks": len(expected),
            "missing": len(missing),
            "extra": len(extra),
            "stale": len(stale),
        },
    )


def smoke_probes(chunk_parts: Iterable[pd.DataFrame], limit: int) -> list[GroundTruth]:
    """Entries asked their own question (questions asked only once), spread over the source.

    The chunks are read part by part, keeping only each entry's first chunk and what a probe needs.
    """
    firsts = pd.concat(
        [part.loc[part["chunk_index"] == 0, ["question", "course", "doc_id"]] for part in chunk_parts],
        ignore_index=True,
    ).drop_duplicates(["course", "question"], keep=False)
    step = max(1, len(firsts) // max(limit, 1))
    return [
        GroundTruth(row.question, row.course, row.doc_id)
        for row in firsts.iloc[::step].head(limit).itertuples(index=False)
    ]


class RetrievalGate:
    """Refuses a new version that answers worse than the live one (see `PublishGate`).

    Both versions are asked the same questions: the new version's entries their own questions
    (hit rate in the first 3) and, when configured, the ground truth (hit rate and MRR at `eval_k`).
    A figure lower than the live one's by more than `max_drop` refuses the publish.
    """

    def __init__(
        self,
        nlp: Language | Callable[[], Language],
        probes: list[GroundTruth],
        ground_truth: list[GroundTruth],
        eval_k: int = 5,
        max_drop: float = 0.02,
        reranker: str = "none",
    ) -> None:
        self._nlp = nlp  # or how to load it: a publish that changes nothing never needs the model
        self.reranker = reranker  # both versions are searched in the mode the service uses
        self.question_sets = {"smoke": (probes, 3), "ground_truth": (ground_truth, eval_k)}
        self.max_drop = max_drop

    def __call__(self, candidate: SearchBackend, live: SearchBackend | None) -> GateVerdict:
        nlp = self._nlp if isinstance(self._nlp, Language) else self._nlp()
        figures: dict[str, float] = {}
        problems: list[str] = []
        for name, (questions, k) in self.question_sets.items():
            if not questions:
                continue
            new = evaluate(Retriever(candidate, nlp, reranker=self.reranker), questions, k=k)
            old = None
            if live is not None:
                old = evaluate(Retriever(live, nlp, reranker=self.reranker), questions, k=k)
            for metric in ("hit_rate", "mrr"):
                figures[f"gate_{name}_{metric}_new"] = getattr(new, metric)
                if old is None:
                    continue
                figures[f"gate_{name}_{metric}_served"] = getattr(old, metric)
                if getattr(new, metric) < getattr(old, metric) - self.max_drop:
                    problems.append(
                        f"{name.replace('_', ' ')} {metric.replace('_', ' ')} would fall from "
                        f"{getattr(old, metric):.4f} (served) to {getattr(new, metric):.4f} (new), "
                        f"more than the allowed {self.max_drop:g} (RAG_MAX_QUALITY_DROP)"
                    )
        summary = ", ".join(f"{key.removeprefix('gate_')} {value:.4f}" for key, value in figures.items())
        return GateVerdict(not problems, "; ".join(problems) or f"passed: {summary}", figures)


def smoke_probe(chunks: pd.DataFrame) -> GroundTruth:
    """The first entry whose question is asked only once (else the first entry)."""
    unique = chunks.drop_duplicates(["course", "question"], keep=False)
    row = (unique if len(unique) else chunks).iloc[0]
    return GroundTruth(row.question, row.course, row.doc_id)


def check_smoke_query(retriever: Retriever, probe: GroundTruth, top: int = 3) -> Verdict:
    """Asking an entry its own question (`smoke_probe`) finds that entry in the first hits."""
    found = [hit.doc_id for hit in retriever.search(probe.question, course=probe.course, k=top)]
    problems = (
        []
        if probe.document in found
        else [
            f"asked {probe.question!r} ({probe.course}): "
            f"expected {probe.document} in the first {top}, got {found}"
        ]
    )
    return Verdict(
        problems, {"query": probe.question, "expected_doc_id": probe.document, "hits": ", ".join(found)}
    )


def check_retrieval(
    retriever: Retriever, ground_truth: list[GroundTruth], k: int, min_hit_rate: float, min_mrr: float
) -> Verdict:
    """Hit rate and MRR of the served index against thresholds, as `rag eval` measures them."""
    metrics = evaluate(retriever, ground_truth, k=k)
    problems = [
        f"{name} {value:.4f} below {minimum}"
        for name, value, minimum in (
            ("hit rate", metrics.hit_rate, min_hit_rate),
            ("MRR", metrics.mrr, min_mrr),
        )
        if value < minimum
    ]
    return Verdict(problems, {**asdict(metrics), "min_hit_rate": min_hit_rate, "min_mrr": min_mrr, "k": k})
