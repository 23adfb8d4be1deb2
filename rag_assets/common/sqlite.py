"""Helpers for the two SQLite files this project writes (the index and the NLP cache)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def immediate_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """All or nothing; taking the write lock up front keeps readers on the last committed state.

    `db` must be in autocommit mode (`isolation_level=None`) so this controls the transaction.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
