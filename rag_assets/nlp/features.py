"""Per-chunk search features: lemma fields for lexical search and one vector for kNN."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from spacy.language import Language

from rag_assets.nlp.analysis import VECTOR_DIM, NlpSettings, TextAnalyser, embed_texts
from rag_assets.nlp.sentence import SENTENCE_DIM

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
    """Row i of `matrix` is the unit word vector of `chunk_ids[i]` (float32, VECTOR_DIM wide);
    row i of `sentences`, when the semantic reranker is on, its unit sentence vector."""

    chunk_ids: list[str]
    matrix: np.ndarray
    sentences: np.ndarray | None = None

    def __post_init__(self) -> None:
        expected = {"matrix": (self.matrix, VECTOR_DIM), "sentences": (self.sentences, SENTENCE_DIM)}
        for name, (array, width) in expected.items():
            if array is not None and array.shape != (len(self.chunk_ids), width):
                raise ValueError(f"{name} has shape {array.shape}, expected ({len(self.chunk_ids)}, {width})")

    def __len__(self) -> int:
        return len(self.chunk_ids)

    def split(self, rows: int) -> Iterator[ChunkVectors]:
        """Parts of `rows` rows (views of the matrices), as the stored value is written."""
        for start in range(0, max(len(self), 1), rows):
            end = start + rows
            sentences = None if self.sentences is None else self.sentences[start:end]
            yield ChunkVectors(self.chunk_ids[start:end], self.matrix[start:end], sentences)

    @classmethod
    def join(cls, parts: Iterable[ChunkVectors], rows: int) -> ChunkVectors:
        """Parts into one matrix filled as they come: never the parts and the whole at once."""
        chunk_ids: list[str] = []
        matrix = np.empty((rows, VECTOR_DIM), dtype=np.float32)
        sentences: np.ndarray | None = None
        for part in parts:
            done = len(chunk_ids)
            matrix[done : done + len(part)] = part.matrix
            if part.sentences is not None:
                if sentences is None:
                    sentences = np.empty((rows, SENTENCE_DIM), dtype=np.float32)
                sentences[done : done + len(part)] = part.sentences
            chunk_ids.extend(part.chunk_ids)
        return cls(chunk_ids, matrix, sentences)


def embed_chunks(nlp: Language, lemmas: pd.DataFrame) -> ChunkVectors:
    matrix = embed_texts(nlp, lemmas["vector_words"].tolist())
    return ChunkVectors(chunk_ids=list(lemmas["chunk_id"]), matrix=matrix)
