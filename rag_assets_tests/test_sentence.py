"""The semantic reranker's model is the pinned all-MiniLM-L6-v2, and it is refused otherwise."""

import hashlib
from collections import Counter

import numpy as np
import onnx
import onnxruntime
import pytest

from rag_assets.nlp.sentence import (
    MODEL_FILE,
    SENTENCE_DIM,
    TOKENIZER_FILE,
    ModelIdentityError,
    int8_matmuls,
    mean_unit,
    sentence_encoder,
    weight_file,
)

# The example of the sentence-transformers documentation (sbert.net, "Usage" of Sentence
# Transformer models) with the similarities it prints for all-MiniLM-L6-v2.
SENTENCES = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
FAQ_ANSWER = (
    "Can I still join the course after the start date?\nYes, even if you don't register, you're still "
    "eligible to submit the homeworks. Be aware that there will be deadlines for the final projects."
)
PUBLISHED = np.array([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])


def test_embeddings_reproduce_the_published_similarities():
    vectors = sentence_encoder().encode(SENTENCES)
    assert vectors.shape == (3, SENTENCE_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # int8 weights and activations: 0.6687, 0.1161, 0.1454 here, within 0.012 of the fp32
    # figures; 0.015 still tells another model apart (paraphrase-MiniLM-L3-v2, say, gives 0.58
    # for the first pair).
    np.testing.assert_allclose(vectors @ vectors.T, PUBLISHED, atol=0.015)


def test_int8_matmuls_keep_the_vectors_of_the_float_graph():
    """The rewrite changes how the MatMuls compute, not the model: every one of them reads the
    file's own int8 matrix, and the vectors stay where the float graph puts them."""
    encoder = sentence_encoder()
    rewritten = onnx.load_from_string(int8_matmuls(weight_file(*MODEL_FILE)))
    operators = Counter(node.op_type for node in rewritten.graph.node)
    # 6 layers: 6 weight matrices each (int8 now), and 2 products of activations (float still)
    assert (operators["DynamicQuantizeMatMul"], operators["MatMul"]) == (36, 12), operators
    float_graph = onnxruntime.InferenceSession(weight_file(*MODEL_FILE), providers=["CPUExecutionProvider"])
    texts = [*SENTENCES, FAQ_ANSWER]
    exact = np.vstack([mean_unit(float_graph.run(None, encoder.inputs_of(text))[0]) for text in texts])
    cosines = (encoder.encode(texts) * exact).sum(axis=1)
    assert cosines.min() > 0.99, cosines


def test_a_query_made_later_is_the_same_vector():
    encoder = sentence_encoder()
    later = encoder.encode_later(FAQ_ANSWER).result(timeout=30)
    np.testing.assert_allclose(later, encoder.encode_query(FAQ_ANSWER), atol=1e-6)


@pytest.mark.parametrize("pinned", [MODEL_FILE, TOKENIZER_FILE])
def test_installed_files_have_the_pinned_hashes(pinned):
    package, inside, sha256 = pinned
    assert hashlib.sha256(weight_file(package, inside, sha256).read_bytes()).hexdigest() == sha256


def test_another_file_is_refused_naming_it():
    package, inside, _ = MODEL_FILE
    with pytest.raises(ModelIdentityError, match=r"model\.onnx has sha256 8199be6f.*expected 0{64}"):
        weight_file(package, inside, "0" * 64)


def test_a_missing_package_says_how_to_install_it():
    with pytest.raises(ModelIdentityError, match=r"'no-such-package'.*make setup"):
        weight_file("no-such-package", "model.onnx", "0" * 64)
