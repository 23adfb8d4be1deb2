"""The embedded index's own BM25F and vector lists: scores exactly as SQLite FTS5's bm25(), lists
that hold every row once through incremental publishes, and a list search close to the exact one."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from spacy.language import Language

from rag_assets.index import vector_lists
from rag_assets.index.backend import LEMMA_FIELD_COLUMNS, IndexContent
from rag_assets.index.embedded import EmbeddedIndex
from rag_assets.index.lexical import index_terms, merge_postings, searchable
from rag_assets.index.ranking import FIELD_WEIGHTS
from rag_assets.nlp.analysis import analyse_query

from .conftest import content_of, content_rows, subset

DE = "data-engineering-zoomcamp"


def fts5_scores(content: IndexContent, terms: list[str], course: str | None) -> dict[str, float]:
    """The reference: chunk id -> FTS5's weighted bm25 score (higher is better) of every match."""
    rows, _ = content_rows(content)
    db = sqlite3.connect(":memory:")
    columns = ", ".join(LEMMA_FIELD_COLUMNS)
    db.execute(f"CREATE VIRTUAL TABLE f USING fts5 ({columns}, tokenize = 'unicode61 remove_diacritics 0')")
    db.executemany(
        f"INSERT INTO f (rowid, {columns}) VALUES (?, ?, ?, ?)",
        [(i, *row) for i, row in enumerate(rows[LEMMA_FIELD_COLUMNS].itertuples(index=False))],
    )
    weights = ", ".join(str(FIELD_WEIGHTS[c.removesuffix("_lemmas")]) for c in LEMMA_FIELD_COLUMNS)
    query = " OR ".join(f'"{t}"' for t in terms)
    scores = {
        rows.chunk_id[rowid]: -score
        for rowid, score in db.execute(f"SELECT rowid, bm25(f, {weights}) FROM f WHERE f MATCH ?", (query,))
    }
    if course is not None:
        wanted = set(rows.chunk_id[rows.course == course])
        scores = {c: s for c, s in scores.items() if c in wanted}
    return scores


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, content_2025: IndexContent) -> EmbeddedIndex:
    index = EmbeddedIndex(tmp_path_factory.mktemp("index"))
    index.publish(content_2025)
    return index


@pytest.mark.parametrize("course", [None, DE])
def test_bm25_ranks_exactly_as_fts5(
    built: EmbeddedIndex, content_2025: IndexContent, nlp: Language, course: str | None
) -> None:
    questions = list(content_rows(content_2025)[0].question.drop_duplicates()[::4])[:150]
    compared = 0
    for question in questions:
        terms = searchable(analyse_query(nlp, question).lemmas)
        if not terms:
            continue
        expected = fts5_scores(content_2025, terms, course)
        ranked = built.lexical_search(terms, course, 20)
        best = sorted(expected.values(), reverse=True)[:20]
        # Same scores in the same order: any difference is a different ranking (ties may swap).
        assert [expected[c] for c, _ in ranked] == pytest.approx(best, rel=1e-12), question
        assert [score for _, score in ranked] == pytest.approx(best, rel=1e-12), question
        compared += 1
    assert compared > 100


def test_an_incremental_publish_scores_as_a_build_from_scratch(
    tmp_path: Path, content_2025: IndexContent, nlp: Language
) -> None:
    rows, vectors = content_rows(content_2025)
    older = subset(content_2025, np.arange(len(rows)) < 900)
    changed = rows.copy()
    changed.loc[5, ["text_lemmas", "row_hash"]] = ["zyzzyva docker", "changed"]
    newer = subset(content_of(changed, vectors, content_2025.fingerprint), np.arange(len(rows)) >= 40)
    index = EmbeddedIndex(tmp_path / "incremental")
    index.publish(older)
    report = index.publish(newer)
    assert (report.upserted, report.deleted) == (len(newer) - 860, 40)
    for question in ["How do I install docker?", "Can I still join the course?", "zyzzyva"]:
        terms = searchable(analyse_query(nlp, question).lemmas)
        expected = fts5_scores(newer, terms, None)
        assert [score for _, score in index.lexical_search(terms, None, 20)] == pytest.approx(
            sorted(expected.values(), reverse=True)[:20], rel=1e-12
        )


def test_index_terms_weights_fields_and_counts_tokens() -> None:
    postings = dict(
        index_terms(np.array([7, 9]), [(2.0, ["docker run", "spark"]), (1.0, ["docker docker", ""])]).items()
    )
    assert postings["docker"].rowids.tolist() == [7]
    assert postings["docker"].weights.tolist() == [4.0]  # 2 x 1 in the question, 1 x 2 in the text
    assert postings["spark"].rowids.tolist() == [9] and postings["spark"].weights.tolist() == [2.0]


def test_searchable_terms_are_distinct_and_hold_a_letter_or_digit() -> None:
    assert searchable(["docker", 'say"hi', "+", "docker", "c++", "--"]) == ["docker", 'say"hi', "c++"]


@pytest.fixture
def small_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lists of about 40 rows and 3 probes, so 1k chunks are searched approximately."""
    monkeypatch.setattr(vector_lists, "LIST_ROWS", 40)
    monkeypatch.setattr(vector_lists, "PROBES", 3)


def stored_lists(index: EmbeddedIndex) -> list[int]:
    db = sqlite3.connect(index.path)
    ids = [
        int(r)
        for (blob,) in db.execute("SELECT rowids FROM vector_lists")
        for r in np.frombuffer(blob, np.int32)
    ]
    chunk_rows = sorted(r for (r,) in db.execute("SELECT id FROM chunks"))
    assert sorted(ids) == chunk_rows  # every row in exactly one list
    return ids


def exact_top(content: IndexContent, vector: np.ndarray, k: int) -> list[str]:
    rows, vectors = content_rows(content)
    return list(rows.chunk_id[np.argsort(-(vectors @ vector), kind="stable")[:k]])


@pytest.mark.usefixtures("small_lists")
def test_vector_lists_find_the_nearest_chunks(
    tmp_path: Path, content_2025: IndexContent, nlp: Language
) -> None:
    index = EmbeddedIndex(tmp_path)
    index.publish(content_2025)
    stored_lists(index)
    rows, vectors = content_rows(content_2025)
    for position in range(0, len(rows), 97):  # a chunk's own vector finds the chunk first
        assert index.vector_search(vectors[position], None, 5)[0] == rows.chunk_id[position]
    questions = list(rows.question.drop_duplicates()[::9])[:80]
    recall = []
    for question in questions:
        vector = analyse_query(nlp, question).vector
        found = index.vector_search(vector, None, 20)
        recall.append(len(set(found) & set(exact_top(content_2025, vector, 20))) / 20)
        within = index.vector_search(vector, DE, 20)
        assert len(within) == 20 and set(rows.course[rows.chunk_id.isin(within)]) == {DE}
    assert np.mean(recall) >= 0.6  # 3 of 24 lists read; the exact search is 1.0


@pytest.mark.usefixtures("small_lists")
def test_incremental_publishes_keep_every_row_in_one_list(tmp_path: Path, content_2025: IndexContent) -> None:
    rows, vectors = content_rows(content_2025)
    index = EmbeddedIndex(tmp_path)
    index.publish(subset(content_2025, np.arange(len(rows)) < 100))
    assert len(set(stored_lists(index))) == 100
    index.publish(content_2025)  # 10x the rows: the lists are cut afresh for the new size
    assert sqlite3.connect(index.path).execute("SELECT COUNT(*) FROM vector_lists").fetchone()[0] > 10
    changed = rows.copy()
    changed.loc[[3, 500], "row_hash"] = "changed"
    shrunk = subset(content_of(changed, vectors, content_2025.fingerprint), np.arange(len(rows)) >= 10)
    report = index.publish(shrunk)
    assert (report.upserted, report.deleted) == (1, 10)
    stored_lists(index)
    position = 500 - 10
    assert index.vector_search(vectors[10 + position], None, 1) == [shrunk.chunk_ids[position]]


def test_postings_merged_from_blocks_equal_the_postings_of_all_rows(content_2025: IndexContent) -> None:
    rows, _ = content_rows(content_2025)
    fields = [(1.0 + i, list(rows[column])) for i, column in enumerate(LEMMA_FIELD_COLUMNS)]
    rowids = np.arange(1, len(rows) + 1)
    whole = list(index_terms(rowids, fields).items())
    blocks = [
        index_terms(rowids[start : start + 150], [(w, texts[start : start + 150]) for w, texts in fields])
        for start in range(0, len(rows), 150)
    ]
    merged = list(merge_postings(blocks))
    assert [term for term, _ in merged] == [term for term, _ in whole] and len(whole) > 1000
    for (_, found), (_, expected) in zip(merged, whole, strict=True):
        assert found.rowids.tolist() == expected.rowids.tolist()
        assert found.weights.tolist() == expected.weights.tolist()
