"""Query-time retrieval: fusion, one hit per entry, course filter, clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from spacy.language import Language

import rag_assets
from rag_assets.index.backend import (
    AnalysisMismatchError,
    IndexContent,
    IndexNotFoundError,
    RagError,
    UnknownCourseError,
)
from rag_assets.index.embedded import EmbeddedIndex
from rag_assets.index.ranking import FusionSettings, reciprocal_rank_fusion
from rag_assets.nlp.analysis import model_fingerprint
from rag_assets.retrieval import MIN_RELEVANCE, Retriever, default_retriever, rank_entries

DE = "data-engineering-zoomcamp"


@pytest.fixture(scope="module")
def retriever(
    tmp_path_factory: pytest.TempPathFactory, content_2025: IndexContent, nlp: Language
) -> Retriever:
    index = EmbeddedIndex(tmp_path_factory.mktemp("index"))
    index.publish(content_2025)
    return Retriever(index, nlp)


def test_join_after_start_is_among_the_first_hits(retriever: Retriever, nlp: Language) -> None:
    """The fused order has it first; the features mode (the default) second, after "When will the
    course start?" (docs/retrieval.md, The default mode)."""
    fused = Retriever(retriever.backend, nlp, reranker="none")
    for searcher, place in ((fused, 0), (retriever, 1)):
        hits = searcher.search("I just discovered the course, can I still join?", course=DE, min_relevance=0)
        assert hits[place].question == "Course - Can I still join the course after the start date?"
        assert len(hits) == 5
        assert all(hit.course == DE for hit in hits)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_one_hit_per_entry(retriever: Retriever) -> None:
    hits = retriever.search("docker compose postgres pgadmin network", k=20, min_relevance=0)
    assert len({hit.doc_id for hit in hits}) == len(hits) == 20


def test_errors_are_clear(retriever: Retriever, tmp_path: Path, nlp: Language) -> None:
    with pytest.raises(RagError, match="the query is blank"):
        retriever.search("   ")
    with pytest.raises(UnknownCourseError, match="unknown course 'nope'; the index has: data-engineering"):
        retriever.search("docker", course="nope")
    with pytest.raises(IndexNotFoundError, match="no index at"):
        Retriever(EmbeddedIndex(tmp_path), nlp).search("docker")


def test_a_query_of_only_stop_words_returns_nothing(retriever: Retriever) -> None:
    assert retriever.search("the of and", course=DE) == []


def test_reciprocal_rank_fusion() -> None:
    fused = reciprocal_rank_fusion({"a": ["x", "y"], "b": ["y", "z"]}, {"a": 1.0, "b": 1.0}, rrf_k=1)
    assert [item for item, _ in fused] == ["y", "x", "z"]
    assert fused[0][1] == pytest.approx(1 / 3 + 1 / 2)
    only_a = reciprocal_rank_fusion({"a": ["x"], "b": ["z"]}, {"a": 1.0, "b": 0.0}, rrf_k=60)
    assert only_a == [("x", pytest.approx(1 / 61))]


def test_rank_entries_collapses_chunks_to_their_best_rank() -> None:
    rankings, shown = rank_entries({"lexical": ["a-1", "b-0", "a-0"], "vector": ["c-0", "a-0", "x-y-0"]})
    assert rankings == {"lexical": ["a", "b"], "vector": ["c", "a", "x-y"]}
    assert shown == {"a": "a-1", "b": "b-0", "c": "c-0", "x-y": "x-y-0"}


def test_fusion_weights_decide_which_rankings_count(retriever: Retriever) -> None:
    vector_only = Retriever(retriever.backend, retriever.nlp, FusionSettings(weights={"vector": 1.0}))
    hits = vector_only.search("kafka streams consumer", course=DE, k=3)
    assert len(hits) == 3
    assert hits != retriever.search("kafka streams consumer", course=DE, k=3)


def test_a_query_analysed_otherwise_than_the_index_is_refused(
    tmp_path: Path, nlp: Language, content_2025: IndexContent
) -> None:
    """An index built by another analysis (here: the rule lemmatizer's, under its fingerprint)
    would rank lookup-lemma stems against other stems: the search says so instead."""
    EmbeddedIndex(tmp_path).publish(dataclasses.replace(content_2025, fingerprint="0123456789ab"))
    with pytest.raises(AnalysisMismatchError) as refused:
        Retriever(EmbeddedIndex(tmp_path), nlp).search("docker")
    assert str(refused.value) == (
        f"the index at {tmp_path / 'index.sqlite'} was analysed as 0123456789ab, this query would be "
        f"analysed as {model_fingerprint()}; run the refresh (make run) to rebuild it"
    )
    EmbeddedIndex(tmp_path).publish(content_2025)  # a refresh under the current analysis heals it
    assert Retriever(EmbeddedIndex(tmp_path), nlp).search("docker")


def test_the_python_api_leaves_out_hits_below_the_relevance_floor(
    tmp_path: Path, content_2025: IndexContent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rag_assets.search`: an empty list is the answer "no entry matches"; the floor is the mode's
    unless given."""
    EmbeddedIndex(tmp_path).publish(content_2025)
    monkeypatch.setenv("RAG_DATA_DIR", str(tmp_path))
    default_retriever.cache_clear()
    try:
        assert rag_assets.search("Who painted the Mona Lisa?") == []
        closest = rag_assets.search("Who painted the Mona Lisa?", min_relevance=0)
        assert len(closest) == 5 and max(hit.relevance for hit in closest) < MIN_RELEVANCE["lexical"]
        [hit] = rag_assets.search("Can I still join the course after the start date?", k=1)
        assert hit.question == "Course - Can I still join the course after the start date?"
        assert hit.relevance == 1.0  # every content word of the query is in its question
        assert (
            rag_assets.search("Can I still join the course after the start date?", min_relevance=1.01) == []
        )
    finally:
        default_retriever.cache_clear()
