"""The embedded search backend: one SQLite file holding the chunks, BM25F postings and vector lists.

A publish is a single SQLite transaction (WAL journal), so readers keep seeing the previous index
until it commits, and a failed or killed publish leaves that index untouched. Only rows whose
`row_hash` changed are written, and only the postings of their terms and the vector lists they
belong to; rows no longer in the source are deleted in the same transaction. A publish that
rewrites most rows (a first build, a new analysis) builds everything afresh instead.

A search reads one snapshot (one read transaction), so a publish committing in the middle of a
query cannot take away a chunk it ranked. It reads only the postings of its own terms and the
vector lists nearest to its vector (`lexical`, `vector_lists`), plus two small per-row arrays
loaded once per published version: its cost does not grow with the corpus the way a scan does.
The semantic mode's sentence kNN is the exception: an exact scan of the version's sentence
vectors, held in memory (`sentence_search`), for the corpus sizes that mode's build suits.
A damaged file is set aside by the next publish, which then builds a complete index.
"""

from __future__ import annotations

import json
import sqlite3
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from rag_assets.common import sqlite
from rag_assets.common.progress import Progress
from rag_assets.common.sqlite import immediate_transaction
from rag_assets.common.stored import PART_ROWS
from rag_assets.index import vector_lists
from rag_assets.index.backend import (
    LEMMA_FIELD_COLUMNS,
    Candidate,
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
from rag_assets.index.lexical import (
    ROWID,
    PackedPostings,
    Postings,
    RowTable,
    bm25_top,
    index_terms,
    merge_postings,
    row_lengths,
    searchable,
    top_rows,
)
from rag_assets.index.ranking import FIELD_WEIGHTS
from rag_assets.ingest.chunking import CHUNK_COLUMNS
from rag_assets.nlp.analysis import VECTOR_DIM
from rag_assets.nlp.sentence import SENTENCE_DIM

INDEX_FILENAME = "index.sqlite"
_DISPLAY_COLUMNS = ("chunk_id", "doc_id", "course", "section", "question", "text")
# Display fields, ids and hashes, and the lemma fields (a changed row's old terms leave the postings).
_STORED_COLUMNS = (*CHUNK_COLUMNS, "row_hash", *LEMMA_FIELD_COLUMNS)
# 3: BM25F postings and vector lists instead of an FTS5 table and a vector per row.
# 4: a sentence vector per row (the semantic reranker's), NULL in the other modes.
SCHEMA_VERSION = "4"
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
    sentence_vector BLOB
);
CREATE INDEX IF NOT EXISTS chunks_course ON chunks (course);
CREATE TABLE IF NOT EXISTS postings (
    term TEXT PRIMARY KEY, rowids BLOB NOT NULL, weights BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS vector_lists (
    list INTEGER PRIMARY KEY, rowids BLOB NOT NULL, vectors BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS row_arrays (name TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_TABLES = ("chunks", "postings", "vector_lists", "row_arrays")
_OLD_TABLES = ("chunk_lemmas",)  # of earlier layouts
# Most rows rewritten (a new analysis, a first build): build everything afresh.
_REBUILD_SHARE = 0.5
_LIST_GROUP_ROWS = 200_000  # vectors held at once when writing the vector lists (240 MB)
_IN_BATCH = 500  # ids per IN (...) list, below SQLite's variable limit
_READ_MMAP_BYTES = 1 << 30  # readers map the file: blobs are read without a copy per page
_LIST_CACHE_BYTES = 64 << 20  # vector lists a reader keeps in memory (about 55 lists of 1000)
_CHUNK_ID_CACHE_ROWS = 200_000  # chunk ids of ranked rows a reader keeps


def _lemma_fields(frame: pd.DataFrame) -> list[tuple[float, Sequence[str]]]:
    return [(FIELD_WEIGHTS[c.removesuffix("_lemmas")], list(frame[c])) for c in LEMMA_FIELD_COLUMNS]


@dataclass
class RowArrays:
    """Per row id: its length in tokens, its course (a code) and its vector list; with the course
    names and the list centroids. Loaded once per published version by readers."""

    lengths: np.ndarray
    courses: np.ndarray
    lists: np.ndarray
    course_names: list[str]
    centroids: np.ndarray

    @classmethod
    def empty(cls, centroids: np.ndarray) -> RowArrays:
        none = np.full(1, -1, dtype=np.int32)  # row ids start at 1
        return cls(np.zeros(1, dtype=np.int32), none, none.copy(), [], centroids)

    def grow(self, size: int) -> None:
        extra = size - len(self.lengths)
        if extra > 0:
            self.lengths = np.concatenate([self.lengths, np.zeros(extra, dtype=np.int32)])
            self.courses = np.concatenate([self.courses, np.full(extra, -1, dtype=np.int32)])
            self.lists = np.concatenate([self.lists, np.full(extra, -1, dtype=np.int32)])

    def course_codes(self, courses: Sequence[str]) -> np.ndarray:
        """Codes of these courses, adding the new ones to `course_names`."""
        codes = {name: code for code, name in enumerate(self.course_names)}
        for name in dict.fromkeys(courses):
            if name not in codes:
                codes[name] = len(self.course_names)
                self.course_names.append(name)
        return np.array([codes[c] for c in courses], dtype=np.int32)

    def table(self) -> RowTable:
        return RowTable(self.lengths, self.courses)

    def save(self, db: sqlite3.Connection) -> None:
        db.executemany(
            "INSERT OR REPLACE INTO row_arrays (name, data) VALUES (?, ?)",
            [
                ("lengths", self.lengths.astype(np.int32).tobytes()),
                ("courses", self.courses.astype(np.int32).tobytes()),
                ("lists", self.lists.astype(np.int32).tobytes()),
                ("centroids", self.centroids.astype(np.float32).tobytes()),
                ("course_names", json.dumps(self.course_names).encode()),
            ],
        )

    @classmethod
    def load(cls, rows: Callable[[str], list[tuple]]) -> RowArrays | None:
        data = dict(rows("SELECT name, data FROM row_arrays"))
        if "lengths" not in data:
            return None
        return cls(
            lengths=np.frombuffer(data["lengths"], dtype=np.int32).copy(),
            courses=np.frombuffer(data["courses"], dtype=np.int32).copy(),
            lists=np.frombuffer(data["lists"], dtype=np.int32).copy(),
            course_names=json.loads(data["course_names"]),
            centroids=np.frombuffer(data["centroids"], dtype=np.float32).reshape(-1, VECTOR_DIM).copy(),
        )


@dataclass
class _Served:
    """What a reader keeps of one published version: the per-row arrays, and the vector lists it
    read last (up to `_LIST_CACHE_BYTES`, so a small index is read from disk once)."""

    generation: str
    arrays: RowArrays
    table: RowTable
    norms: np.ndarray
    codes: dict[str, int]
    lists: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=OrderedDict)
    list_bytes: int = 0
    chunk_ids: dict[int, str] = field(default_factory=dict)  # of rows ranked so far, bounded
    sentences: tuple[np.ndarray, np.ndarray] | None = None  # row ids and sentence vectors, once read

    def keep_list(self, number: int, rowids: np.ndarray, vectors: np.ndarray) -> None:
        self.lists[number] = (rowids, vectors)
        self.list_bytes += vectors.nbytes
        while self.list_bytes > _LIST_CACHE_BYTES and len(self.lists) > 1:
            _, (_, dropped) = self.lists.popitem(last=False)
            self.list_bytes -= dropped.nbytes


def _vectors(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float32).reshape(-1, VECTOR_DIM)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class EmbeddedIndex:
    kind = "embedded"

    def __init__(self, data_dir: Path | str, log: Callable[[str], None] | None = None) -> None:
        self.path = Path(data_dir).absolute() / INDEX_FILENAME
        self.location = str(self.path)
        self._log = log  # progress of long publishes (the Dagster log)
        self._reader: sqlite3.Connection | None = None
        self._snapshot_depth = 0
        self._snapshot_meta: dict[str, str] | None = None
        self._served_version: _Served | None = None

    # -- publishing -------------------------------------------------------------------------

    def publish(self, content: IndexContent, gate: PublishGate | None = None) -> PublishReport:
        self.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._publish(content, gate)
        except IndexDamagedError as exc:
            reason = str(exc)
        except sqlite3.DatabaseError as exc:
            if not sqlite.is_damaged(exc):
                raise PublishError(
                    f"{sqlite.describe(exc, self.path)}; the served index is unchanged"
                ) from exc
            reason = sqlite.describe(exc, self.path)
        aside = sqlite.set_aside(self.path)
        warning = f"{reason}: set aside as {aside.name}, rebuilt in full"
        report = self._publish(content, gate)
        return replace(report, warnings=(*report.warnings, warning))

    def _publish(self, content: IndexContent, gate: PublishGate | None) -> PublishReport:
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode = WAL")
            with immediate_transaction(db):
                self._check_integrity(db)
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
                updates = [
                    ("confirmed_at", now),
                    ("content_digest", content.digest),
                    ("content_sources", json.dumps(content.sources, sort_keys=True)),
                    ("reranker", content.reranker),
                ]
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
            chunks=len(content),
            upserted=upserted,
            deleted=deleted,
            unchanged=len(content) - upserted,
            gate=verdict,
        )

    def confirm(self, digest: str) -> PublishReport | None:
        if not digest or not self.path.exists():
            return None
        self.close()
        try:
            db = sqlite3.connect(self.path, isolation_level=None)
            try:
                with immediate_transaction(db):
                    self._check_integrity(db)
                    meta = self._meta(db)
                    if meta.get("content_digest") != digest or meta.get("schema_version") != SCHEMA_VERSION:
                        return None
                    db.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('confirmed_at', ?)", (_now(),)
                    )
                    (chunks,) = db.execute("SELECT count(*) FROM chunks").fetchone()
            finally:
                db.close()
        except (IndexDamagedError, sqlite3.DatabaseError):
            return None  # the publish reports it, sets the file aside and rebuilds it
        return PublishReport(location=self.location, chunks=chunks, upserted=0, deleted=0, unchanged=chunks)

    def _check_integrity(self, db: sqlite3.Connection) -> None:
        """Every page of the served file is read: a refresh that confirms the index as current
        must not leave damage in parts it did not need to rewrite."""
        (found,) = db.execute("PRAGMA quick_check(1)").fetchone()
        if found != "ok":
            raise IndexDamagedError(f"{self.path.resolve()} is damaged (SQLite quick_check: {found})")

    @staticmethod
    def _prepare_schema(db: sqlite3.Connection) -> None:
        """Create the tables; tables of an older layout are dropped first (inside the publish's
        transaction, so readers keep the old index until the new one commits)."""
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "chunks" in tables:
            found = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if found is None or found[0] != SCHEMA_VERSION:
                for table in (*_OLD_TABLES, *_TABLES):
                    db.execute(f"DROP TABLE IF EXISTS {table}")
        # One statement at a time: executescript would commit the open transaction.
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)

    def _write_delta(self, db: sqlite3.Connection, content: IndexContent) -> tuple[int, int]:
        """Write new and changed rows, delete the rest; returns (upserted, deleted)."""
        existing = {
            chunk_id: (rowid, row_hash)
            for rowid, chunk_id, row_hash in db.execute("SELECT id, chunk_id, row_hash FROM chunks")
        }
        fresh: list[int] = []  # positions in `content` to insert
        gone: list[int] = []  # row ids to delete: changed rows and rows no longer in the source
        pairs = zip(content.chunk_ids, content.row_hashes, strict=True)
        for position, (chunk_id, row_hash) in enumerate(pairs):
            current = existing.pop(chunk_id, None)
            if current is not None and current[1] == row_hash:
                continue
            if current is not None:
                gone.append(current[0])
            fresh.append(position)
        deleted = len(existing)
        gone.extend(rowid for rowid, _ in existing.values())
        arrays = RowArrays.load(lambda sql: db.execute(sql).fetchall())
        rows = len(content)
        if (
            arrays is None
            or len(fresh) + len(gone) > _REBUILD_SHARE * max(rows, 1)
            or vector_lists.needs_new_lists(len(arrays.centroids), rows)
        ):
            self._write_all(db, content)
        elif fresh or gone:
            self._write_changes(
                db, content, np.array(fresh, dtype=np.int64), np.array(gone, dtype=np.int64), arrays
            )
        return len(fresh), deleted

    def _write_all(self, db: sqlite3.Connection, content: IndexContent) -> None:
        """Every row, its postings and its vector list, afresh (row ids 1..n in source order)."""
        for table in _TABLES:
            db.execute(f"DELETE FROM {table}")
        count = vector_lists.list_count(len(content))
        sample = content.vectors_at(vector_lists.training_sample(len(content), count))
        arrays = RowArrays.empty(vector_lists.train_centroids(sample, count))
        rowids = np.arange(1, len(content) + 1)
        self._write_postings(db, merge_postings(self._add_rows(db, content, None, rowids, arrays)))
        self._write_vector_lists(db, content, rowids, arrays.lists[rowids])
        arrays.save(db)

    def _write_changes(
        self,
        db: sqlite3.Connection,
        content: IndexContent,
        fresh: np.ndarray,
        gone: np.ndarray,
        arrays: RowArrays,
    ) -> None:
        """Delete the `gone` row ids, add the `fresh` positions of `content`, and rewrite only the
        postings of their terms and the vector lists they leave or join."""
        old = self._stored_rows(db, gone)
        affected: set[str] = set()
        for start in range(0, len(gone), PART_ROWS):
            part = old.iloc[start : start + PART_ROWS]
            affected.update(index_terms(gone[start : start + PART_ROWS], _lemma_fields(part)).terms)
        left_lists = set(arrays.lists[gone].tolist())
        arrays.lengths[gone], arrays.courses[gone], arrays.lists[gone] = 0, -1, -1
        for start in range(0, len(gone), _IN_BATCH):
            batch = gone[start : start + _IN_BATCH].tolist()
            db.execute(f"DELETE FROM chunks WHERE id IN ({', '.join('?' * len(batch))})", batch)
        (last_id,) = db.execute("SELECT COALESCE(MAX(id), 0) FROM chunks").fetchone()
        last_id = max(last_id, len(arrays.lengths) - 1)  # never reuse an id still in a posting
        rowids = np.arange(last_id + 1, last_id + 1 + len(fresh))
        added = dict(merge_postings(self._add_rows(db, content, fresh, rowids, arrays)))
        changed: dict[str, Postings] = {}
        for term in sorted(affected | set(added)):
            found = db.execute("SELECT rowids, weights FROM postings WHERE term = ?", (term,)).fetchone()
            current = Postings.from_blobs(*found) if found else Postings(np.empty(0), np.empty(0))
            changed[term] = current.replace_rows(gone, added.get(term))
        self._write_postings(db, sorted(changed.items()))
        fresh_vectors = content.vectors_at(fresh)
        for number in sorted(left_lists | set(arrays.lists[rowids].tolist())):
            found = db.execute(
                "SELECT rowids, vectors FROM vector_lists WHERE list = ?", (number,)
            ).fetchone()
            ids = np.frombuffer(found[0], dtype=np.int32) if found else np.empty(0, dtype=np.int32)
            vectors = _vectors(found[1]) if found else np.empty((0, VECTOR_DIM), dtype=np.float32)
            keep = ~np.isin(ids, gone)
            joining = arrays.lists[rowids] == number
            self._write_vector_list(
                db,
                number,
                np.concatenate([ids[keep], rowids[joining]]),
                np.concatenate([vectors[keep], fresh_vectors[joining]]),
            )
        arrays.save(db)

    def _add_rows(
        self,
        db: sqlite3.Connection,
        content: IndexContent,
        positions: np.ndarray | None,
        rowids: np.ndarray,
        arrays: RowArrays,
    ) -> list[PackedPostings]:
        """Insert the rows at `positions` of `content` (None: all) as `rowids`, block by block;
        record them in `arrays` and return each block's postings."""
        arrays.grow(int(rowids[-1]) + 1 if len(rowids) else 0)
        progress = Progress("index rows", len(rowids), self._log)
        insert = (
            f"INSERT INTO chunks (id, {', '.join(_STORED_COLUMNS)}, sentence_vector) "
            f"VALUES (?, {', '.join('?' * len(_STORED_COLUMNS))}, ?)"
        )
        postings = []
        done = 0
        for block in content.blocks(positions):
            ids = rowids[done : done + len(block.rows)]
            done += len(block.rows)
            values = block.rows[list(_STORED_COLUMNS)].itertuples(index=False, name=None)
            sentences = [None] * len(ids)
            if block.sentences is not None:
                sentences = [vector.tobytes() for vector in block.sentences]
            db.executemany(insert, ((int(i), *v, s) for i, v, s in zip(ids, values, sentences, strict=True)))
            fields = _lemma_fields(block.rows)
            arrays.lengths[ids] = row_lengths(fields)
            arrays.courses[ids] = arrays.course_codes(list(block.rows.course))
            arrays.lists[ids] = vector_lists.nearest(block.vectors, arrays.centroids)
            postings.append(index_terms(ids, fields))
            progress.update(len(block.rows))
        progress.close()
        return postings

    def _write_vector_lists(
        self, db: sqlite3.Connection, content: IndexContent, rowids: np.ndarray, lists: np.ndarray
    ) -> None:
        """Every vector list, from the list of each row (row `rowids[i]` at position i).

        The lists are written in groups of about `_LIST_GROUP_ROWS` vectors, each group reading
        the vectors once: one pass for all would hold every vector (1.2 GB at a million chunks).
        """
        sizes = np.bincount(lists)
        group_of_list = (np.cumsum(sizes) - sizes) // _LIST_GROUP_ROWS
        group_of_row = group_of_list[lists]
        for group in np.unique(group_of_row):
            positions = np.flatnonzero(group_of_row == group)
            vectors = content.vectors_at(positions)
            members = lists[positions]
            order = np.argsort(members, kind="stable")
            numbers, starts = np.unique(members[order], return_index=True)
            for number, block in zip(numbers, np.split(order, starts[1:]), strict=True):
                self._write_vector_list(db, int(number), rowids[positions[block]], vectors[block])

    @staticmethod
    def _stored_rows(db: sqlite3.Connection, rowids: np.ndarray) -> pd.DataFrame:
        """The lemma fields of stored rows, in the order of `rowids`."""
        found: dict[int, tuple] = {}
        for start in range(0, len(rowids), _IN_BATCH):
            batch = rowids[start : start + _IN_BATCH].tolist()
            found.update(
                (row[0], row[1:])
                for row in db.execute(
                    f"SELECT id, {', '.join(LEMMA_FIELD_COLUMNS)} FROM chunks "
                    f"WHERE id IN ({', '.join('?' * len(batch))})",
                    batch,
                )
            )
        return pd.DataFrame([found[int(r)] for r in rowids], columns=LEMMA_FIELD_COLUMNS)

    @staticmethod
    def _write_postings(db: sqlite3.Connection, postings: Iterable[tuple[str, Postings]]) -> None:
        """Posting lists in term order, written as they come; an empty one deletes its term."""
        emptied: list[tuple[str]] = []

        def filled() -> Iterator[tuple[str, bytes, bytes]]:
            for term, found in postings:
                if len(found.rowids):
                    yield (term, *found.blobs())
                else:
                    emptied.append((term,))

        db.executemany("INSERT OR REPLACE INTO postings (term, rowids, weights) VALUES (?, ?, ?)", filled())
        db.executemany("DELETE FROM postings WHERE term = ?", emptied)

    @staticmethod
    def _write_vector_list(
        db: sqlite3.Connection, number: int, rowids: np.ndarray, vectors: np.ndarray
    ) -> None:
        if not len(rowids):
            db.execute("DELETE FROM vector_lists WHERE list = ?", (number,))
            return
        db.execute(
            "INSERT OR REPLACE INTO vector_lists (list, rowids, vectors) VALUES (?, ?, ?)",
            (number, rowids.astype(np.int32).tobytes(), np.asarray(vectors, dtype=np.float32).tobytes()),
        )

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

    def _open_reader(self, mmap_bytes: int = _READ_MMAP_BYTES) -> sqlite3.Connection:
        if not self.path.exists():
            raise IndexNotFoundError(
                f"no index at {self.path}: materialize es_index first (make run), "
                "or point RAG_DATA_DIR at the directory that holds it"
            )
        try:
            return self._connect_reader(f"file:{self.path}?mode=ro", mmap_bytes)
        except sqlite3.OperationalError as exc:
            if not sqlite.cannot_open_for_writing(exc):
                raise self._read_error(exc) from exc
        # A WAL database needs its -shm file; where the directory is read-only, nobody can be
        # writing either, so the file can be read as immutable.
        try:
            return self._connect_reader(f"file:{self.path}?mode=ro&immutable=1", mmap_bytes)
        except sqlite3.DatabaseError as exc:
            raise self._read_error(exc) from exc

    def _connect_reader(self, uri: str, mmap_bytes: int) -> sqlite3.Connection:
        reader = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        reader.execute(f"PRAGMA mmap_size = {mmap_bytes}")
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
            self._snapshot_meta = None
            try:
                db.execute("ROLLBACK")  # a read transaction: nothing to keep
            except sqlite3.Error:
                self.close()  # a connection stuck in a transaction is not reused

    def _query(
        self, sql: str, params: Sequence[object] = (), db: sqlite3.Connection | None = None
    ) -> list[tuple]:
        """All rows at once; a damaged file surfaces as IndexDamagedError."""
        try:
            return (db or self._db()).execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            if sqlite.is_damaged(exc):
                raise self._read_error(exc) from exc
            raise

    @contextmanager
    def _scan(self) -> Iterator[sqlite3.Connection]:
        """A read transaction of its own for queries over every row, without the readers' memory
        map: mapped, the pages a scan touches stay resident in this process (1 GB at 1M chunks).
        Inside a snapshot (or a publish's view of its new version) it reads that version."""
        if self._snapshot_depth:
            yield self._db()
            return
        db = self._open_reader(mmap_bytes=0)
        try:
            self._query("BEGIN", db=db)
            yield db
        finally:
            db.close()

    def _meta_value(self, key: str) -> str | None:
        """Inside a snapshot the meta table is read once (a search asks it several things)."""
        if not self._snapshot_depth:
            found = self._query("SELECT value FROM meta WHERE key = ?", (key,))
            return found[0][0] if found else None
        if self._snapshot_meta is None:
            self._snapshot_meta = dict(self._query("SELECT key, value FROM meta"))
        return self._snapshot_meta.get(key)

    def _served(self) -> _Served:
        """The per-row arrays of the version this snapshot sees, loaded once per version."""
        generation = self._meta_value("generation") or "0"
        if self._served_version is None or self._served_version.generation != generation:
            layout = self._meta_value("schema_version")
            arrays = RowArrays.load(self._query) if layout == SCHEMA_VERSION else None
            if arrays is None:
                raise IndexUnreadableError(
                    f"the index at {self.path} has layout {layout or 1}, this version searches layout "
                    f"{SCHEMA_VERSION}; run the refresh (make run) to rebuild it"
                )
            table = arrays.table()
            self._served_version = _Served(
                generation=generation,
                arrays=arrays,
                table=table,
                norms=table.length_norms(),
                codes={name: code for code, name in enumerate(arrays.course_names)},
            )
        return self._served_version

    def _course_code(self, served: _Served, course: str | None) -> int | None:
        return None if course is None else served.codes.get(course, -2)  # -2: matches no row

    def lexical_search(self, lemmas: Sequence[str], course: str | None, k: int) -> list[tuple[str, float]]:
        terms = searchable(lemmas)
        if not terms:
            return []
        served = self._served()
        postings = {
            term: Postings.from_blobs(rowids, weights)
            for term, rowids, weights in self._query(
                f"SELECT term, rowids, weights FROM postings WHERE term IN ({', '.join('?' * len(terms))})",
                terms,
            )
        }
        code = self._course_code(served, course)
        ranked = bm25_top(postings, terms, served.table, served.norms, code, k)
        chunk_ids = self._chunk_ids([row for row, _ in ranked])
        return [(chunk_id, score) for chunk_id, (_, score) in zip(chunk_ids, ranked, strict=True)]

    def term_frequencies(self, terms: Sequence[str]) -> tuple[int, dict[str, int]]:
        served = self._served()
        held = dict.fromkeys(terms, 0)
        if held:
            width = np.dtype(ROWID).itemsize  # the blob's length says it: none is read
            sql = f"SELECT term, length(rowids) FROM postings WHERE term IN ({', '.join('?' * len(held))})"
            held.update({term: size // width for term, size in self._query(sql, list(held))})
        return served.table.rows, held

    def vector_search(self, vector: np.ndarray, course: str | None, k: int) -> list[str]:
        served = self._served()
        code = self._course_code(served, course)
        query = np.asarray(vector, dtype=np.float32)
        order = vector_lists.probe_order(served.arrays.centroids, query)
        rowids_parts, score_parts = [], []
        found = 0
        # The nearest lists first; a course filter reads further until k of its rows were seen.
        for start in range(0, len(order), vector_lists.PROBES):
            for rowids, vectors in self._vector_lists(served, order[start : start + vector_lists.PROBES]):
                scores = vectors @ query
                if code is not None:
                    inside = served.arrays.courses[rowids] == code
                    rowids, scores = rowids[inside], scores[inside]
                rowids_parts.append(rowids)
                score_parts.append(scores)
                found += len(rowids)
            if found >= k:
                break
        if not rowids_parts:
            return []
        return self._chunk_ids(top_rows(np.concatenate(score_parts), np.concatenate(rowids_parts), k))

    def sentence_search(self, sentence: np.ndarray, course: str | None, k: int) -> list[str]:
        served = self._served()
        rowids, matrix = self._sentence_vectors(served)
        scores = matrix @ np.asarray(sentence, dtype=np.float32)
        code = self._course_code(served, course)
        if code is not None:
            inside = served.arrays.courses[rowids] == code
            rowids, scores = rowids[inside], scores[inside]
        return self._chunk_ids(top_rows(scores, rowids, k))

    def _sentence_vectors(self, served: _Served) -> tuple[np.ndarray, np.ndarray]:
        """Every row's sentence vector, read once per version and scanned exactly: 1.5 KB a row,
        so 150 MB at 100k chunks, the most the semantic mode's build suits (docs/retrieval.md,
        The default mode)."""
        if served.sentences is None:
            rows = self._query("SELECT id, sentence_vector FROM chunks WHERE sentence_vector IS NOT NULL")
            rowids = np.array([rowid for rowid, _ in rows], dtype=np.int64)
            matrix = np.frombuffer(b"".join(blob for _, blob in rows), dtype=np.float32)
            served.sentences = (rowids, matrix.reshape(len(rowids), SENTENCE_DIM))
        return served.sentences

    def _vector_lists(self, served: _Served, numbers: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        missing = [n for n in numbers.tolist() if n not in served.lists]
        if missing:
            marks = ", ".join("?" * len(missing))
            sql = f"SELECT list, rowids, vectors FROM vector_lists WHERE list IN ({marks})"
            for number, rowid_blob, vector_blob in self._query(sql, missing):
                served.keep_list(number, np.frombuffer(rowid_blob, dtype=np.int32), _vectors(vector_blob))
        found = []
        for number in numbers.tolist():
            if number in served.lists:
                served.lists.move_to_end(number)
                found.append(served.lists[number])
        return found

    def _chunk_ids(self, rowids: list[int]) -> list[str]:
        known = self._served().chunk_ids
        missing = [r for r in rowids if r not in known]
        if missing:
            sql = f"SELECT id, chunk_id FROM chunks WHERE id IN ({', '.join('?' * len(missing))})"
            found = dict(self._query(sql, missing))
            if len(known) < _CHUNK_ID_CACHE_ROWS:
                known.update(found)
            return [known.get(r) or found[r] for r in rowids]
        return [known[r] for r in rowids]

    def fetch(self, chunk_ids: Sequence[str]) -> dict[str, StoredChunk]:
        return {row[0]: StoredChunk(*row) for row in self._rows_of(chunk_ids, _DISPLAY_COLUMNS)}

    def candidates(self, chunk_ids: Sequence[str]) -> dict[str, Candidate]:
        found = {}
        for row in self._rows_of(chunk_ids, (*_DISPLAY_COLUMNS, *LEMMA_FIELD_COLUMNS, "sentence_vector")):
            shown, lemmas, sentence = row[: len(_DISPLAY_COLUMNS)], row[len(_DISPLAY_COLUMNS) : -1], row[-1]
            found[row[0]] = Candidate(
                StoredChunk(*shown),
                dict(zip(LEMMA_FIELD_COLUMNS, lemmas, strict=True)),
                None if sentence is None else np.frombuffer(sentence, dtype=np.float32),
            )
        return found

    def _rows_of(self, chunk_ids: Sequence[str], columns: Sequence[str]) -> list[tuple]:
        """`columns` of the rows of `chunk_ids` that exist: one query (the Elasticsearch index's
        `_mget` twin)."""
        if not chunk_ids:
            return []
        placeholders = ", ".join("?" * len(chunk_ids))
        sql = f"SELECT {', '.join(columns)} FROM chunks WHERE chunk_id IN ({placeholders})"
        return self._query(sql, list(chunk_ids))

    def stats(self) -> IndexStats:
        with self._scan() as db:
            courses = dict(
                self._query(
                    "SELECT course, COUNT(DISTINCT doc_id) FROM chunks GROUP BY course ORDER BY course", db=db
                )
            )
            ((chunks,),) = self._query("SELECT COUNT(*) FROM chunks", db=db)
            meta = dict(self._query("SELECT key, value FROM meta", db=db))
        return IndexStats(
            backend=self.kind,
            location=self.location,
            entries=sum(courses.values()),
            chunks=chunks,
            courses=courses,
            published_at=meta.get("published_at"),
            confirmed_at=meta.get("confirmed_at", meta.get("published_at")),
            reranker=meta.get("reranker"),
        )

    def chunk_hashes(self) -> dict[str, str]:
        with self._scan() as db:
            return dict(self._query("SELECT chunk_id, content_hash FROM chunks", db=db))

    def analysis_fingerprint(self) -> str | None:
        return self._meta_value("analysis_fingerprint")

    def served_sources(self) -> dict[str, list[str]]:
        try:
            recorded = self._meta_value("content_sources")
        except (IndexNotFoundError, IndexDamagedError):  # nothing to keep: the publish rebuilds it all
            return {}
        finally:
            self.close()
        return json.loads(recorded) if recorded else {}

    def close(self) -> None:
        if self._reader is not None and not self._snapshot_depth:
            self._reader.close()
        self._reader = None
        self._served_version = None
