"""Fitting the reranker on a retrieval ground truth (`rag fit-reranker`).

The figures that choose a model are cross-validated with the folds grouped by gold entry: no
entry's questions are both fitted and judged, so a model that learns entries instead of signals
scores no better than it will on new questions. Hyperparameters are fixed in advance
(`REGULARISATION`), not tuned on the same folds.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from spacy.language import Language

from rag_assets.common.progress import Progress
from rag_assets.evaluation import GroundTruth, build_index, hit_rate_and_mrr
from rag_assets.index.backend import SEMANTIC
from rag_assets.index.reranking import MODE_FEATURES, MODELS_DIR, RerankModel
from rag_assets.nlp.analysis import model_fingerprint
from rag_assets.nlp.sentence import SENTENCE_MODEL
from rag_assets.retrieval import Retriever

FOLDS = 5
K = 5  # the course's metric: hit rate and MRR of the top 5
REGULARISATION = 1.0  # sklearn's C, fixed before any figure was seen


@dataclass(frozen=True)
class Question:
    """One ground-truth question: the entries a mode reranks, their feature rows in that mode,
    and where the gold entry is among them (-1: not among them)."""

    gold: str
    entries: list[str]
    features: np.ndarray

    @property
    def gold_position(self) -> int:
        return self.entries.index(self.gold) if self.gold in self.entries else -1


@dataclass(frozen=True)
class Figures:
    hit_rate: float
    mrr: float
    ceiling: float  # the share of questions whose gold entry is among the candidates


def collect(
    retriever: Retriever, ground_truth: list[GroundTruth], mode: str, log: Callable[[str], None] | None = None
) -> list[Question]:
    """Each question's candidates in `mode`: the semantic mode's add its sentence kNN's entries."""
    progress = Progress(f"{mode} candidates", len(ground_truth), log)
    questions = []
    for row in ground_truth:
        entries, matrix = retriever.candidate_table(row.question, row.course, mode)
        questions.append(Question(row.document, entries, matrix))
        progress.update()
    progress.close()
    return questions


def figures(questions: list[Question], orders: list[np.ndarray]) -> Figures:
    """Hit rate and MRR at K when question i's entries are taken in `orders[i]`."""
    reciprocal = []
    held = sum(question.gold_position >= 0 for question in questions)
    for question, order in zip(questions, orders, strict=True):
        position = question.gold_position
        rank = int(np.flatnonzero(order == position)[0]) + 1 if position >= 0 else K + 1
        reciprocal.append(1.0 / rank if rank <= K else 0.0)
    return Figures(*hit_rate_and_mrr(reciprocal), ceiling=round(held / len(questions), 4))


def fit(questions: list[Question], columns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, scale, weights) of a linear score over the first `columns` features, fitted
    pairwise: a logistic regression on the difference between the gold candidate's features and
    each other candidate's of the same question (RankNet's linear case). It learns what puts the
    gold entry above the others of its own list, which is what hit rate and MRR count; fitted to
    tell gold from non-gold candidates across all questions instead (pointwise), it ranked worse
    (docs/retrieval.md, Fitting). Questions without their gold entry among the candidates teach nothing."""
    from sklearn.linear_model import LogisticRegression  # fitting only; queries use numpy

    taught = [q for q in questions if q.gold_position >= 0]
    x = np.vstack([q.features[:, :columns] for q in taught])
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    differences = []
    for question in taught:
        rows = (question.features[:, :columns] - mean) / scale
        differences.append(rows[question.gold_position] - np.delete(rows, question.gold_position, axis=0))
    above = np.vstack(differences)
    pairs = np.vstack([above, -above])  # each pair both ways round: the classes are balanced
    labels = np.concatenate([np.ones(len(above)), np.zeros(len(above))])
    model = LogisticRegression(C=REGULARISATION, fit_intercept=False, max_iter=2000).fit(pairs, labels)
    return mean, scale, model.coef_[0]


def model_order(mean: np.ndarray, scale: np.ndarray, weights: np.ndarray, columns: int):
    def order(question: Question) -> np.ndarray:
        scores = ((question.features[:, :columns] - mean) / scale) @ weights
        return np.argsort(-scores, kind="stable")

    return order


def cross_validated(questions: list[Question], columns: int) -> Figures:
    """Figures of models fitted on the other folds, the folds grouped by gold entry."""
    from sklearn.model_selection import GroupKFold

    orders: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(questions)
    groups = [q.gold for q in questions]
    for fitted, judged in GroupKFold(n_splits=FOLDS).split(questions, groups=groups):
        order = model_order(*fit([questions[i] for i in fitted], columns), columns)
        for i in judged:
            orders[i] = order(questions[i])
    return figures(questions, orders)


def fit_rerankers(
    documents: str,
    ground_truth: list[GroundTruth],
    nlp: Language,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, Figures], dict[str, RerankModel]]:
    """Cross-validated figures of every mode, and each reranking mode's model fitted on all."""
    with tempfile.TemporaryDirectory(prefix="rag-fit-") as tmp:
        index = build_index(documents, Path(tmp), nlp, log=log, ground_truth=ground_truth, reranker=SEMANTIC)
        retriever = Retriever(index, nlp, reranker="none")
        questions = {mode: collect(retriever, ground_truth, mode, log) for mode in MODE_FEATURES}
        index.close()
    fused = questions["features"]  # the fused order's candidates
    results = {"none": figures(fused, [np.arange(len(q.entries)) for q in fused])}
    models = {}
    for mode, names in MODE_FEATURES.items():
        results[mode] = cross_validated(questions[mode], len(names))
        mean, scale, weights = fit(questions[mode], len(names))
        fitted_on = {
            "documents": Path(documents).name,
            "questions": len(questions[mode]),
            "analysis": model_fingerprint(),
            **({"sentence_model": SENTENCE_MODEL} if mode == SEMANTIC else {}),
            "fitted": "pairwise logistic regression (gold minus each other candidate), no intercept",
            "regularisation": REGULARISATION,
            f"grouped_{FOLDS}_fold": {"hit_rate": results[mode].hit_rate, "mrr": results[mode].mrr},
            "gold_among_candidates": results[mode].ceiling,
            "no_reranking": {"hit_rate": results["none"].hit_rate, "mrr": results["none"].mrr},
        }
        models[mode] = RerankModel(mode, names, mean, scale, weights, fitted_on)
    return results, models


def save(models: dict[str, RerankModel], directory: Path = MODELS_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for mode, model in models.items():
        path = directory / f"{mode}.json"
        path.write_text(model.to_json() + "\n", encoding="utf-8")
        written.append(path)
    return written
