"""Dagster assets that keep a searchable index of course FAQ documents fresh."""

from __future__ import annotations

from rag_assets.retrieval import Hit, default_retriever


def search(
    query: str, course: str | None = None, k: int = 5, min_relevance: float | None = None
) -> list[Hit]:
    """Search the published index (embedded or Elasticsearch, as configured by the environment).

    Hits less relevant than `min_relevance` (default: the mode's) are left out: an empty list
    means no entry matches the query."""
    return default_retriever().search(query, course=course, k=k, min_relevance=min_relevance)


__all__ = ["Hit", "search"]
