"""Helpers for the two SQLite files this project writes (the index and the NLP cache)."""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Primary result codes (the low byte of sqlite_errorcode).
_READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 8, 10, 11, 13, 14, 26
# Below this much free space a failed write is put down to a full disk.
_NEARLY_FULL_BYTES = 16 << 20


@contextmanager
def immediate_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """All or nothing; taking the write lock up front keeps readers on the last committed state.

    `db` must be in autocommit mode (`isolation_level=None`) so this controls the transaction.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _code(exc: sqlite3.Error) -> int:
    return (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF


def is_damaged(exc: sqlite3.Error) -> bool:
    """The file is not a database, or its pages are malformed: reading it again will not help.

    A damaged page can also surface as stored text that is not UTF-8, which Python's driver
    reports without an SQLite error code.
    """
    undecodable = getattr(exc, "sqlite_errorcode", None) is None and "decode" in str(exc)
    return _code(exc) in (_CORRUPT, _NOTADB) or undecodable


def cannot_open_for_writing(exc: sqlite3.Error) -> bool:
    return _code(exc) in (_READONLY, _CANTOPEN)


def disk_is_full(exc: sqlite3.Error, path: Path) -> bool:
    if _code(exc) == _FULL:
        return True
    if _code(exc) != _IOERR:
        return False
    try:
        return shutil.disk_usage(path.parent).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def describe(exc: sqlite3.Error, path: Path) -> str:
    """One line a user can act on, naming the file and the cause."""
    where = path.resolve()
    if disk_is_full(exc, path):
        return f"the disk holding {where} is full (SQLite: {exc})"
    if is_damaged(exc):
        return f"{where} is damaged ({exc})"
    if cannot_open_for_writing(exc):
        return f"{where} cannot be opened for writing ({exc}); check the permissions of {where.parent}"
    return f"{where}: {exc}"


def set_aside(path: Path) -> Path:
    """Move a damaged database (and its WAL files) out of the way; returns where it went."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    path.rename(aside)
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return aside
