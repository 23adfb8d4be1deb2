"""Incremental refresh: the NLP cache, and deltas on both backends giving the cold build's result."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from spacy.language import Language

from rag_assets.defs.resources import ElasticsearchResource
from rag_assets.index.backend import IndexContent, SearchBackend
from rag_assets.index.embedded import EmbeddedIndex
from rag_assets.ingest.chunking import ChunkingConfig, make_chunks
from rag_assets.nlp.analysis import model_fingerprint
from rag_assets.nlp.cache import CACHE_FILENAME, NlpCache, cached_lemmas, cached_vectors
from rag_assets.nlp.features import embed_chunks, lemmatize_chunks
from rag_assets.retrieval import Retriever

from .conftest import DATA, content_rows, load_file
from .fake_elasticsearch import FakeElasticsearch


def no_model() -> Language:
    raise AssertionError("the model was loaded although every chunk was cached")


@pytest.fixture(scope="module")
def chunks(documents_2025: pd.DataFrame) -> pd.DataFrame:
    return make_chunks(documents_2025.head(60), ChunkingConfig())


def test_a_second_pass_reuses_everything_without_loading_the_model(
    tmp_path: Path, nlp: Language, chunks: pd.DataFrame
) -> None:
    cache = NlpCache(tmp_path, "fp")
    lemmas, first = cached_lemmas(lambda: nlp, chunks, cache)
    vectors, first_vectors = cached_vectors(lambda: nlp, lemmas, cache)
    assert (first.computed, first.reused) == (len(chunks), 0)
    assert (first_vectors.computed, first_vectors.reused) == (len(chunks), 0)

    again, second = cached_lemmas(no_model, chunks, NlpCache(tmp_path, "fp"))
    again_vectors, second_vectors = cached_vectors(no_model, again, NlpCache(tmp_path, "fp"))
    assert (second.computed, second.reused) == (0, len(chunks))
    assert (second_vectors.computed, second_vectors.reused) == (0, len(chunks))
    pd.testing.assert_frame_equal(again, lemmas)
    assert np.array_equal(again_vectors.matrix, vectors.matrix)
    # Identical to computing without any cache.
    pd.testing.assert_frame_equal(lemmas, lemmatize_chunks(nlp, chunks))
    assert np.array_equal(vectors.matrix, embed_chunks(nlp, lemmas).matrix)


def test_blocks_give_the_same_result(tmp_path: Path, nlp: Language, chunks: pd.DataFrame) -> None:
    whole, _ = cached_lemmas(lambda: nlp, chunks, NlpCache(tmp_path / "a", "fp"))
    blocks, reuse = cached_lemmas(lambda: nlp, chunks, NlpCache(tmp_path / "b", "fp"), block_chunks=7)
    assert reuse.computed == len(chunks)
    pd.testing.assert_frame_equal(blocks, whole)


def test_only_new_content_is_computed(tmp_path: Path, nlp: Language, chunks: pd.DataFrame) -> None:
    cache = NlpCache(tmp_path, "fp")
    cached_lemmas(lambda: nlp, chunks.head(50), cache)
    edited = chunks.copy()
    edited.loc[3, ["text", "content_hash"]] = ["A brand new answer about Kafka.", "edited-hash"]
    frame, reuse = cached_lemmas(lambda: nlp, edited, cache)
    assert (reuse.computed, reuse.reused) == (len(chunks) - 50 + 1, 49)  # the unseen ones and the edited one
    assert frame.loc[3, "text_lemmas"] == "brand new answer kafka"


def test_a_fingerprint_change_invalidates(tmp_path: Path, nlp: Language, chunks: pd.DataFrame) -> None:
    cached_lemmas(lambda: nlp, chunks, NlpCache(tmp_path, "model-v1"))
    _, reuse = cached_lemmas(lambda: nlp, chunks, NlpCache(tmp_path, "model-v2"))
    assert reuse.computed == len(chunks)
    assert model_fingerprint("en_core_web_md") != "model-v1"


def test_a_corrupt_cache_file_costs_time_not_correctness(
    tmp_path: Path, nlp: Language, chunks: pd.DataFrame
) -> None:
    expected, _ = cached_lemmas(lambda: nlp, chunks, NlpCache(tmp_path, "fp"))
    (tmp_path / CACHE_FILENAME).write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"{CACHE_FILENAME}{suffix}").unlink(missing_ok=True)
    warnings: list[str] = []
    cache = NlpCache(tmp_path, "fp", log=warnings.append)
    frame, reuse = cached_lemmas(lambda: nlp, chunks, cache)
    assert reuse.computed == len(chunks)
    pd.testing.assert_frame_equal(frame, expected)
    assert "is damaged" in warnings[0]
    assert list(tmp_path.glob(f"{CACHE_FILENAME}.corrupt-*"))


def test_a_damaged_vector_entry_is_a_miss(tmp_path: Path, nlp: Language, chunks: pd.DataFrame) -> None:
    cache = NlpCache(tmp_path, "fp")
    lemmas, _ = cached_lemmas(lambda: nlp, chunks, cache)
    expected, _ = cached_vectors(lambda: nlp, lemmas, cache)
    cache._db.execute("UPDATE vectors SET vector = x'0000' WHERE content_hash = ?", (lemmas.content_hash[0],))
    vectors, reuse = cached_vectors(lambda: nlp, lemmas, cache)
    assert (reuse.computed, reuse.reused) == (1, len(lemmas) - 1)
    assert np.array_equal(vectors.matrix, expected.matrix)


def test_unused_entries_are_pruned(tmp_path: Path, nlp: Language, chunks: pd.DataFrame) -> None:
    cache = NlpCache(tmp_path, "fp", ttl_days=1)
    cached_lemmas(lambda: nlp, chunks, cache)
    cache._db.execute("UPDATE terms SET last_used = last_used - 3 * 86400")
    cached_lemmas(lambda: nlp, chunks.head(10), cache)  # the current source uses ten of them
    assert cache.prune() == len(chunks) - 10
    assert len(cache.get_terms(list(chunks.content_hash))) == 10


# -- delta refresh on both backends -----------------------------------------------------------


def build(nlp: Language, documents: pd.DataFrame, cache: NlpCache) -> tuple[IndexContent, int]:
    chunks = make_chunks(documents, ChunkingConfig())
    lemmas, reuse = cached_lemmas(lambda: nlp, chunks, cache)
    vectors, _ = cached_vectors(lambda: nlp, lemmas, cache)
    return IndexContent.assemble(chunks, lemmas, vectors, model_fingerprint()), reuse.computed


@pytest.fixture(params=["embedded", "elasticsearch-fake"])
def backends(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[SearchBackend, SearchBackend]]:
    if request.param == "embedded":
        yield EmbeddedIndex(tmp_path / "delta"), EmbeddedIndex(tmp_path / "cold")
    else:
        fake = FakeElasticsearch()
        yield (
            ElasticsearchResource(url=fake.url, alias="delta").index(),
            ElasticsearchResource(url=fake.url, alias="cold").index(),
        )
        fake.close()


def test_a_delta_refresh_equals_a_cold_build(
    tmp_path: Path, nlp: Language, backends: tuple[SearchBackend, SearchBackend]
) -> None:
    delta_backend, cold_backend = backends
    old_docs, new_docs = load_file(DATA / "documents-2024-06.json"), load_file(DATA / "documents-2025.json")
    cache = NlpCache(tmp_path / "cache", "fp")
    old, _ = build(nlp, old_docs, cache)
    new, computed = build(nlp, new_docs, cache)

    old_rows, new_rows = content_rows(old)[0], content_rows(new)[0]
    old_hashes = dict(zip(old_rows.chunk_id, old_rows.content_hash, strict=True))
    new_hashes = dict(zip(new_rows.chunk_id, new_rows.content_hash, strict=True))
    changed_chunks = {c for c, h in new_hashes.items() if old_hashes.get(c) != h}
    removed_chunks = set(old_hashes) - set(new_hashes)
    entries_old, entries_new = set(old_docs.doc_id), set(new_docs.doc_id)
    both = old_docs.merge(new_docs, on="doc_id")
    answered = both.answer_x != both.answer_y
    moved = both.section_x != both.section_y
    # 14 new and 68 removed entries; 25 changed answers, and 8 more entries moved to another section
    # (their section is searched, so they change too).
    assert (len(entries_new - entries_old), int(answered.sum()), len(entries_old - entries_new)) == (
        14,
        25,
        68,
    )
    assert int((moved & ~answered).sum()) == 8
    assert computed == len(changed_chunks)  # only new and changed chunks were analysed

    delta_backend.publish(old)
    report = delta_backend.publish(new)
    assert (report.upserted, report.deleted) == (len(changed_chunks), len(removed_chunks))
    assert report.unchanged == len(new) - len(changed_chunks)
    cold_backend.publish(build(nlp, new_docs, NlpCache(tmp_path / "cold-cache", "fp"))[0])

    assert delta_backend.chunk_hashes() == cold_backend.chunk_hashes() == new_hashes
    assert delta_backend.stats().courses == cold_backend.stats().courses
    delta_search, cold_search = Retriever(delta_backend, nlp), Retriever(cold_backend, nlp)
    for question, course in (
        new_docs[["question", "course"]].sample(25, random_state=1).itertuples(index=False)
    ):
        assert delta_search.search(question, course=course) == cold_search.search(question, course=course)
