"""Lemmas and vectors from the real en_core_web_md model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import spacy
from spacy.language import Language
from spacy.lookups import load_lookups

from rag_assets.ingest.chunking import ChunkingConfig, make_chunks
from rag_assets.nlp import analysis
from rag_assets.nlp.analysis import (
    LEMMA_TABLE,
    TOKENIZER_CACHE_SPANS,
    UNUSED_COMPONENTS,
    VECTOR_DIM,
    analyse_query,
    analyse_texts,
    embed_words,
    lemma_table,
    load_pipeline,
    model_fingerprint,
    model_location,
    token_terms,
)
from rag_assets.nlp.features import LEMMA_COLUMNS, embed_chunks, lemmatize_chunks


def test_pipeline_is_the_real_model_tokenizer_and_vectors_only(nlp: Language) -> None:
    assert nlp.meta["name"] == "core_web_md"
    assert nlp.vocab.vectors.shape == (20000, VECTOR_DIM)
    assert nlp.pipe_names == []  # no tok2vec, tagger or rule lemmatizer: they cost 85 % of a build
    assert {"tok2vec", "tagger", "attribute_ruler", "lemmatizer"} <= set(UNUSED_COMPONENTS)


def test_the_trimmed_vocabulary_changes_no_output(documents_2025: pd.DataFrame) -> None:
    """The full vocabulary (strings, lookups, every lexeme attribute) and spaCy's own tokenizer
    cache size analyse every chunk the same way as the trimmed one `load_pipeline` gives."""
    nlp = load_pipeline.__wrapped__()  # a fresh one, not the session's
    full = spacy.load(model_location(), exclude=list(UNUSED_COMPONENTS))
    assert len(full.vocab.strings) > 100 * len(nlp.vocab.strings)  # it really was left out
    assert len(full.vocab.lex_attr_getters) > 3 * len(nlp.vocab.lex_attr_getters)
    assert nlp.tokenizer.max_cache_size == TOKENIZER_CACHE_SPANS > 10 * full.tokenizer.max_cache_size
    analysis._CONTENT.clear()  # the token memo is per vocabulary, but start both afresh
    chunks = make_chunks(documents_2025, ChunkingConfig())
    lemmas = lemmatize_chunks(nlp, chunks)
    pd.testing.assert_frame_equal(lemmatize_chunks(full, chunks), lemmas)
    assert np.array_equal(embed_chunks(full, lemmas).matrix, embed_chunks(nlp, lemmas).matrix)


def test_lemmas_come_from_spacys_lookup_table(nlp: Language) -> None:
    table = lemma_table()
    assert {w: table.get(w, w) for w in ("ran", "children", "mice", "was", "containers")} == {
        "ran": "run",
        "children": "child",
        "mice": "mouse",
        "was": "be",
        "containers": "container",
    }
    # exactly what spaCy's own lemmatizer in lookup mode gives
    lookup = spacy.blank("en")
    lookup.add_pipe("lemmatizer", config={"mode": "lookup"}).initialize(
        lookups=load_lookups("en", [LEMMA_TABLE])
    )
    text = "The mice were running between the containers and I was installing Docker images"
    expected = [t.lemma_ for t in lookup(text)]
    assert [table.get(t.orth, t.text) for t in nlp.make_doc(text)] == expected


def test_terms_are_stemmed_lemmas_without_stop_words_punctuation_or_spaces(nlp: Language) -> None:
    [terms] = analyse_texts(nlp, ["The containers were running slowly,  and I restarted them!\n"])
    assert terms.lemmas == ("contain", "run", "slowli", "restart")
    assert terms.words == ("containers", "running", "slowly", "restarted")


def test_terms_keep_the_lemma_and_the_surface_form_where_they_differ(nlp: Language) -> None:
    [terms] = analyse_texts(nlp, ["The children ran quickly"])
    # "ran" -> lemma "run"; the stemmed surface form "ran" is kept beside it.
    assert terms.lemmas == ("child", "children", "run", "ran", "quick")
    assert token_terms("register", "registration") == ("regist", "registr")
    assert token_terms("instal", "installing") == ("instal",)


def test_tokens_made_of_several_words_are_stemmed_word_by_word() -> None:
    assert token_terms("week_7_projects/datasets.md", "week_7_projects/datasets.md") == (
        "week",
        "7",
        "project",
        "dataset",
        "md",
    )
    assert token_terms("SPARK_HOME", "spark_home") == ("spark", "home")
    assert token_terms("-", "-") == ()


def test_repeated_texts_are_analysed_once_and_returned_in_order(nlp: Language) -> None:
    logged: list[str] = []
    terms = analyse_texts(nlp, ["Docker images", "Kafka topics", "Docker images"], log=logged.append)
    assert [t.lemmas for t in terms] == [("docker", "imag"), ("kafka", "topic"), ("docker", "imag")]
    assert logged[-1].startswith("lemmatize: 2/2 (")


def test_vectors_are_unit_length_and_meaningful(nlp: Language) -> None:
    car = embed_words(nlp, ["car", "engine"])
    truck = embed_words(nlp, ["truck", "motor"])
    poem = embed_words(nlp, ["poetry", "verse"])
    assert car.dtype == np.float32 and car.shape == (VECTOR_DIM,)
    assert abs(float(np.linalg.norm(car)) - 1) < 1e-5
    assert float(car @ truck) > float(car @ poem) + 0.2
    assert not embed_words(nlp, []).any()
    assert not embed_words(nlp, ["qqqzzzxxy"]).any()


def test_query_analysis_matches_chunk_analysis(nlp: Language) -> None:
    query = analyse_query(nlp, "How do I install Docker on Windows?")
    [terms] = analyse_texts(nlp, ["How do I install Docker on Windows?"])
    assert query.lemmas == terms.lemmas
    assert np.allclose(query.vector, embed_words(nlp, terms.words))


def test_chunk_features(nlp: Language, documents_2025: pd.DataFrame) -> None:
    chunks = make_chunks(documents_2025.head(40), ChunkingConfig())
    lemmas = lemmatize_chunks(nlp, chunks)
    assert list(lemmas.columns) == LEMMA_COLUMNS
    assert lemmas["chunk_id"].tolist() == chunks["chunk_id"].tolist()
    assert (lemmas["question_lemmas"].str.len() > 0).all()
    vectors = embed_chunks(nlp, lemmas)
    assert vectors.chunk_ids == chunks["chunk_id"].tolist()
    norms = np.linalg.norm(vectors.matrix, axis=1)
    assert np.allclose(norms[norms > 0], 1, atol=1e-5)
    assert (norms > 0).mean() > 0.95


def test_fingerprint_is_stable_and_names_the_model() -> None:
    assert model_fingerprint() == model_fingerprint()
    assert len(model_fingerprint()) == 12
