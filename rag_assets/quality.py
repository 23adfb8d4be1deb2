"""Data-quality rules for each stage, as plain functions; `checks.py` runs them as asset checks."""

from __future__ import annotations

import hashlib
import re
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
    """Every entry has an id, a course and a question; empty answers are judged per course
    (`check_course_content`), so that one course's glitch holds no other course back."""
    problems, metadata = _table_problems(
        frame, DOCUMENT_COLUMNS, "doc_id", ["doc_id", "course", "question", "content_hash"]
    )
    return Verdict(problems, metadata)


# An answer with fewer letters or digits says nothing: "", ".", "-", "?" (the real snapshots'
# shortest answers are "No.", "Yes", "TODO").
MIN_ANSWER_WORD_CHARS = 2


def blank_answers(answers: pd.Series) -> pd.Series:
    return answers.str.count(r"[^\W_]") < MIN_ANSWER_WORD_CHARS


def without_duplicates(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """A course's entries with each repeated (question, answer) kept once: a repeat adds nothing
    but a second copy of every hit. The first keeps its id (ids rank identical entries by position)."""
    repeated = frame.duplicated(["question", "answer"])
    return frame[~repeated].reset_index(drop=True), int(repeated.sum())


def content_figures(frame: pd.DataFrame, duplicate_entries: int) -> dict[str, int]:
    """What `check_course_content` judges, counted once when the course's entries are stored."""
    blank = blank_answers(frame["answer"])
    return {
        "source_entries": len(frame) + duplicate_entries,
        "duplicate_entries": duplicate_entries,
        "blank_answers": int(blank.sum()),
        "duplicate_answers": int(frame.loc[~blank, "answer"].duplicated().sum()),
    }


def check_course_content(
    facts: Mapping[str, int], max_blank_share: float, max_duplicate_share: float
) -> Verdict:
    """A course's answers are there and its entries are not repeated, beyond what real FAQs have
    (at most 0 blank answers and 4.4 % repeated entries per course in the four snapshots)."""
    entries, source_entries = facts["entries"], facts["source_entries"]
    figures = {
        "blank_answer_share": _share(facts["blank_answers"], entries),
        "duplicate_entry_share": _share(facts["duplicate_entries"], source_entries),
        "duplicate_answer_share": _share(facts["duplicate_answers"], entries),
    }
    problems = [
        f"{count} of {total} {what} ({figures[figure]:.1%}), more than the allowed {allowed:.0%} ({setting})"
        for count, total, what, figure, allowed, setting in (
            (
                facts["blank_answers"],
                entries,
                "answers are empty or have no words",
                "blank_answer_share",
                max_blank_share,
                "RAG_MAX_BLANK_ANSWER_SHARE",
            ),
            (
                facts["duplicate_entries"],
                source_entries,
                "entries repeat another entry's question and answer",
                "duplicate_entry_share",
                max_duplicate_share,
                "RAG_MAX_DUPLICATE_SHARE",
            ),
            (
                facts["duplicate_answers"],
                entries,
                "entries repeat another entry's answer under another question",
                "duplicate_answer_share",
                max_duplicate_share,
                "RAG_MAX_DUPLICATE_SHARE",
            ),
        )
        if figures[figure] > allowed
    ]
    counts = ("entries", "source_entries", "duplicate_entries", "blank_answers", "duplicate_answers")
    return Verdict(problems, {**{name: facts[name] for name in counts}, **figures})


def check_answer_churn(new: pd.DataFrame, served: pd.DataFrame | None, max_churn: float) -> Verdict:
    """The share of a course's served entries whose answer changed, from the chunks' texts.

    A real daily delta changes a few answers (at most 6.9 % of a course between the two
    `documents.json` snapshots); answers shuffled among the entries, or all replaced, change
    nearly every one. New and removed entries are the count guard's concern, not churn's.
    """
    if served is None:
        return Verdict([], {"served_entries": "none served yet (or no longer kept)"})
    answers_new, answers_served = _answers(new), _answers(served)
    both = answers_new.index.intersection(answers_served.index)
    changed = int((answers_new[both] != answers_served[both]).sum())
    churn = _share(changed, len(both))
    metadata: dict[str, float | int | str] = {
        "entries_still_served": len(both),
        "answers_changed": changed,
        "answer_churn": churn,
    }
    if churn <= max_churn:
        return Verdict([], metadata)
    return Verdict(
        [
            f"{changed} of the {len(both)} entries it serves would change their answer ({churn:.1%}), "
            f"more than the allowed {max_churn:.0%} (RAG_MAX_ANSWER_CHURN): answers shuffled or "
            "replaced? If the change is deliberate, allow it for one refresh"
        ],
        metadata,
    )


def _answers(chunks: pd.DataFrame) -> pd.Series:
    """Each entry's answer as its chunks' texts (doc_id -> joined windows)."""
    return chunks.groupby("doc_id", sort=False)["text"].agg("\x1f".join)


def _share(count: int, total: int) -> float:
    return round(count / total, 4) if total else 0.0


def check_chunks(frame: pd.DataFrame, max_chars: int) -> Verdict:
    """Every chunk text within max_chars, unless it is one unbreakable word."""
    # an entry with an empty answer is still found by its question (its chunk's text is empty)
    problems, metadata = _table_problems(frame, CHUNK_COLUMNS, "chunk_id", ["chunk_id", "doc_id", "question"])
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


# An answer probe asks with a sentence of the answer: enough words to find it, not a whole page.
ANSWER_PROBE_WORDS = (4, 30)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_WORDS = re.compile(r"[^\W_]+")


def answer_sentence(answer: str, question: str) -> str | None:
    """The first sentence of an answer with enough words of its own (words the question does not
    have) to search with, cut at the most words. Only those words: the question is in every
    chunk, so its words would find the entry whatever its answer says."""
    fewest, most = ANSWER_PROBE_WORDS
    asked = {word.lower() for word in _WORDS.findall(question)}
    for sentence in _SENTENCE_END.split(answer):
        words = [word for word in _WORDS.findall(sentence) if word.lower() not in asked]
        if len(words) >= fewest:
            return " ".join(words[:most])
    return None


def answer_probes(chunk_parts: Iterable[pd.DataFrame], per_course: int) -> dict[str, list[GroundTruth]]:
    """Per course, up to `per_course` entries asked with a sentence of their answer, spread over
    the course in id order. Made from the served version's chunks: an index that still answers
    with those words at the same entries kept its answers."""
    columns = ["course", "doc_id", "question", "text"]
    firsts = pd.concat(
        [pd.DataFrame(columns=columns)]
        + [part.loc[part["chunk_index"] == 0, columns] for part in chunk_parts],
        ignore_index=True,
    )
    probes: dict[str, list[GroundTruth]] = {}
    for course, entries in firsts.sort_values("doc_id").groupby("course"):
        asked = [
            GroundTruth(sentence, str(course), row.doc_id)
            for row in entries.itertuples(index=False)
            if (sentence := answer_sentence(row.text, row.question))
        ]
        step = max(1, len(asked) // max(per_course, 1))
        probes[str(course)] = asked[::step][:per_course]
    return probes


class RetrievalGate:
    """Refuses a new version that answers worse than the live one (see `PublishGate`).

    Both versions are asked the same questions: the new version's entries their own questions
    (hit rate in the first 3) and, when configured, the ground truth (hit rate and MRR at `eval_k`).
    A figure lower than the live one's by more than `max_drop` refuses the publish. Those see the
    questions only, which are part of every chunk; so each course whose content changed is also
    asked with sentences of its served answers (`answer_probes`): a course whose answers were
    blanked or shuffled no longer finds them at their entries, and a fall of its hit rate by more
    than `max_answer_drop` refuses the publish.
    """

    def __init__(
        self,
        nlp: Language | Callable[[], Language],
        probes: list[GroundTruth],
        ground_truth: list[GroundTruth],
        eval_k: int = 5,
        max_drop: float = 0.02,
        reranker: str = "none",
        answers: dict[str, list[GroundTruth]] | None = None,
        max_answer_drop: float = 0.3,
    ) -> None:
        self._nlp = nlp  # or how to load it: a publish that changes nothing never needs the model
        self.reranker = reranker  # both versions are searched in the mode the service uses
        self.question_sets = {"smoke": (probes, 3), "ground_truth": (ground_truth, eval_k)}
        self.max_drop = max_drop
        self.answers = answers or {}
        self.max_answer_drop = max_answer_drop

    def __call__(self, candidate: SearchBackend, live: SearchBackend | None) -> GateVerdict:
        nlp = self._nlp if isinstance(self._nlp, Language) else self._nlp()
        searched = {
            name: Retriever(backend, nlp, reranker=self.reranker)
            for name, backend in (("new", candidate), ("served", live))
            if backend is not None
        }
        figures: dict[str, float] = {}
        problems: list[str] = []
        for name, (questions, k) in self.question_sets.items():
            if not questions:
                continue
            results = {
                version: evaluate(retriever, questions, k=k) for version, retriever in searched.items()
            }
            for metric in ("hit_rate", "mrr"):
                for version, result in results.items():
                    figures[f"gate_{name}_{metric}_{version}"] = getattr(result, metric)
                if "served" in results and (
                    getattr(results["new"], metric) < getattr(results["served"], metric) - self.max_drop
                ):
                    problems.append(
                        f"{name.replace('_', ' ')} {metric.replace('_', ' ')} would fall from "
                        f"{getattr(results['served'], metric):.4f} (served) to "
                        f"{getattr(results['new'], metric):.4f} (new), "
                        f"more than the allowed {self.max_drop:g} (RAG_MAX_QUALITY_DROP)"
                    )
        if "served" in searched:
            problems += self._answers_kept(searched, figures)
        summary = ", ".join(f"{key.removeprefix('gate_')} {value:.4f}" for key, value in figures.items())
        return GateVerdict(not problems, "; ".join(problems) or f"passed: {summary}", figures)

    def _answers_kept(self, searched: dict[str, Retriever], figures: dict[str, float]) -> list[str]:
        """Per course: the answer probes' hit rate in the first 3, new against served."""
        problems = []
        asked = {version: 0.0 for version in searched}
        for course, probes in sorted(self.answers.items()):
            if not probes:
                continue
            rates = {version: evaluate(r, probes, k=3).hit_rate for version, r in searched.items()}
            for version, rate in rates.items():
                asked[version] += rate * len(probes)
            if rates["new"] < rates["served"] - self.max_answer_drop:
                problems.append(
                    f"course {course!r}: its served answers would be found at their entries for "
                    f"{rates['new']:.0%} of {len(probes)} answer probes instead of {rates['served']:.0%}, "
                    f"a fall of more than {self.max_answer_drop:.0%} (RAG_MAX_ANSWER_PROBE_DROP): answers "
                    "blanked, shuffled or replaced"
                )
        total = sum(len(probes) for probes in self.answers.values())
        if total:
            figures.update({f"gate_answers_hit_rate_{v}": round(n / total, 4) for v, n in asked.items()})
        return problems


def smoke_probe(chunks: pd.DataFrame) -> GroundTruth:
    """The first entry whose question is asked only once (else the first entry)."""
    unique = chunks.drop_duplicates(["course", "question"], keep=False)
    row = (unique if len(unique) else chunks).iloc[0]
    return GroundTruth(row.question, row.course, row.doc_id)


def check_smoke_query(retriever: Retriever, probe: GroundTruth, top: int = 3) -> Verdict:
    """Asking an entry its own question (`smoke_probe`) finds that entry in the first hits."""
    hits = retriever.search(probe.question, course=probe.course, k=top, min_relevance=0)
    found = [hit.doc_id for hit in hits]
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
