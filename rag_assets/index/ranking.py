"""The ranking design shared by every backend: field weights and the fusion of ranked lists."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# BM25F weights of the lemma fields: a question phrased like the user's is the strongest signal.
# Elasticsearch's combined_fields (BM25F, like the embedded index's) only accepts weights >= 1.
FIELD_WEIGHTS: Mapping[str, float] = {"question": 2.0, "text": 1.0, "section": 1.0}
if min(FIELD_WEIGHTS.values()) < 1:
    raise ValueError("field weights below 1 cannot be expressed in Elasticsearch's combined_fields")


@dataclass(frozen=True)
class FusionSettings:
    """Reciprocal rank fusion of the lexical and the vector ranking.

    On the evaluation set word-vector kNN is far weaker than BM25 on lemmas, and any weight that
    lets it reorder the top five costs MRR. At 0.01 it only breaks ties and fills the list when
    few chunks share a lemma with the query (a vocabulary mismatch BM25 cannot bridge).
    """

    rrf_k: int = 60
    weights: Mapping[str, float] = field(default_factory=lambda: {"lexical": 1.0, "vector": 0.01})
    candidates: int = 50


def reciprocal_rank_fusion(
    rankings: Mapping[str, Sequence[str]], weights: Mapping[str, float], rrf_k: int
) -> list[tuple[str, float]]:
    """Fuse ranked id lists: score = sum of weight / (rrf_k + rank); ties keep first-seen order."""
    scores: dict[str, float] = {}
    for name, ranking in rankings.items():
        weight = weights.get(name, 0.0)
        if weight <= 0:
            continue
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + weight / (rrf_k + rank)
    return sorted(scores.items(), key=lambda pair: pair[1], reverse=True)
