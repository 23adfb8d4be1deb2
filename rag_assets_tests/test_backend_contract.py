"""One contract for every search backend: publish, replace, delete, search, filter, count.

It runs against the embedded index always, against the recording Elasticsearch fake (which checks
the client plumbing, not Elasticsearch's ranking), and against a real cluster when
ELASTICSEARCH_URL is set.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from spacy.language import Language

from rag_assets import settings
from rag_assets.defs.resources import ElasticsearchResource
from rag_assets.index.backend import LEMMA_FIELD_COLUMNS, IndexContent, IndexNotFoundError, SearchBackend
from rag_assets.index.embedded import EmbeddedIndex
from rag_assets.nlp.sentence import chunk_sentences, sentence_encoder

from .conftest import content_of, content_rows, index_content, semantic_content, subset
from .fake_elasticsearch import FakeElasticsearch

LIVE_URL = os.environ.get("ELASTICSEARCH_URL")


@pytest.fixture(scope="module")
def content(nlp: Language, documents_2025: pd.DataFrame) -> IndexContent:
    sample = documents_2025.groupby("course").head(25).reset_index(drop=True)
    return index_content(nlp, sample)


@pytest.fixture(
    params=[
        "embedded",
        "elasticsearch-fake",
        pytest.param(
            "elasticsearch-live",
            marks=[
                pytest.mark.elasticsearch,
                pytest.mark.skipif(not LIVE_URL, reason="ELASTICSEARCH_URL is not set: no live cluster"),
            ],
        ),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SearchBackend]:
    if request.param == "embedded":
        yield EmbeddedIndex(tmp_path)
    elif request.param == "elasticsearch-fake":
        fake = FakeElasticsearch()
        yield ElasticsearchResource(url=fake.url, alias="contract").index()
        fake.close()
    else:
        cluster = settings.elasticsearch(os.environ)
        assert cluster is not None
        alias = f"rag-contract-{uuid.uuid4().hex[:8]}"
        index = dataclasses.replace(cluster, alias=alias).open_index()
        yield index
        for version in index.versions():  # clusters refuse wildcard deletes by default
            index.client.options(ignore_status=404).indices.delete(index=version.name)


def test_nothing_published_yet(backend: SearchBackend) -> None:
    with pytest.raises(IndexNotFoundError):
        backend.stats()


def test_publish_and_count(backend: SearchBackend, content: IndexContent) -> None:
    rows, _ = content_rows(content)
    report = backend.publish(content)
    assert (report.chunks, report.upserted, report.deleted) == (len(content), len(content), 0)
    stats = backend.stats()
    assert stats.chunks == len(content)
    assert stats.entries == rows.doc_id.nunique() == 75
    assert stats.courses == {c: 25 for c in rows.course.unique()}
    assert stats.published_at
    assert backend.chunk_hashes() == dict(zip(rows.chunk_id, rows.content_hash, strict=True))


def test_replace_and_delete(backend: SearchBackend, content: IndexContent) -> None:
    backend.publish(content)
    rows, vectors = content_rows(content)
    removed = rows.doc_id == rows.doc_id[4]
    changed = rows.copy()
    changed.loc[0, ["text_lemmas", "row_hash"]] = ["quokka marsupial", "changed"]
    replacement = subset(content_of(changed, vectors, content.fingerprint), ~removed.to_numpy())
    report = backend.publish(replacement)
    assert (report.upserted, report.deleted) == (1, int(removed.sum()))
    assert backend.stats().chunks == len(replacement)
    assert set(backend.chunk_hashes()) == set(replacement.chunk_ids)
    assert backend.fetch(list(rows.chunk_id[removed])) == {}
    assert [c for c, _ in backend.lexical_search(["quokka"], None, 5)] == [rows.chunk_id[0]]
    again = backend.publish(replacement)
    assert (again.upserted, again.deleted, again.unchanged) == (0, 0, len(replacement))


def test_search_and_filter(backend: SearchBackend, content: IndexContent) -> None:
    backend.publish(content)
    rows, vectors = content_rows(content)
    target = 30
    own_terms = rows.question_lemmas[target].split()
    scored = backend.lexical_search(own_terms, rows.course[target], 10)
    hits = [chunk_id for chunk_id, _ in scored]
    scores = [score for _, score in scored]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0
    assert rows.chunk_id[target] in hits[:3]
    assert backend.vector_search(vectors[target], None, 3)[0] == rows.chunk_id[target]
    for course in rows.course.unique():
        ids = [c for c, _ in backend.lexical_search(["course", "docker", "error"], course, 50)]
        ids += backend.vector_search(vectors[target], course, 50)
        assert ids
        assert {chunk.course for chunk in backend.fetch(ids).values()} == {course}
    fetched = backend.fetch([rows.chunk_id[target]])[rows.chunk_id[target]]
    assert (fetched.doc_id, fetched.question, fetched.text) == (
        rows.doc_id[target],
        rows.question[target],
        rows.text[target],
    )


def test_confirm_holds_only_for_the_content_the_index_was_published_from(
    backend: SearchBackend, content: IndexContent
) -> None:
    assert backend.confirm("first") is None  # nothing published yet
    backend.publish(dataclasses.replace(content, digest="first"))
    published = backend.stats()
    assert backend.confirm("other") is None
    assert backend.confirm("") is None  # content of unknown origin is never confirmed unread
    report = backend.confirm("first")
    assert report is not None
    assert (report.chunks, report.upserted, report.deleted, report.unchanged) == (
        len(content),
        0,
        0,
        len(content),
    )
    confirmed = backend.stats()
    assert confirmed.published_at == published.published_at
    assert (confirmed.confirmed_at or "") >= (published.confirmed_at or "")

    keep = np.arange(len(content)) % 2 == 0
    backend.publish(dataclasses.replace(subset(content, keep), digest="second"))
    assert backend.confirm("first") is None
    assert backend.confirm("second") is not None


def test_the_semantic_mode_keeps_each_chunks_sentence_vector_for_its_candidates(
    backend: SearchBackend, content: IndexContent
) -> None:
    rows, _ = content_rows(content)
    sentences = sentence_encoder().encode(chunk_sentences(rows))
    backend.publish(semantic_content(content, sentences))
    assert backend.stats().reranker == "semantic"
    wanted = [rows.chunk_id[3], rows.chunk_id[40], "no-such-chunk"]
    with backend.snapshot():
        found = backend.candidates(wanted)
    assert set(found) == set(wanted[:2])
    for position in (3, 40):
        candidate = found[rows.chunk_id[position]]
        assert candidate.chunk.question == rows.question[position]
        assert candidate.lemmas == {c: rows[c][position] for c in LEMMA_FIELD_COLUMNS}
        np.testing.assert_allclose(candidate.sentence, sentences[position], atol=1e-6)
    with backend.snapshot():
        nearest = backend.sentence_search(sentences[40], None, 5)
        within = backend.sentence_search(sentences[40], rows.course[3], 50)
    assert nearest[0] == rows.chunk_id[40] and len(nearest) == 5
    assert within and {chunk.course for chunk in backend.fetch(within).values()} == {rows.course[3]}
    backend.publish(dataclasses.replace(content, reranker="features"))  # every row loses its vector
    assert backend.stats().reranker == "features"
    assert backend.candidates([rows.chunk_id[3]])[rows.chunk_id[3]].sentence is None
    with backend.snapshot():
        assert backend.sentence_search(sentences[40], None, 5) == []


def test_term_frequencies_count_the_chunks_holding_each_term(
    backend: SearchBackend, content: IndexContent
) -> None:
    """What the relevance's idf weights come from, the same in every backend (a live cluster too)."""
    backend.publish(content)
    rows, _ = content_rows(content)
    term = rows.question_lemmas[0].split()[0]
    holding = sum(
        term in " ".join(fields).split() for fields in rows[list(LEMMA_FIELD_COLUMNS)].itertuples(index=False)
    )
    assert backend.term_frequencies([term, "lasagna"]) == (len(rows), {term: holding, "lasagna": 0})
