"""The embedded index on disk: ranking, filter, exact replacement and atomic publishing."""

from __future__ import annotations

import pickle
import signal
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from spacy.language import Language

from rag_assets.common import stored
from rag_assets.common.stored import InMemory, ValueStore
from rag_assets.index import embedded, vector_lists
from rag_assets.index.backend import (
    LEMMA_FIELD_COLUMNS,
    IndexContent,
    IndexNotFoundError,
    PublishError,
    PublishRefusedError,
)
from rag_assets.index.embedded import EmbeddedIndex
from rag_assets.ingest.chunking import CHUNK_COLUMNS
from rag_assets.nlp.analysis import analyse_query
from rag_assets.nlp.features import ChunkVectors
from rag_assets.quality import RetrievalGate, smoke_probes

from .conftest import content_of, content_rows, index_content, subset

JOIN_QUESTION = "Course - Can I still join the course after the start date?"
DE = "data-engineering-zoomcamp"


@pytest.fixture
def index(tmp_path: Path, content_2025: IndexContent) -> EmbeddedIndex:
    index = EmbeddedIndex(tmp_path)
    index.publish(content_2025)
    return index


def lexical(index: EmbeddedIndex, nlp: Language, query: str, course: str | None = None) -> list[str]:
    return [chunk_id for chunk_id, _ in index.lexical_search(analyse_query(nlp, query).lemmas, course, 5)]


def question_of(index: EmbeddedIndex, chunk_id: str) -> str:
    return index.fetch([chunk_id])[chunk_id].question


def test_bm25_ranks_the_answering_entry_first(index: EmbeddedIndex, nlp: Language) -> None:
    top = lexical(index, nlp, "Can I still join the course after it has started?", DE)
    assert question_of(index, top[0]) == JOIN_QUESTION


def test_vector_search_ranks_by_cosine(index: EmbeddedIndex, content_2025: IndexContent) -> None:
    row = 17
    rows, vectors = content_rows(content_2025)
    top = index.vector_search(vectors[row], None, 3)
    assert top[0] == rows.chunk_id[row]
    assert len(top) == 3


def test_course_filter_applies_to_both_rankings(index: EmbeddedIndex, nlp: Language) -> None:
    query = analyse_query(nlp, "How do I install docker?")
    for course in (DE, "mlops-zoomcamp"):
        ids = [c for c, _ in index.lexical_search(query.lemmas, course, 20)]
        ids += index.vector_search(query.vector, course, 20)
        assert len(ids) == 40
        assert {chunk.course for chunk in index.fetch(ids).values()} == {course}


def test_stats_count_entries_chunks_and_courses(index: EmbeddedIndex, content_2025: IndexContent) -> None:
    stats = index.stats()
    assert stats.backend == "embedded"
    assert stats.entries == 948
    assert stats.chunks == len(content_2025)
    assert stats.courses == {DE: 435, "machine-learning-zoomcamp": 375, "mlops-zoomcamp": 138}
    assert stats.published_at is not None


def test_republishing_writes_only_what_changed_and_deletes_what_left(
    index: EmbeddedIndex, content_2025: IndexContent, nlp: Language
) -> None:
    rows, _ = content_rows(content_2025)
    join_doc = rows.loc[rows.question == JOIN_QUESTION, "doc_id"].iloc[0]
    smaller = subset(content_2025, (rows.doc_id != join_doc).to_numpy())
    report = index.publish(smaller)
    assert (report.upserted, report.deleted, report.unchanged) == (0, 1, len(smaller))
    assert index.stats().entries == 947
    top = lexical(index, nlp, "Can I still join the course after it has started?", DE)
    assert all(question_of(index, c) != JOIN_QUESTION for c in top)

    again = index.publish(content_2025)
    assert (again.upserted, again.deleted) == (1, 0)
    assert index.stats().entries == 948


def test_changed_rows_are_rewritten(index: EmbeddedIndex, content_2025: IndexContent, nlp: Language) -> None:
    rows, vectors = content_rows(content_2025)
    rows.loc[0, ["text_lemmas", "row_hash"]] = ["zyzzyva unicorn", "changed"]
    report = index.publish(content_of(rows, vectors, content_2025.fingerprint))
    assert (report.upserted, report.deleted) == (1, 0)
    assert [c for c, _ in index.lexical_search(["zyzzyva"], None, 5)] == [rows.chunk_id[0]]


def test_a_publish_that_fails_halfway_leaves_the_old_index(
    index: EmbeddedIndex, content_2025: IndexContent, nlp: Language, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = (index.stats().entries, index.chunk_hashes(), lexical(index, nlp, "join after start", DE))
    rows, vectors = content_rows(content_2025)
    rows["row_hash"] = "new-analysis"  # every row must be rewritten
    calls = {"n": 0}
    write_list = EmbeddedIndex._write_vector_list

    def failing_list(*args: object) -> None:  # rows and postings are written by then
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("disk on fire")
        write_list(*args)

    monkeypatch.setattr(EmbeddedIndex, "_write_vector_list", staticmethod(failing_list))
    with pytest.raises(RuntimeError, match="disk on fire"):
        index.publish(subset(content_of(rows, vectors, content_2025.fingerprint), np.arange(len(rows)) < 500))
    after = (index.stats().entries, index.chunk_hashes(), lexical(index, nlp, "join after start", DE))
    assert after == before


def test_a_killed_publish_leaves_the_old_index(
    tmp_path: Path, index: EmbeddedIndex, content_2025: IndexContent, nlp: Language
) -> None:
    before = (asdict(index.stats()), index.chunk_hashes())
    rows, vectors = content_rows(content_2025)
    rows["row_hash"] = "new-analysis"
    payload = tmp_path / "content.pickle"
    payload.write_bytes(pickle.dumps(content_of(rows, vectors, content_2025.fingerprint)))
    script = textwrap.dedent(
        f"""
        import os, pickle, signal
        from rag_assets.index.embedded import EmbeddedIndex
        def killing_list(*args):  # rows and postings are written by then
            os.kill(os.getpid(), signal.SIGKILL)
        EmbeddedIndex._write_vector_list = staticmethod(killing_list)
        EmbeddedIndex({str(tmp_path)!r}).publish(pickle.loads(open({str(payload)!r}, "rb").read()))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    fresh = EmbeddedIndex(tmp_path)
    assert (asdict(fresh.stats()), fresh.chunk_hashes()) == before
    # The index is still writable after the crash.
    assert fresh.publish(content_2025).upserted == 0


def test_no_index_yet(tmp_path: Path) -> None:
    with pytest.raises(IndexNotFoundError, match="no index at"):
        EmbeddedIndex(tmp_path).stats()


def test_a_failed_first_publish_leaves_no_index(tmp_path: Path, content_2025: IndexContent) -> None:
    rows, _ = content_rows(content_2025)
    shifted = rows.assign(chunk_id=np.roll(rows.chunk_id.to_numpy(), 1))  # lemmas of other chunks
    broken = replace(content_2025, lemmas=InMemory(shifted[["chunk_id", *LEMMA_FIELD_COLUMNS]]))
    with pytest.raises(PublishError, match=r"disagree on the chunk ids \(rows 0-\d+\)"):
        EmbeddedIndex(tmp_path).publish(broken)
    with pytest.raises(IndexNotFoundError):
        EmbeddedIndex(tmp_path).stats()


def test_small_corpus_from_scratch(tmp_path: Path, nlp: Language) -> None:
    documents = pd.DataFrame(
        [
            {
                "doc_id": "d1",
                "course": "a",
                "section": "Setup",
                "question": "How to install Kafka?",
                "answer": "Download the Kafka binaries and start the broker.",
                "content_hash": "1",
            },
            {
                "doc_id": "d2",
                "course": "b",
                "section": "Setup",
                "question": "How to install Spark?",
                "answer": "Use pip install pyspark.",
                "content_hash": "2",
            },
        ]
    )
    index = EmbeddedIndex(tmp_path)
    index.publish(index_content(nlp, documents))
    assert lexical(index, nlp, "install kafka") == ["d1-0", "d2-0"]
    assert lexical(index, nlp, "install kafka", course="b") == ["d2-0"]


def test_a_refresh_that_changes_nothing_moves_confirmed_at_only(
    tmp_path: Path, content_2025: IndexContent, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = iter(["2026-11-01T00:00:00+00:00", "2026-11-02T00:00:00+00:00"])
    monkeypatch.setattr(embedded, "_now", lambda: next(clock))
    EmbeddedIndex(tmp_path).publish(content_2025)
    EmbeddedIndex(tmp_path).publish(content_2025)
    stats = EmbeddedIndex(tmp_path).stats()
    assert (stats.published_at, stats.confirmed_at) == (
        "2026-11-01T00:00:00+00:00",
        "2026-11-02T00:00:00+00:00",
    )


def scrambled(content: IndexContent) -> IndexContent:
    """The same entries with every chunk's lemma fields taken from another chunk: a broken analysis."""
    rows, vectors = content_rows(content)
    for column in LEMMA_FIELD_COLUMNS:
        rows[column] = np.roll(rows[column].to_numpy(), 7)
    return content_of(rows.assign(row_hash=rows["row_hash"] + "x"), vectors, content.fingerprint)


def test_the_publish_gate_refuses_a_version_that_answers_worse(
    tmp_path: Path, nlp: Language, content_2025: IndexContent
) -> None:
    chunks, _ = content_rows(content_2025)
    gate = RetrievalGate(nlp, smoke_probes([chunks], 100), [], max_drop=0.02)
    first = EmbeddedIndex(tmp_path).publish(content_2025, gate)
    assert first.gate is not None and first.gate.passed
    assert first.gate.metadata["gate_smoke_hit_rate_new"] >= 0.9
    assert "gate_smoke_hit_rate_served" not in first.gate.metadata  # nothing was served before

    with pytest.raises(PublishRefusedError) as refused:
        EmbeddedIndex(tmp_path).publish(scrambled(content_2025), gate)
    verdict = refused.value.verdict
    served, new = verdict.metadata["gate_smoke_hit_rate_served"], verdict.metadata["gate_smoke_hit_rate_new"]
    assert new < served - 0.02
    assert f"smoke hit rate would fall from {served:.4f} (served) to {new:.4f} (new)" in str(refused.value)
    assert "the served index is unchanged" in str(refused.value)
    assert EmbeddedIndex(tmp_path).chunk_hashes() == dict(
        zip(chunks.chunk_id, chunks.content_hash, strict=True)
    )

    again = EmbeddedIndex(tmp_path).publish(content_2025, gate)  # the same content: nothing to judge
    assert again.upserted == 0 and again.gate is None


def stored_content(tmp_path: Path, content: IndexContent, name: str) -> IndexContent:
    """`content` as es_index reads it: from stored values, part by part."""
    rows, vectors = content_rows(content)
    store = ValueStore(tmp_path / "values")
    chunks = store.save("chunks", name, rows[CHUNK_COLUMNS], {})
    lemmas = store.save("lemmas", name, rows[["chunk_id", *LEMMA_FIELD_COLUMNS]], {})
    embeddings = store.save("embeddings", name, ChunkVectors(list(rows.chunk_id), vectors), {})
    read = IndexContent.read(chunks, lemmas, embeddings, content.fingerprint)
    return replace(read, row_hashes=list(rows.row_hash))


def index_files(index: EmbeddedIndex) -> dict[str, list[tuple]]:
    db = sqlite3.connect(index.path)
    return {
        table: db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
        for table in ("chunks", "postings", "vector_lists", "row_arrays")
    }


def test_a_publish_read_in_parts_writes_what_a_publish_of_the_whole_does(
    tmp_path: Path, content_2025: IndexContent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks of 100 rows and vector lists written 150 vectors at a time, for a build and a delta."""
    monkeypatch.setattr(stored, "PART_ROWS", 100)
    monkeypatch.setattr(embedded, "_LIST_GROUP_ROWS", 150)
    monkeypatch.setattr(vector_lists, "LIST_ROWS", 40)
    rows, vectors = content_rows(content_2025)
    changed = rows.copy()
    changed.loc[[5, 250, 733], ["text_lemmas", "row_hash"]] = ["zyzzyva docker", "changed"]
    kept = np.arange(len(rows)) % 97 != 3
    newer = subset(content_of(changed, vectors, content_2025.fingerprint), kept)
    whole, in_parts = EmbeddedIndex(tmp_path / "whole"), EmbeddedIndex(tmp_path / "parts")
    monkeypatch.setattr(stored, "PART_ROWS", 10_000)  # in memory: one block
    whole.publish(content_2025)
    first = whole.publish(newer)
    monkeypatch.setattr(stored, "PART_ROWS", 100)
    in_parts.publish(stored_content(tmp_path, content_2025, "old"))
    second = in_parts.publish(stored_content(tmp_path, newer, "new"))

    assert (second.upserted, second.deleted) == (first.upserted, first.deleted) == (3, (~kept).sum())
    assert index_files(in_parts) == index_files(whole)
    assert len(index_files(whole)["vector_lists"]) > 10


def test_a_disagreement_found_in_a_later_part_leaves_the_served_index(
    tmp_path: Path, index: EmbeddedIndex, content_2025: IndexContent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stored, "PART_ROWS", 100)
    before = index_files(index)
    rows, vectors = content_rows(content_2025)
    rows["row_hash"] = "new-analysis"
    content = stored_content(tmp_path, content_of(rows, vectors, content_2025.fingerprint), "new")
    lemmas = rows[["chunk_id", *LEMMA_FIELD_COLUMNS]].copy()
    lemmas.loc[650, "chunk_id"] = "somebody-else"
    broken = replace(content, lemmas=ValueStore(tmp_path / "values").save("lemmas", "broken", lemmas, {}))
    with pytest.raises(PublishError, match=r"disagree on the chunk ids \(rows 600-699\)"):
        index.publish(broken)
    fewer = lemmas.assign(chunk_id=rows.chunk_id).head(900)  # nine parts, the chunks ten
    broken = replace(content, lemmas=ValueStore(tmp_path / "values").save("lemmas", "fewer", fewer, {}))
    with pytest.raises(PublishError, match="they hold different numbers of parts"):
        index.publish(broken)
    assert index_files(index) == before
