"""The embedded search backend: one SQLite file with FTS5 for BM25 and float32 vector blobs.

A publish is a single SQLite transaction (WAL journal), so readers keep seeing the previous index
until it commits, and a failed or killed publish leaves that index untouched. Only rows whose
`row_hash` changed are written; rows no longer in the source are deleted in the same transaction.
A search reads one snapshot (one read transaction), so a publish committing in the middle of a
query cannot take away a chunk it ranked. A damaged file is set aside by the next publish, which
then builds a complete index.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from rag_assets.common import sqlite
from rag_assets.common.sqlite import immediate_transaction
from rag_assets.index.backend import (
    LEMMA_FIELD_COLUMNS,
    IndexContent,
    IndexDamagedError,
    IndexNotFoundError,
    IndexStats,
    PublishError,
    PublishGate,
    PublishRefusedError,
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


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class EmbeddedIndex:
    kind = "embedded"

    def __init__(self, data_dir: Path | str, log: Callable[[str], None] | None = None) -> None:
        self.path = Path(data_dir).absolute() / INDEX_FILENAME
        self.location = str(self.path)
        self._log = log
        self._reader: sqlite3.Connection | None = None
        self._snapshot_depth = 0
        self._vectors: tuple[str, list[str], np.ndarray, np.ndarray] | None = None

    # -- publishing -------------------------------------------------------------------------

    def publish(self, content: IndexContent, gate: PublishGate | None = None) -> PublishReport:
        self.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._publish(content, gate)
        except sqlite3.DatabaseError as exc:
            if not sqlite.is_damaged(exc):
                raise PublishError(
                    f"{sqlite.describe(exc, self.path)}; the served index is unchanged"
                ) from exc
            aside = sqlite.set_aside(self.path)
            warning = f"{sqlite.describe(exc, self.path)}: set aside as {aside.name}, rebuilt in full"
            if self._log:
                self._log(warning)
        report = self._publish(content, gate)
        return replace(report, warnings=(*report.warnings, warning))

    def _publish(self, content: IndexContent, gate: PublishGate | None) -> PublishReport:
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode = WAL")
            with immediate_transaction(db):
                # One statement at a time: executescript would commit the open transaction.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                upserted, deleted = self._write_delta(db, content)
                meta = self._meta(db)
                changed = bool(upserted or deleted or "published_at" not in meta)
                now = _now()
                updates = [("confirmed_at", now)]
                if changed:
                    generation = str(int(meta.get("generation", "0")) + 1)
                    updates += [("published_at", now), ("generation", generation)]
                db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", updates)
                verdict = None
                if changed and gate is not None:
                    verdict = gate(self._view(db), self._live())
                    if not verdict.passed:
                        raise PublishRefusedError(verdict)
        finally:
            db.close()
        return PublishReport(
            location=self.location,
            chunks=len(content.rows),
            upserted=upserted,
            deleted=deleted,
            unchanged=len(content.rows) - upserted,
            gate=verdict,
        )

    def _write_delta(self, db: sqlite3.Connection, content: IndexContent) -> tuple[int, int]:
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
        return upserted, len(existing)

    def _view(self, db: sqlite3.Connection) -> EmbeddedIndex:
        """This index as `db` sees it: the new version inside its uncommitted transaction."""
        view = EmbeddedIndex(self.path.parent)
        view._reader = db
        view._snapshot_depth = 1  # already inside a transaction
        return view

    def _live(self) -> EmbeddedIndex | None:
        """The version being served (the last commit), or None when nothing was published."""
        live = EmbeddedIndex(self.path.parent)
        try:
            live.stats()
        except IndexNotFoundError:
            return None
        return live

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
            self._reader = self._open_reader()
        return self._reader

    def _open_reader(self) -> sqlite3.Connection:
        if not self.path.exists():
            raise IndexNotFoundError(
                f"no index at {self.path}: materialize es_index first (make run), "
                "or point RAG_DATA_DIR at the directory that holds it"
            )
        try:
            return self._connect_reader(f"file:{self.path}?mode=ro")
        except sqlite3.OperationalError as exc:
            if not sqlite.cannot_open_for_writing(exc):
                raise self._read_error(exc) from exc
        # A WAL database needs its -shm file; where the directory is read-only, nobody can be
        # writing either, so the file can be read as immutable.
        try:
            return self._connect_reader(f"file:{self.path}?mode=ro&immutable=1")
        except sqlite3.DatabaseError as exc:
            raise self._read_error(exc) from exc

    def _connect_reader(self, uri: str) -> sqlite3.Connection:
        reader = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        try:
            tables = {name for (name,) in reader.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            published = (
                "meta" in tables
                and reader.execute("SELECT 1 FROM meta WHERE key = 'published_at'").fetchone()
            )
        except sqlite3.DatabaseError as exc:
            reader.close()
            if sqlite.is_damaged(exc):
                raise self._read_error(exc) from exc
            raise
        if not published:
            reader.close()
            raise IndexNotFoundError(f"no index at {self.path}: nothing was ever published there")
        return reader

    def _read_error(self, exc: sqlite3.DatabaseError) -> Exception:
        if sqlite.is_damaged(exc):
            return IndexDamagedError(
                f"the index at {self.path} is damaged ({exc}); "
                "the next refresh (make run) sets it aside and rebuilds it"
            )
        return IndexNotFoundError(f"cannot read the index: {sqlite.describe(exc, self.path)}")

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Every read inside sees the same committed version of the index."""
        db = self._db()
        if self._snapshot_depth:
            self._snapshot_depth += 1
            try:
                yield
            finally:
                self._snapshot_depth -= 1
            return
        try:
            db.execute("BEGIN")
        except sqlite3.DatabaseError as exc:
            raise self._read_error(exc) from exc
        self._snapshot_depth = 1
        try:
            yield
        finally:
            self._snapshot_depth = 0
            try:
                db.execute("ROLLBACK")  # a read transaction: nothing to keep
            except sqlite3.Error:
                self.close()  # a connection stuck in a transaction is not reused

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        try:
            return self._db().execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            if sqlite.is_damaged(exc):
                raise self._read_error(exc) from exc
            raise

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
        return [chunk_id for (chunk_id,) in self._query(sql, params)]

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
        generation = dict(self._query("SELECT key, value FROM meta")).get("generation", "0")
        if self._vectors is None or self._vectors[0] != generation:
            rows = self._query("SELECT chunk_id, course, vector FROM chunks ORDER BY id")
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
        return {row[0]: StoredChunk(*row) for row in self._query(sql, list(chunk_ids))}

    def stats(self) -> IndexStats:
        with self.snapshot():
            courses = dict(
                self._query(
                    "SELECT course, COUNT(DISTINCT doc_id) FROM chunks GROUP BY course ORDER BY course"
                )
            )
            ((chunks,),) = self._query("SELECT COUNT(*) FROM chunks")
            meta = dict(self._query("SELECT key, value FROM meta"))
        return IndexStats(
            backend=self.kind,
            location=self.location,
            entries=sum(courses.values()),
            chunks=chunks,
            courses=courses,
            published_at=meta.get("published_at"),
            confirmed_at=meta.get("confirmed_at", meta.get("published_at")),
        )

    def chunk_hashes(self) -> dict[str, str]:
        return dict(self._query("SELECT chunk_id, content_hash FROM chunks"))

    def close(self) -> None:
        if self._reader is not None and not self._snapshot_depth:
            self._reader.close()
        self._reader = None
        self._vectors = None
