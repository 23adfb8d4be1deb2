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
    IndexUnreadableError,
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
# Display fields, ids and hashes, and the lemma fields the full-text index reads.
_STORED_COLUMNS = (*CHUNK_COLUMNS, "row_hash", *LEMMA_FIELD_COLUMNS)
_LEMMAS = ", ".join(LEMMA_FIELD_COLUMNS)
# 2: the full-text index is an external-content FTS5 table over `chunks`, so a publish that
# rewrites most rows rebuilds it in one pass instead of deleting and inserting row by row.
SCHEMA_VERSION = "2"
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
    {", ".join(f"{c} TEXT NOT NULL" for c in LEMMA_FIELD_COLUMNS)},
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_course ON chunks (course);
CREATE VIRTUAL TABLE IF NOT EXISTS chunk_lemmas USING fts5 (
    {_LEMMAS}, content = 'chunks', content_rowid = 'id', tokenize = 'unicode61 remove_diacritics 0'
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# Most rows rewritten (a new analysis, a first build): rebuild the full-text index in one pass.
_REBUILD_SHARE = 0.5


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
        self._vectors: tuple[str, list[str], dict[str, slice], np.ndarray] | None = None

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
                self._prepare_schema(db)
                upserted, deleted = self._write_delta(db, content)
                meta = self._meta(db)
                changed = bool(
                    upserted
                    or deleted
                    or "published_at" not in meta
                    or meta.get("analysis_fingerprint") != content.fingerprint
                )
                now = _now()
                updates = [("confirmed_at", now)]
                if changed:
                    generation = str(int(meta.get("generation", "0")) + 1)
                    updates += [
                        ("published_at", now),
                        ("generation", generation),
                        ("analysis_fingerprint", content.fingerprint),
                        ("schema_version", SCHEMA_VERSION),
                    ]
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

    @staticmethod
    def _prepare_schema(db: sqlite3.Connection) -> None:
        """Create the tables; tables of an older layout are dropped first (inside the publish's
        transaction, so readers keep the old index until the new one commits)."""
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "chunks" in tables:
            found = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if found is None or found[0] != SCHEMA_VERSION:
                db.execute("DROP TABLE IF EXISTS chunk_lemmas")
                db.execute("DROP TABLE chunks")
        # One statement at a time: executescript would commit the open transaction.
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)

    def _write_delta(self, db: sqlite3.Connection, content: IndexContent) -> tuple[int, int]:
        """Write new and changed rows, delete the rest; returns (upserted, deleted)."""
        if content.vectors.ndim != 2 or content.vectors.shape[1] != VECTOR_DIM:
            first = content.rows.chunk_id.iloc[0] if len(content.rows) else "-"
            raise ValueError(f"chunk {first}: vector has {content.vectors.shape[-1]} dimensions")
        existing = {
            chunk_id: (rowid, row_hash)
            for rowid, chunk_id, row_hash in db.execute("SELECT id, chunk_id, row_hash FROM chunks")
        }
        fresh: list[int] = []  # positions in `content` to insert
        gone: list[int] = []  # row ids to delete: changed rows and rows no longer in the source
        for position, (chunk_id, row_hash) in enumerate(
            zip(content.rows.chunk_id, content.rows.row_hash, strict=True)
        ):
            current = existing.pop(chunk_id, None)
            if current is not None and current[1] == row_hash:
                continue
            if current is not None:
                gone.append(current[0])
            fresh.append(position)
        deleted = len(existing)
        gone.extend(rowid for rowid, _ in existing.values())
        rebuild = len(fresh) + len(gone) > _REBUILD_SHARE * max(len(content.rows), 1)
        ids = [(rowid,) for rowid in gone]
        if not rebuild:  # an external-content index forgets a row given its old values
            db.executemany(
                f"INSERT INTO chunk_lemmas (chunk_lemmas, rowid, {_LEMMAS}) "
                f"SELECT 'delete', id, {_LEMMAS} FROM chunks WHERE id = ?",
                ids,
            )
        db.executemany("DELETE FROM chunks WHERE id = ?", ids)
        (last_id,) = db.execute("SELECT COALESCE(MAX(id), 0) FROM chunks").fetchone()
        new_ids = range(last_id + 1, last_id + 1 + len(fresh))
        db.executemany(
            f"INSERT INTO chunks (id, {', '.join(_STORED_COLUMNS)}, vector) "
            f"VALUES (?, {', '.join('?' * len(_STORED_COLUMNS))}, ?)",
            (
                (rowid, *self._row_values(values, content.vectors[position]))
                for rowid, position, values in zip(
                    new_ids,
                    fresh,
                    content.rows.iloc[fresh][list(_STORED_COLUMNS)].itertuples(index=False, name=None),
                    strict=True,
                )
            ),
        )
        if rebuild:
            db.execute("INSERT INTO chunk_lemmas (chunk_lemmas) VALUES ('rebuild')")
        elif fresh:
            db.execute(
                f"INSERT INTO chunk_lemmas (rowid, {_LEMMAS}) SELECT id, {_LEMMAS} FROM chunks WHERE id >= ?",
                (new_ids.start,),
            )
        return len(fresh), deleted

    @staticmethod
    def _row_values(values: tuple, vector: np.ndarray) -> tuple:
        """One row's stored values and its vector as a float32 blob."""
        return (*values, np.asarray(vector, dtype=np.float32).tobytes())

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
            live._db()  # opening checks that something was published; no need to count it
        except IndexNotFoundError:
            return None
        return live

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
        return IndexUnreadableError(f"cannot read the index: {sqlite.describe(exc, self.path)}")

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

    def _rows(self, sql: str, params: Sequence[object] = ()) -> Iterator[tuple]:
        """Rows as they are read; a damaged file surfaces as IndexDamagedError."""
        try:
            yield from self._db().execute(sql, params)
        except sqlite3.DatabaseError as exc:
            if sqlite.is_damaged(exc):
                raise self._read_error(exc) from exc
            raise

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        return list(self._rows(sql, params))

    def _meta_value(self, key: str) -> str | None:
        found = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return found[0][0] if found else None

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
        ids, spans, matrix = self._vector_table()
        span = spans.get(course, slice(0, 0)) if course else slice(0, len(ids))
        scores = matrix[span] @ np.asarray(vector, dtype=np.float32)  # a slice: no copy
        k = min(k, len(scores))
        if k <= 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k]
        return [ids[span.start + i] for i in top[np.argsort(-scores[top], kind="stable")]]

    def _vector_table(self) -> tuple[list[str], dict[str, slice], np.ndarray]:
        """All vectors in one float32 matrix, rows grouped by course so that a course is a slice;
        reloaded only when a publish changed the index."""
        generation = self._meta_value("generation") or "0"
        if self._vectors is None or self._vectors[0] != generation:
            ((count,),) = self._query("SELECT COUNT(*) FROM chunks")
            matrix = np.empty((count, VECTOR_DIM), dtype=np.float32)
            ids: list[str] = []
            spans: dict[str, slice] = {}
            # Row by row into one matrix: no second copy of every blob.
            rows = self._rows("SELECT chunk_id, course, vector FROM chunks ORDER BY course, id")
            for row, (chunk_id, course, blob) in enumerate(rows):
                ids.append(chunk_id)
                matrix[row] = np.frombuffer(blob, dtype=np.float32)
                start = spans[course].start if course in spans else row
                spans[course] = slice(start, row + 1)
            self._vectors = (generation, ids, spans, matrix)
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

    def analysis_fingerprint(self) -> str | None:
        return self._meta_value("analysis_fingerprint")

    def close(self) -> None:
        if self._reader is not None and not self._snapshot_depth:
            self._reader.close()
        self._reader = None
        self._vectors = None
