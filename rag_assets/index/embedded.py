"""The embedded search backend: one SQLite file with FTS5 for BM25 and float32 vector blobs.

A publish is a single SQLite transaction (WAL journal), so readers keep seeing the previous index
until it commits, and a failed or killed publish leaves that index untouched. Only rows whose
`row_hash` changed are written; rows no longer in the source are deleted in the same transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from rag_assets.common.sqlite import immediate_transaction
from rag_assets.index.backend import (
    LEMMA_FIELD_COLUMNS,
    IndexContent,
    IndexNotFoundError,
    IndexStats,
    PublishReport,
    StoredChunk,
)
from rag_assets.index.ranking import FIELD_WEIGHTS
from rag_assets.ingest.chunking import CHUNK_COLUMNS
from rag_assets.nlp.analysis import VECTOR_DIM

INDEX_FILENAME = "index.sqlite"
_DISPLAY_COLUMNS = ("chunk_id", "doc_id", "course", "section", "question", "text")
# Everything a chunk row holds but its joined content (only hashed), plus the row's own hash.
_STORED_COLUMNS = (*(c for c in CHUNK_COLUMNS if c != "content"), "row_hash")
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    chunk_id TEXT NOT NULL UNIQUE,
    doc_id TEXT NOT NULL,
    chunk_index INTEGER NOT NULL,
    course TEXT NOT NULL,
    section TEXT NOT NULL,
    question TEXT NOT NULL,
    text TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    row_hash TEXT NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_course ON chunks (course);
CREATE VIRTUAL TABLE IF NOT EXISTS chunk_lemmas USING fts5 (
    {", ".join(LEMMA_FIELD_COLUMNS)}, tokenize = 'unicode61 remove_diacritics 0'
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def fts_query(lemmas: Sequence[str]) -> str:
    """An OR of quoted terms: any shared lemma counts, BM25 sorts out how much."""
    terms = dict.fromkeys(t for t in lemmas if any(ch.isalnum() for ch in t))
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)


class EmbeddedIndex:
    kind = "embedded"

    def __init__(self, data_dir: Path | str) -> None:
        self.path = Path(data_dir) / INDEX_FILENAME
        self.location = str(self.path)
        self._reader: sqlite3.Connection | None = None
        self._vectors: tuple[str, list[str], np.ndarray, np.ndarray] | None = None

    # -- publishing -------------------------------------------------------------------------

    def publish(self, content: IndexContent) -> PublishReport:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._write_transaction() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            existing = {
                chunk_id: (rowid, row_hash)
                for rowid, chunk_id, row_hash in db.execute("SELECT id, chunk_id, row_hash FROM chunks")
            }
            upserted = 0
            for position, row in enumerate(content.rows.itertuples(index=False)):
                current = existing.pop(row.chunk_id, None)
                if current is not None and current[1] == row.row_hash:
                    continue
                if current is not None:
                    self._delete_row(db, current[0])
                self._insert_row(db, row, content.vectors[position])
                upserted += 1
            for rowid, _ in existing.values():
                self._delete_row(db, rowid)
            meta = self._meta(db)
            if upserted or existing or "published_at" not in meta:  # an unchanged source writes nothing
                db.executemany(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    [
                        ("published_at", datetime.now(UTC).isoformat(timespec="seconds")),
                        ("generation", str(int(meta.get("generation", "0")) + 1)),
                    ],
                )
        self._vectors = None
        return PublishReport(
            location=self.location,
            chunks=len(content.rows),
            upserted=upserted,
            deleted=len(existing),
            unchanged=len(content.rows) - upserted,
        )

    @contextmanager
    def _write_transaction(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode = WAL")
            with immediate_transaction(db):
                yield db
        finally:
            db.close()

    @staticmethod
    def _insert_row(db: sqlite3.Connection, row: object, vector: np.ndarray) -> None:
        values = [getattr(row, column) for column in _STORED_COLUMNS]
        blob = np.asarray(vector, dtype=np.float32).tobytes()
        if len(blob) != VECTOR_DIM * 4:
            raise ValueError(f"chunk {row.chunk_id}: vector has {len(blob) // 4} dimensions")
        cursor = db.execute(
            f"INSERT INTO chunks ({', '.join(_STORED_COLUMNS)}, vector) "
            f"VALUES ({', '.join('?' * (len(_STORED_COLUMNS) + 1))})",
            [*values, blob],
        )
        db.execute(
            f"INSERT INTO chunk_lemmas (rowid, {', '.join(LEMMA_FIELD_COLUMNS)}) VALUES (?, ?, ?, ?)",
            [cursor.lastrowid, *(getattr(row, c) for c in LEMMA_FIELD_COLUMNS)],
        )

    @staticmethod
    def _delete_row(db: sqlite3.Connection, rowid: int) -> None:
        db.execute("DELETE FROM chunk_lemmas WHERE rowid = ?", (rowid,))
        db.execute("DELETE FROM chunks WHERE id = ?", (rowid,))

    @staticmethod
    def _meta(db: sqlite3.Connection) -> dict[str, str]:
        return dict(db.execute("SELECT key, value FROM meta"))

    # -- reading ----------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._reader is None:
            missing = IndexNotFoundError(f"no index at {self.path}: materialize es_index first (make run)")
            if not self.path.exists():
                raise missing
            reader = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            try:
                published = reader.execute("SELECT 1 FROM meta WHERE key = 'published_at'").fetchone()
            except sqlite3.OperationalError:
                published = None
            if published is None:
                reader.close()
                raise missing
            self._reader = reader
        return self._reader

    def lexical_search(self, lemmas: Sequence[str], course: str | None, k: int) -> list[str]:
        query = fts_query(lemmas)
        if not query:
            return []
        weights = ", ".join(str(FIELD_WEIGHTS[c.removesuffix("_lemmas")]) for c in LEMMA_FIELD_COLUMNS)
        course_filter = "AND c.course = ?" if course else ""
        sql = (
            "SELECT c.chunk_id FROM chunk_lemmas JOIN chunks c ON c.id = chunk_lemmas.rowid "
            f"WHERE chunk_lemmas MATCH ? {course_filter} "
            f"ORDER BY bm25(chunk_lemmas, {weights}) LIMIT ?"
        )
        params = [query, course, k] if course else [query, k]
        return [chunk_id for (chunk_id,) in self._db().execute(sql, params)]

    def vector_search(self, vector: np.ndarray, course: str | None, k: int) -> list[str]:
        ids, courses, matrix = self._vector_table()
        scores = matrix @ np.asarray(vector, dtype=np.float32)
        if course:
            scores = np.where(courses == course, scores, -np.inf)
        k = min(k, int(np.isfinite(scores).sum()))
        if k <= 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k]
        return [ids[i] for i in top[np.argsort(-scores[top], kind="stable")]]

    def _vector_table(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """All vectors in memory, reloaded only when a publish changed the index."""
        db = self._db()
        generation = self._meta(db).get("generation", "0")
        if self._vectors is None or self._vectors[0] != generation:
            rows = db.execute("SELECT chunk_id, course, vector FROM chunks ORDER BY id").fetchall()
            matrix = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32)
            self._vectors = (
                generation,
                [r[0] for r in rows],
                np.array([r[1] for r in rows], dtype=object),
                matrix.reshape(len(rows), VECTOR_DIM),
            )
        return self._vectors[1], self._vectors[2], self._vectors[3]

    def fetch(self, chunk_ids: Sequence[str]) -> dict[str, StoredChunk]:
        if not chunk_ids:
            return {}
        sql = (
            f"SELECT {', '.join(_DISPLAY_COLUMNS)} FROM chunks "
            f"WHERE chunk_id IN ({', '.join('?' * len(chunk_ids))})"
        )
        return {row[0]: StoredChunk(*row) for row in self._db().execute(sql, list(chunk_ids))}

    def stats(self) -> IndexStats:
        db = self._db()
        courses = dict(
            db.execute("SELECT course, COUNT(DISTINCT doc_id) FROM chunks GROUP BY course ORDER BY course")
        )
        (chunks,) = db.execute("SELECT COUNT(*) FROM chunks").fetchone()
        return IndexStats(
            backend=self.kind,
            location=self.location,
            entries=sum(courses.values()),
            chunks=chunks,
            courses=courses,
            published_at=self._meta(db).get("published_at"),
        )

    def chunk_hashes(self) -> dict[str, str]:
        return dict(self._db().execute("SELECT chunk_id, content_hash FROM chunks"))

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
