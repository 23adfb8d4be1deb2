"""Turning FAQ entries into searchable chunks.

Most answers fit in one chunk. A long answer is cut into overlapping windows on word boundaries,
each window keeping the question and section, so every chunk can be found by what it answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

from rag_assets.ingest.sources import stable_hash

CHUNK_COLUMNS = [
    "chunk_id",
    "doc_id",
    "chunk_index",
    "course",
    "section",
    "question",
    "text",
    "content_hash",
]
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class ChunkingConfig:
    max_chars: int = 2000
    overlap_chars: int = 300

    def __post_init__(self) -> None:
        if self.max_chars < 100:
            raise ValueError(f"max_chars must be at least 100, got {self.max_chars}")
        if not 0 <= self.overlap_chars < self.max_chars // 2:
            raise ValueError(
                f"overlap_chars must be in [0, max_chars/2), got {self.overlap_chars} "
                f"with max_chars={self.max_chars}"
            )


def split_answer(answer: str, config: ChunkingConfig) -> list[str]:
    """Windows of at most `max_chars` (a single longer word stays whole), overlapping by about
    `overlap_chars`, cut between words so the original formatting is kept inside each window."""
    if len(answer) <= config.max_chars:
        return [answer]
    spans = [m.span() for m in _WORD.finditer(answer)]
    windows: list[str] = []
    first = 0
    while first < len(spans):
        start = spans[first][0]
        last = first
        while last + 1 < len(spans) and spans[last + 1][1] - start <= config.max_chars:
            last += 1
        windows.append(answer[start : spans[last][1]])
        if last == len(spans) - 1:
            break
        # Step back over words that fit in the overlap, but always move forward.
        next_first = last + 1
        while next_first - 1 > first and spans[last][1] - spans[next_first - 1][0] <= config.overlap_chars:
            next_first -= 1
        first = next_first
    return windows


def chunk_id(doc_id: str, index: int) -> str:
    return f"{doc_id}-{index}"


def doc_id_of(chunk_id: str) -> str:
    """The entry a chunk belongs to: exact, since the index after the last '-' is a number."""
    return chunk_id.rpartition("-")[0]


def chunk_content(course: str, section: str, question: str, text: str) -> str:
    return "\n".join(part for part in (course, section, question, text) if part)


def make_chunks(documents: pd.DataFrame, config: ChunkingConfig) -> pd.DataFrame:
    rows = []
    for doc in documents.itertuples(index=False):
        for index, window in enumerate(split_answer(doc.answer, config)):
            content = chunk_content(doc.course, doc.section, doc.question, window)
            rows.append(
                {
                    "chunk_id": chunk_id(doc.doc_id, index),
                    "doc_id": doc.doc_id,
                    "chunk_index": index,
                    "course": doc.course,
                    "section": doc.section,
                    "question": doc.question,
                    "text": window,
                    "content_hash": stable_hash(content),
                }
            )
    return pd.DataFrame(rows, columns=CHUNK_COLUMNS)
