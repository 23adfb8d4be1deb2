"""`make bench-no-match`: how often "no entry matches" is said, for questions the FAQ answers and
for questions it does not, at a few relevance floors of each scale.

The answered questions are the dev ground truth (2123 questions about data-engineering-zoomcamp,
course filter on); a gold entry is lost when it is among the top 5 but below the floor. The
unanswerable ones are `no_answer_queries.tsv`, generated once (seed 27) and committed: 200
strings of 2-5 random English words (Webster's 2nd, words spaCy has a vector for), 100 of random
letters, 40 questions about other topics; each asked with the course filter and without. One is
refused when no hit of its top 5 reaches the floor.

Both scales are measured on one index built with sentence vectors: the lexical one (every mode)
with `RAG_RERANKER=none`, the cosine one with `semantic`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from rag_assets.evaluation import build_index, read_ground_truth
from rag_assets.index.backend import SEMANTIC
from rag_assets.nlp.analysis import load_pipeline
from rag_assets.retrieval import MIN_RELEVANCE, Retriever

HERE = Path(__file__).parent
FLOORS = {"none": (0.1, 0.2, 0.25, 0.3, 0.34, 0.4), SEMANTIC: (0.15, 0.2, 0.25, 0.3, 0.35)}
K = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", required=True)
    parser.add_argument("--ground-truth", required=True)
    parser.add_argument("--out", default="bench-no-match-results.json")
    args = parser.parse_args()
    nlp = load_pipeline()
    ground_truth = read_ground_truth(args.ground_truth)
    unanswerable: dict[str, list[str]] = {}
    for line in (HERE / "no_answer_queries.tsv").read_text().splitlines():
        kind, query = line.split("\t")
        unanswerable.setdefault(kind, []).append(query)
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="rag-no-match-") as tmp:
        index = build_index(args.documents, Path(tmp), nlp, ground_truth=ground_truth, reranker=SEMANTIC)
        for mode in ("none", SEMANTIC):
            retriever = Retriever(index, nlp, reranker=mode)
            gold = []  # the gold entry's relevance, NaN when it is not in the top 5
            for row in ground_truth:
                hits = retriever.search(row.question, row.course, k=K, min_relevance=0)
                found = [hit.relevance for hit in hits if hit.doc_id == row.document]
                gold.append(found[0] if found else np.nan)
            best = {}  # each unanswerable query's best relevance in its top 5 (0: no hit at all)
            for kind, queries in unanswerable.items():
                for course, suffix in ((ground_truth[0].course, ""), (None, " (no course filter)")):
                    best[kind + suffix] = [
                        max(
                            (h.relevance for h in retriever.search(q, course, k=K, min_relevance=0)),
                            default=0.0,
                        )
                        for q in queries
                    ]
            results[mode] = table(mode, np.array(gold), best)
        index.close()
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


def table(mode: str, gold: np.ndarray, best: dict[str, list[float]]) -> list[dict[str, object]]:
    scale = "cosine" if mode == SEMANTIC else "lexical"
    print(f"\nRAG_RERANKER={mode}: {scale} scale, default floor {MIN_RELEVANCE[scale]}")
    print(f"{'floor':>6} {'dev golds lost':>15} " + " ".join(f"{kind:>28}" for kind in best))
    rows = []
    for floor in FLOORS[mode]:
        lost = float(np.sum(gold < floor) / len(gold))  # NaN (not found) compares False: not lost
        refused = {kind: float(np.mean(np.array(values) < floor)) for kind, values in best.items()}
        everything = float(np.mean(np.concatenate([np.array(v) < floor for v in best.values()])))
        print(
            f"{floor:>6} {lost:>15.2%} "
            + " ".join(f"{share:>28.0%}" for share in refused.values())
            + f"   all unanswerable {everything:.1%}"
        )
        rows.append({"floor": floor, "dev_golds_lost": lost, "refused": refused, "refused_all": everything})
    return rows


if __name__ == "__main__":
    main()
