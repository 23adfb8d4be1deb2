"""A content-addressed cache of per-chunk NLP results, so a refresh only analyses what changed.

Keys are (fingerprint, content_hash): the fingerprint covers everything that changes the output
(model, its version, spaCy, the term and vector rules), so changing any of them misses the cache
instead of reusing stale results. Entries record when they were last used and are pruned once
unused for `ttl_days`. The cache only ever costs time: an unreadable file is set aside and
rebuilt, and a damaged entry is a miss.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from spacy.language import Language

from rag_assets.common import sqlite
from rag_assets.common.progress import Progress
from rag_assets.common.sqlite import immediate_transaction
from rag_assets.ingest.sources import stable_hash
from rag_assets.nlp.analysis import VECTOR_DIM, NlpSettings, TextAnalyser
from rag_assets.nlp.features import LEMMA_COLUMNS, ChunkVectors, chunk_terms, embed_chunks
from rag_assets.nlp.sentence import SENTENCE_DIM, SENTENCE_MODEL, SentenceEncoder, chunk_sentences

CACHE_FILENAME = "nlp-cache.sqlite"
TERM_FIELDS = tuple(LEMMA_COLUMNS[2:])  # everything `lemmas` holds besides the two ids
# Rowid tables with a unique key: rows of hundreds of bytes (terms, 1.2 kB vectors) are what
# WITHOUT ROWID tables handle badly; measured 8 s instead of under 1 s to store 100k vectors.
SCHEMA_VERSION = 2
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS terms (
    id INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL, content_hash TEXT NOT NULL,
    {", ".join(f"{f} TEXT NOT NULL" for f in TERM_FIELDS)},
    last_used REAL NOT NULL, UNIQUE (fingerprint, content_hash)
);
CREATE TABLE IF NOT EXISTS vectors (
    id INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL, content_hash TEXT NOT NULL,
    vector BLOB NOT NULL, last_used REAL NOT NULL, UNIQUE (fingerprint, content_hash)
);
PRAGMA user_version = {SCHEMA_VERSION};
"""
_BATCH = 500  # keys per IN (...) query, below SQLite's variable limit


class NlpCache:
    def __init__(
        self,
        directory: Path | str,
        fingerprint: str,
        ttl_days: float = 7.0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.path = Path(directory) / CACHE_FILENAME
        self.fingerprint = fingerprint
        self.ttl_days = ttl_days
        self._log = log or logging.getLogger(__name__).warning
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            return self._start_afresh(exc)

    def _start_afresh(self, exc: sqlite3.DatabaseError) -> sqlite3.Connection:
        aside = sqlite.set_aside(self.path)
        self._log(f"NLP cache {self.path} is damaged ({exc}); moved to {aside.name}, starting afresh")
        return self._connect()

    def _failed(self, action: str, exc: sqlite3.DatabaseError) -> None:
        """A damaged file is set aside once, so later runs do not pay for it again."""
        if sqlite.is_damaged(exc):
            self._db.close()
            self._db = self._start_afresh(exc)
        else:
            self._log(f"NLP cache {self.path} failed {action} ({exc})")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode = WAL")
            # Reading the schema version also reads the file: one that is no database fails here.
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version != SCHEMA_VERSION:  # a cache of an older layout: start it afresh
                db.executescript("DROP TABLE IF EXISTS terms; DROP TABLE IF EXISTS vectors;")
            db.executescript(_SCHEMA)
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    # -- lookups ------------------------------------------------------------------------------

    def _get(self, table: str, columns: str, hashes: Sequence[str]) -> dict[str, tuple]:
        found: dict[str, tuple] = {}
        unique = list(dict.fromkeys(hashes))
        try:
            for start in range(0, len(unique), _BATCH):
                batch = unique[start : start + _BATCH]
                rows = self._db.execute(
                    f"SELECT content_hash, {columns} FROM {table} WHERE fingerprint = ? "
                    f"AND content_hash IN ({', '.join('?' * len(batch))})",
                    [self.fingerprint, *batch],
                )
                found.update((row[0], row[1:]) for row in rows)
        except sqlite3.DatabaseError as exc:
            self._failed("a read; recomputing", exc)
            return {}
        return found

    def get_terms(self, hashes: Sequence[str]) -> dict[str, tuple[str, ...]]:
        return self._get("terms", ", ".join(TERM_FIELDS), hashes)

    def get_vectors(self, hashes: Sequence[str], width: int = VECTOR_DIM) -> dict[str, np.ndarray]:
        found = self._get("vectors", "vector", hashes)
        return {
            h: np.frombuffer(blob, dtype=np.float32)
            for h, (blob,) in found.items()
            if isinstance(blob, bytes) and len(blob) == width * 4  # anything else is a miss
        }

    # -- writes -------------------------------------------------------------------------------

    def _put(self, table: str, columns: Sequence[str], rows: Iterable[tuple]) -> None:
        now = time.time()
        sql = (
            f"INSERT OR REPLACE INTO {table} (fingerprint, content_hash, {', '.join(columns)}, last_used) "
            f"VALUES (?, ?, {', '.join('?' * len(columns))}, ?)"
        )
        try:
            with immediate_transaction(self._db):
                self._db.executemany(sql, ((self.fingerprint, *row, now) for row in rows))
        except sqlite3.DatabaseError as exc:
            self._failed("a write; results are not cached", exc)

    def put_terms(self, rows: Iterable[tuple[str, ...]]) -> None:
        """Rows of (content_hash, question_lemmas, text_lemmas, section_lemmas, vector_words)."""
        self._put("terms", TERM_FIELDS, rows)

    def put_vectors(self, items: Iterable[tuple[str, np.ndarray]]) -> None:
        self._put("vectors", ("vector",), ((h, np.asarray(v, dtype=np.float32).tobytes()) for h, v in items))

    def touch(self, hashes: Sequence[str]) -> None:
        """Mark entries as used now, so pruning keeps what the current source needs.

        Only entries not marked for a quarter of the TTL are written, so a daily refresh of an
        unchanged source rewrites nothing most days.
        """
        unique = list(dict.fromkeys(hashes))
        now = time.time()
        stale = now - self.ttl_days * 86400 / 4
        try:
            with immediate_transaction(self._db):
                for table in ("terms", "vectors"):
                    for start in range(0, len(unique), _BATCH):
                        batch = unique[start : start + _BATCH]
                        self._db.execute(
                            f"UPDATE {table} SET last_used = ? WHERE fingerprint = ? AND last_used < ? "
                            f"AND content_hash IN ({', '.join('?' * len(batch))})",
                            [now, self.fingerprint, stale, *batch],
                        )
        except sqlite3.DatabaseError as exc:
            self._failed("to record use", exc)

    def prune(self) -> int:
        """Drop entries unused for `ttl_days` (any fingerprint); returns how many."""
        cutoff = time.time() - self.ttl_days * 86400
        removed = 0
        try:
            with immediate_transaction(self._db):
                for table in ("terms", "vectors"):
                    removed += self._db.execute(
                        f"DELETE FROM {table} WHERE last_used < ?", (cutoff,)
                    ).rowcount
        except sqlite3.DatabaseError as exc:
            self._failed("to prune", exc)
        return removed

    def close(self) -> None:
        self._db.close()


@dataclass(frozen=True)
class Reuse:
    computed: int
    reused: int


_BLOCK_CHUNKS = 50_000


@dataclass(frozen=True)
class _CacheBlock:
    start: int  # position of the block's first chunk
    hashes: np.ndarray
    known: dict[str, Any]  # content hash -> cached entry; computed entries are added here
    todo: np.ndarray  # positions in the block to compute: the first of each missing content
    misses: int  # chunks of the block not in the cache


def _cache_blocks(
    hashes: np.ndarray, block_chunks: int, lookup: Callable[[Sequence[str]], dict[str, Any]], cache: NlpCache
) -> Iterator[_CacheBlock]:
    """The chunks block by block with their cache lookups; the cached ones are marked as used."""
    for start in range(0, len(hashes), block_chunks):
        block = hashes[start : start + block_chunks]
        known = lookup(block)
        hit = np.fromiter((h in known for h in block), dtype=bool, count=len(block))
        cache.touch(list(block[hit]))
        _, first = np.unique(block[~hit], return_index=True)
        yield _CacheBlock(start, block, known, np.flatnonzero(~hit)[np.sort(first)], int((~hit).sum()))


def cached_lemmas(
    load_nlp: Callable[[], Language],
    chunks: pd.DataFrame,
    cache: NlpCache,
    settings: NlpSettings = NlpSettings(),
    log: Callable[[str], None] | None = None,
    block_chunks: int = _BLOCK_CHUNKS,
) -> tuple[pd.DataFrame, Reuse]:
    """`lemmatize_chunks` for the chunks whose content is not cached; the model loads only then.

    Block by block, so a million chunks never hold more than one copy of their terms (the output
    columns) plus one block's lookups.
    """
    hashes = chunks["content_hash"].to_numpy()
    columns = {field: np.empty(len(chunks), dtype=object) for field in TERM_FIELDS}
    computed = 0
    progress = Progress("lemmas", len(chunks), log)
    with contextlib.ExitStack() as stack:
        analyser: TextAnalyser | None = None
        for block in _cache_blocks(hashes, block_chunks, cache.get_terms, cache):
            computed += block.misses
            if len(block.todo):
                if analyser is None:
                    analyser = stack.enter_context(TextAnalyser(load_nlp(), settings))
                fresh = chunk_terms(analyser, chunks.iloc[block.start + block.todo])
                rows = list(fresh[["content_hash", *TERM_FIELDS]].itertuples(index=False, name=None))
                cache.put_terms(rows)
                block.known.update((row[0], row[1:]) for row in rows)
            end = block.start + len(block.hashes)
            for column, field in enumerate(TERM_FIELDS):
                columns[field][block.start : end] = [block.known[h][column] for h in block.hashes]
            progress.update(len(block.hashes))
    progress.close()
    frame = pd.DataFrame(
        {"chunk_id": chunks["chunk_id"].to_numpy(), "content_hash": hashes, **columns}, copy=False
    )
    return frame, Reuse(computed=computed, reused=len(chunks) - computed)


def cached_vectors(
    load_nlp: Callable[[], Language],
    lemmas: pd.DataFrame,
    cache: NlpCache,
    block_chunks: int = _BLOCK_CHUNKS,
) -> tuple[ChunkVectors, Reuse]:
    """`embed_chunks` for the chunks whose vector is not cached, block by block into one matrix."""

    def embed(rows: np.ndarray) -> np.ndarray:
        return embed_chunks(load_nlp(), lemmas.iloc[rows]).matrix

    keys = lemmas["content_hash"].to_numpy()
    matrix, reuse = _cached_matrix(keys, VECTOR_DIM, embed, cache, block_chunks)
    return ChunkVectors(list(lemmas["chunk_id"]), matrix), reuse


def cached_sentence_vectors(
    load_encoder: Callable[[], SentenceEncoder],
    chunks: pd.DataFrame,
    cache: NlpCache,
    log: Callable[[str], None] | None = None,
    block_chunks: int = _BLOCK_CHUNKS,
) -> tuple[np.ndarray, Reuse]:
    """Sentence vectors of the chunks whose content has none cached; the model loads only then.

    Kept beside the word vectors, under a key that also names the sentence model.
    """

    def encode(rows: np.ndarray) -> np.ndarray:
        return load_encoder().encode(chunk_sentences(chunks.iloc[rows]), log)

    keys = np.array([stable_hash(h, SENTENCE_MODEL) for h in chunks["content_hash"]], dtype=object)
    return _cached_matrix(keys, SENTENCE_DIM, encode, cache, block_chunks)


def _cached_matrix(
    keys: np.ndarray,
    width: int,
    compute: Callable[[np.ndarray], np.ndarray],
    cache: NlpCache,
    block_chunks: int,
) -> tuple[np.ndarray, Reuse]:
    """One float32 row of `width` per key, block by block: cached rows read, the others made by
    `compute` (given the positions of the chunks to make) and cached."""
    matrix = np.zeros((len(keys), width), dtype=np.float32)
    computed = 0
    lookup = functools.partial(cache.get_vectors, width=width)
    for block in _cache_blocks(keys, block_chunks, lookup, cache):
        computed += block.misses
        if len(block.todo):
            items = list(zip(block.hashes[block.todo], compute(block.start + block.todo), strict=True))
            cache.put_vectors(items)
            block.known.update(items)
        end = block.start + len(block.hashes)
        matrix[block.start : end] = np.stack([block.known[h] for h in block.hashes])
    return matrix, Reuse(computed, len(keys) - computed)
