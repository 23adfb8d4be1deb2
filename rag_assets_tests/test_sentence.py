"""The semantic reranker's model is the pinned all-MiniLM-L6-v2, and it is refused otherwise."""

import hashlib

import numpy as np
import pytest

from rag_assets.nlp.sentence import (
    MODEL_FILE,
    SENTENCE_DIM,
    TOKENIZER_FILE,
    ModelIdentityError,
    sentence_encoder,
    weight_file,
)

# The example of the sentence-transformers documentation (sbert.net, "Usage" of Sentence
# Transformer models) with the similarities it prints for all-MiniLM-L6-v2.
SENTENCES = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
PUBLISHED = np.array([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])


def test_embeddings_reproduce_the_published_similarities():
    vectors = sentence_encoder().encode(SENTENCES)
    assert vectors.shape == (3, SENTENCE_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # int8 weights: within 0.003 of the fp32 figures here; 0.01 still tells another model apart
    # (paraphrase-MiniLM-L3-v2, say, gives 0.58 for the first pair).
    np.testing.assert_allclose(vectors @ vectors.T, PUBLISHED, atol=0.01)


def test_a_vector_does_not_depend_on_its_batch():
    encoder = sentence_encoder()
    together = encoder.encode([*SENTENCES, "a much longer text " * 40])
    alone = np.vstack([encoder.encode_query(text) for text in [*SENTENCES, "a much longer text " * 40]])
    np.testing.assert_allclose(together, alone, atol=1e-4)


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
