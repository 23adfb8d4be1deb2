"""The second stage of a search: the fused top entries scored again by a small linear model.

Which entry answers best depends on the query (a question phrased like the user's, an answer
that covers every query term, a paraphrase no lemma matches), so no fixed fusion formula ranks
all of them first; a model over features of the candidates can weigh the signals per query.
The features are computed here from what one request returns (the candidates' lemma fields and
sentence vectors) and the first-stage rankings; scoring is one matrix product.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rag_assets.common.errors import RagError
from rag_assets.index.backend import LEMMA_FIELD_COLUMNS, SEMANTIC, Candidate

RERANK_DEPTH = 20  # the gold entry is in the fused top 20 for 0.975 of the dev questions
# The semantic mode adds up to SENTENCE_CANDIDATES entries of its MiniLM kNN that the fused top
# lacks: paraphrases that share no lemma with the query. With them the gold entry is among the
# candidates for 0.980 of the dev questions (docs/benchmarks.md, The sentence kNN first stage).
SENTENCE_CANDIDATES = 5
MODELS_DIR = Path(__file__).parent / "rerankers"
# Lexical evidence per candidate: its place in each first-stage ranking, how much of the query
# each lemma field covers (alone and against the best candidate of the same query), and its
# BM25 score as a share of the query's best (a ratio, so the two backends' scales agree).
# Weighting the terms by idf and BM25's term-frequency saturation were tried and left out: no
# better cross-validated (docs/benchmarks.md, Reranker fitting), and one request more per search
# on Elasticsearch.
FEATURES = (
    "lexical_rr",
    "vector_rr",
    "fused_rr",
    "question_coverage",
    "text_coverage",
    "section_coverage",
    "question_jaccard",
    "question_coverage_gap",
    "text_coverage_gap",
    "question_terms_log",
    "text_terms_log",
    "lexical_score_share",
)
# The semantic mode adds the query's cosine to the candidate's sentence vector: as it is, its gap
# to the best candidate's, its rank, and its closeness to the best, exp(CLOSENESS * gap): near 1
# for the few candidates about as close as the best, near 0 for the rest however far behind.
SEMANTIC_FEATURES = (*FEATURES, "sentence_cosine", "sentence_cosine_gap", "sentence_rr", "sentence_closeness")
CLOSENESS = 10.0  # 5 and 20 cross-validate about the same (docs/benchmarks.md, Reranker fitting)
MODE_FEATURES = {"features": FEATURES, SEMANTIC: SEMANTIC_FEATURES}  # each reranking mode's columns


class RerankerError(RagError):
    pass


def reciprocal_ranks(order: Sequence[str], items: Sequence[str]) -> np.ndarray:
    """1 / (place of each item in `order`), 0 for items not in it."""
    place = {item: rank for rank, item in enumerate(order, start=1)}
    return np.array([1.0 / place[i] if i in place else 0.0 for i in items])


# The columns of FEATURES that depend on their candidate alone (`term_evidence`).
TERM_EVIDENCE = (
    "question_coverage",
    "text_coverage",
    "section_coverage",
    "question_jaccard",
    "question_terms_log",
    "text_terms_log",
)


def term_evidence(query_terms: Sequence[str], candidates: Sequence[Candidate]) -> np.ndarray:
    """What each candidate's lemma fields say of the query, one row per candidate, columns as
    TERM_EVIDENCE. Apart from `candidate_features` because each row depends on its candidate
    alone: a semantic search computes the fused top's while the query's sentence vector is made,
    and its kNN's entries' after."""
    query = set(query_terms)
    size = max(len(query), 1)
    rows = []
    for candidate in candidates:
        held = {column: set(candidate.lemmas[column].split()) for column in LEMMA_FIELD_COLUMNS}
        question, text, section = held["question_lemmas"], held["text_lemmas"], held["section_lemmas"]
        shared = len(query & question)
        rows.append(
            [
                shared / size,
                len(query & text) / size,
                len(query & section) / size,
                shared / max(len(query | question), 1),
                np.log1p(len(question)),
                np.log1p(len(text)),
            ]
        )
    return np.array(rows, dtype=np.float64).reshape(len(candidates), len(TERM_EVIDENCE))


def candidate_features(
    entries: Sequence[str],
    entry_rankings: Mapping[str, Sequence[str]],
    lexical_scores: Mapping[str, float],
    evidence: np.ndarray,
) -> np.ndarray:
    """One row per candidate (entry i, its `term_evidence` evidence[i]), columns as FEATURES."""
    column = dict(zip(TERM_EVIDENCE, evidence.T, strict=True))
    question, text = column["question_coverage"], column["text_coverage"]
    columns = [
        reciprocal_ranks(entry_rankings.get("lexical", ()), entries),
        reciprocal_ranks(entry_rankings.get("vector", ()), entries),
        reciprocal_ranks(entries, entries),
        question,
        text,
        column["section_coverage"],
        column["question_jaccard"],
        question - question.max(initial=0.0),
        text - text.max(initial=0.0),
        column["question_terms_log"],
        column["text_terms_log"],
        np.array([lexical_scores.get(e, 0.0) for e in entries]) / max(lexical_scores.values(), default=1.0),
    ]
    return np.column_stack(columns) if len(entries) else np.empty((0, len(columns)))


def sentence_features(
    entries: Sequence[str], candidates: Sequence[Candidate], query_sentence: np.ndarray
) -> np.ndarray:
    """The semantic mode's columns beyond FEATURES, one row per candidate."""
    cosine = np.array([float(c.sentence @ query_sentence) for c in candidates])  # type: ignore[operator]
    order = [entries[i] for i in np.argsort(-cosine, kind="stable")]
    gap = cosine - cosine.max(initial=0.0)
    columns = [cosine, gap, reciprocal_ranks(order, entries), np.exp(CLOSENESS * gap)]
    return np.column_stack(columns) if candidates else np.empty((0, len(columns)))


@dataclass(frozen=True)
class RerankModel:
    """A linear score over standardised features (scores only order one query's candidates);
    the weights are data, fitted by `rag fit-reranker` and committed with the figures they were
    cross-validated to."""

    mode: str
    features: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    fitted_on: dict[str, object] = field(default_factory=dict)  # data, analysis, figures

    def scores(self, matrix: np.ndarray) -> np.ndarray:
        return ((matrix - self.mean) / self.scale) @ self.weights

    def to_json(self) -> str:
        return json.dumps(
            {
                "mode": self.mode,
                "features": list(self.features),
                "mean": self.mean.round(8).tolist(),
                "scale": self.scale.round(8).tolist(),
                "weights": self.weights.round(8).tolist(),
                "fitted_on": self.fitted_on,
            },
            indent=2,
        )

    @classmethod
    def load(cls, mode: str, directory: Path = MODELS_DIR) -> RerankModel:
        path = directory / f"{mode}.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            model = cls(
                mode=raw["mode"],
                features=tuple(raw["features"]),
                mean=np.array(raw["mean"], dtype=np.float64),
                scale=np.array(raw["scale"], dtype=np.float64),
                weights=np.array(raw["weights"], dtype=np.float64),
                fitted_on=raw.get("fitted_on", {}),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            message = f"reranker weights {path} cannot be read ({exc}); run rag fit-reranker"
            raise RerankerError(message) from exc
        expected = MODE_FEATURES[mode]
        if model.features != expected or len(model.weights) != len(expected):
            raise RerankerError(
                f"reranker weights {path} are for the features {list(model.features)}, this code computes "
                f"{list(expected)}; run rag fit-reranker"
            )
        return model
