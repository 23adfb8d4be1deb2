"""Dagster assets that keep a searchable index of course FAQ documents fresh."""

from __future__ import annotations

from rag_assets.retrieval import Hit, default_retriever


def search(query: str, course: str | None = None, k: int = 5) -> list[Hit]:
    """Search the published index (embedded or Elasticsearch, as configured by the environment)."""
    return default_retriever().search(query, course=course, k=k)


__all__ = ["Hit", "search"]
