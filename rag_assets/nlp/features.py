"""Per-chunk search features: lemma fields for lexical search and one vector for kNN."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from spacy.language import Language

from rag_assets.nlp.analysis import VECTOR_DIM, NlpSettings, TextAnalyser, embed_texts

# The chunk fields searched lexically, each kept as its own lemma field.
LEMMA_FIELDS = ("question", "text", "section")
LEMMA_COLUMNS = ["chunk_id", "content_hash", *(f"{f}_lemmas" for f in LEMMA_FIELDS), "vector_words"]


def lemmatize_chunks(
    nlp: Language,
    chunks: pd.DataFrame,
    settings: NlpSettings = NlpSettings(),
    log: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    with TextAnalyser(nlp, settings, log) as analyser:
        return chunk_terms(analyser, chunks)


def chunk_terms(analyser: TextAnalyser, chunks: pd.DataFrame) -> pd.DataFrame:
    """Space-joined lemmas per field, plus the question's and answer's content words for the vector."""
    n = len(chunks)
    texts = [str(v) for field in LEMMA_FIELDS for v in chunks[field]]
    terms = analyser.analyse(texts)
    per_field = {field: terms[i * n : (i + 1) * n] for i, field in enumerate(LEMMA_FIELDS)}
    frame = pd.DataFrame(
        {
            "chunk_id": chunks["chunk_id"].to_numpy(),
            "content_hash": chunks["content_hash"].to_numpy(),
            **{f"{f}_lemmas": [" ".join(t.lemmas) for t in per_field[f]] for f in LEMMA_FIELDS},
            "vector_words": [
                " ".join(q.words + a.words)
                for q, a in zip(per_field["question"], per_field["text"], strict=True)
            ],
        }
    )
    return frame[LEMMA_COLUMNS]


def token_counts(terms: Sequence[str]) -> np.ndarray:
    """Terms in each space-joined term string, without splitting them (a million rows hold tens
    of millions of terms)."""
    return np.fromiter((t.count(" ") + 1 if t else 0 for t in terms), dtype=np.int64, count=len(terms))


@dataclass
class ChunkVectors:
    """Row i of `matrix` is the unit vector of `chunk_ids[i]` (float32, VECTOR_DIM wide)."""

    chunk_ids: list[str]
    matrix: np.ndarray

    def __post_init__(self) -> None:
        if self.matrix.shape != (len(self.chunk_ids), VECTOR_DIM):
            raise ValueError(
                f"vector matrix has shape {self.matrix.shape}, expected ({len(self.chunk_ids)}, {VECTOR_DIM})"
            )

    def __len__(self) -> int:
        return len(self.chunk_ids)

    def split(self, rows: int) -> Iterator[ChunkVectors]:
        """Parts of `rows` rows (views of the matrix), as the stored value is written."""
        for start in range(0, max(len(self), 1), rows):
            yield ChunkVectors(self.chunk_ids[start : start + rows], self.matrix[start : start + rows])

    @classmethod
    def join(cls, parts: Iterable[ChunkVectors], rows: int) -> ChunkVectors:
        """Parts into one matrix filled as they come: never the parts and the whole at once."""
        chunk_ids: list[str] = []
        matrix = np.empty((rows, VECTOR_DIM), dtype=np.float32)
        for part in parts:
            matrix[len(chunk_ids) : len(chunk_ids) + len(part)] = part.matrix
            chunk_ids.extend(part.chunk_ids)
        return cls(chunk_ids, matrix)


def embed_chunks(nlp: Language, lemmas: pd.DataFrame) -> ChunkVectors:
    matrix = embed_texts(nlp, lemmas["vector_words"].tolist())
    return ChunkVectors(chunk_ids=list(lemmas["chunk_id"]), matrix=matrix)
