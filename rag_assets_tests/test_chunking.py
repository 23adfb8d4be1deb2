"""Chunk splitting: windows on word boundaries, overlapping, each keeping its question."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest

from rag_assets.ingest.chunking import CHUNK_COLUMNS, ChunkingConfig, chunk_content, make_chunks, split_answer
from rag_assets.ingest.sources import stable_hash


def words(n: int) -> str:
    return " ".join(f"word{i:04d}" for i in range(n))  # 8 characters per word, 9 with the space


def test_short_answer_is_one_window() -> None:
    assert split_answer("short answer", ChunkingConfig(max_chars=100, overlap_chars=10)) == ["short answer"]


def test_long_answer_splits_into_overlapping_windows_that_cover_it() -> None:
    answer = words(100)  # 899 characters
    windows = split_answer(answer, ChunkingConfig(max_chars=200, overlap_chars=50))
    assert len(windows) > 4
    assert all(len(w) <= 200 for w in windows)
    # Every word is in some window, in order; consecutive windows share their boundary words.
    assert windows[0].startswith("word0000") and windows[-1].endswith("word0099")
    for before, after in itertools.pairwise(windows):
        shared = set(before.split()) & set(after.split())
        assert 1 <= len(shared) <= 6
        assert after.split()[0] in before.split()
    assert sorted(set(" ".join(windows).split())) == answer.split()


def test_windows_keep_original_formatting() -> None:
    answer = "Run this:\n```\npip install x\n```\n" + words(60)
    windows = split_answer(answer, ChunkingConfig(max_chars=150, overlap_chars=20))
    assert windows[0].startswith("Run this:\n```\npip install x\n```\nword0000")


def test_a_word_longer_than_the_window_is_kept_whole() -> None:
    long_word = "x" * 300
    windows = split_answer(f"a {long_word} b", ChunkingConfig(max_chars=100, overlap_chars=10))
    assert long_word in windows


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="overlap_chars"):
        ChunkingConfig(max_chars=200, overlap_chars=150)
    with pytest.raises(ValueError, match="max_chars"):
        ChunkingConfig(max_chars=10, overlap_chars=0)


def test_chunks_keep_the_question_and_derive_ids_from_the_entry() -> None:
    documents = pd.DataFrame(
        [
            {
                "doc_id": "a",
                "course": "c1",
                "section": "S",
                "question": "Short?",
                "answer": "Yes.",
                "content_hash": "h1",
            },
            {
                "doc_id": "b",
                "course": "c1",
                "section": "S",
                "question": "Long?",
                "answer": words(80),
                "content_hash": "h2",
            },
        ]
    )
    chunks = make_chunks(documents, ChunkingConfig(max_chars=300, overlap_chars=30))
    assert list(chunks.columns) == CHUNK_COLUMNS
    assert chunks.loc[chunks.doc_id == "a", "chunk_id"].tolist() == ["a-0"]
    long = chunks[chunks.doc_id == "b"]
    assert long["chunk_id"].tolist() == [f"b-{i}" for i in range(len(long))]
    assert len(long) >= 3
    assert (long["question"] == "Long?").all()
    # the hash covers course, section, question and window, so a window moving sections changes it
    assert long["content_hash"].tolist() == [
        stable_hash(chunk_content("c1", "S", "Long?", text)) for text in long["text"]
    ]
    assert long["content_hash"].is_unique


def test_real_data_chunks(documents_2025: pd.DataFrame) -> None:
    chunks = make_chunks(documents_2025, ChunkingConfig())
    assert chunks["chunk_id"].is_unique
    assert set(chunks["doc_id"]) == set(documents_2025["doc_id"])
    assert chunks["text"].str.len().max() <= ChunkingConfig().max_chars
    assert len(chunks) > len(documents_2025)  # the longest answers are split
