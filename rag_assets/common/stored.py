"""Step outputs kept on disk under the digest of everything they were made from.

A refresh whose source did not change finds each step's output already made, and hands on a
small `StoredValue` instead of recomputing, re-storing and reloading a million rows at every
step. A digest names the inputs, settings and code of a value, so a stored value is never
reused for anything else; only the newest few of each step are kept.

A value is stored in parts of `PART_ROWS` rows (frames, and values that can `split` and `join`
themselves), so a step can read it part by part: at a million chunks the publish reads chunks,
lemmas and vectors 50,000 rows at a time instead of holding 3 GB of them at once.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import pickle
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd

from rag_assets.common.errors import RagError
from rag_assets.common.memory import release_freed_memory

# The newest value and the one before it: enough to re-execute the last run's steps and to reuse
# a source that changed back; at a million chunks a generation of values is 3.3 GB on disk.
KEEP_PER_STEP = 2
PART_ROWS = 50_000
# The layout of the stored file; values stored in another layout are made anew.
_FORMAT = 2
SERVED_FILENAME = "served.json"


def course_folder(course: str) -> str:
    """A folder name for any course name: readable, and distinct for distinct names."""
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in course)[:60]
    return f"{readable}-{hashlib.sha256(course.encode()).hexdigest()[:8]}"


def digest(*parts: object) -> str:
    """A stable name for a value made from `parts` (strings, numbers, other digests)."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:32]


def code_digest(*modules: ModuleType) -> str:
    """The source of the modules that make a value: editing them makes new values."""
    return digest(*(inspect.getsource(module) for module in modules))


class StoredValueError(RagError):
    pass


@dataclass(frozen=True)
class StoredValue:
    """A handle on one stored output: what Dagster passes between steps.

    `facts` are figures computed once when the value was made (counts, previews, digests of
    columns), so a step that reuses the value can report them without loading it.
    """

    step: str
    digest: str
    path: str
    facts: dict[str, Any] = field(default_factory=dict)
    reused: bool = False

    def load(self, columns: list[str] | None = None) -> Any:
        """The whole value; of a frame, only `columns` (taken part by part: the other columns of a
        million rows are never held)."""
        stored = self._read()
        join, rows = next(stored)
        parts = stored if columns is None else (part[columns] for part in stored)
        return join(parts, rows) if join else next(parts)

    def parts(self) -> Iterator[Any]:
        """The value `PART_ROWS` rows at a time (a value that cannot be split: whole)."""
        stored = self._read()
        next(stored)
        yield from stored

    def _read(self) -> Iterator[Any]:
        """The header (how to join the parts, how many rows), then each part as it is read."""
        try:
            with open(self.path, "rb") as stored:
                join, rows, count = pickle.load(stored)
                yield join, rows
                for _ in range(count):
                    yield pickle.load(stored)
        except FileNotFoundError as exc:
            raise StoredValueError(
                f"the stored {self.step} value {self.path} is no longer kept (only the newest "
                f"{KEEP_PER_STEP} of each step are); run the whole refresh, which makes it anew"
            ) from exc
        except (OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
            raise StoredValueError(
                f"the stored {self.step} value {self.path} cannot be read ({exc}); "
                "delete it and run the refresh again"
            ) from exc


@dataclass(frozen=True)
class InMemory:
    """A value that was not stored, read part by part like a stored one."""

    value: Any

    def parts(self) -> Iterator[Any]:
        return split(self.value)[2]


@dataclass(frozen=True)
class Chained:
    """Several values read part by part as one: the parts of the first, then of the next."""

    values: list[Any]

    def parts(self) -> Iterator[Any]:
        for value in self.values:
            yield from value.parts()


def split(value: Any) -> tuple[Callable[[Iterable[Any], int], Any] | None, int, Iterator[Any]]:
    """How to join `value`'s parts again, its rows, and its parts of `PART_ROWS` rows.

    A frame is sliced; a value with `split(rows)` and `join(parts, rows)` splits itself; anything
    else is one part, joined by nothing.
    """
    if isinstance(value, pd.DataFrame):
        starts = range(0, max(len(value), 1), PART_ROWS)  # an empty frame: one part, its columns
        return _join_frames, len(value), (value.iloc[start : start + PART_ROWS] for start in starts)
    if hasattr(value, "split") and hasattr(value, "join"):
        return type(value).join, len(value), value.split(PART_ROWS)
    return None, 1, iter([value])


def _join_frames(parts: Iterable[pd.DataFrame], rows: int) -> pd.DataFrame:
    return pd.concat(list(parts), ignore_index=True)


class ValueStore:
    """`<directory>/<step>/<digest>.pkl` with its facts beside it in `<digest>.json`.

    The facts file is written last, so a value counts as stored only once it is complete.
    Each course keeps its values in a store of its own (`for_course`): steps running at the same
    time never prune each other's values. The values the served index was published from are
    kept whatever their age (`keep_served`), since a later publish reads them again for a course
    a rule refused. A value a blocking check refused is marked beside it (`refuse`).
    """

    def __init__(self, directory: Path | str, root: Path | str | None = None) -> None:
        self.directory = Path(directory)
        self.root = Path(root) if root is not None else self.directory

    def for_course(self, course: str) -> ValueStore:
        return ValueStore(self.root / "courses" / course_folder(course), self.root)

    def keep_served(self, digests: Iterable[str]) -> None:
        """Record the digests of the values the served index holds: pruning never removes them."""
        served = sorted(set(digests))
        _write_atomically(self.root / SERVED_FILENAME, lambda out: out.write(json.dumps(served).encode()))

    def _served(self) -> set[str]:
        try:
            return set(json.loads((self.root / SERVED_FILENAME).read_text()))
        except (OSError, ValueError):
            return set()

    def refuse(self, value: StoredValue, check: str, reason: str) -> None:
        """Mark a value a blocking check refused: no later step or run may build on it, even
        though it stays the asset's newest output until a good one replaces it."""
        _write_atomically(self._refusal_path(value, check), lambda out: out.write(reason.encode()))

    def accept(self, value: StoredValue, check: str) -> None:
        self._refusal_path(value, check).unlink(missing_ok=True)

    def refusal(self, value: StoredValue) -> str | None:
        """Why the value was refused (each check that refused it), or None."""
        found = sorted(self.directory.glob(f"{value.step}/{value.digest}.*.refused"))
        return "; ".join(f"{path.suffixes[-2][1:]}: {path.read_text()}" for path in found) or None

    def _refusal_path(self, value: StoredValue, check: str) -> Path:
        return self.directory / value.step / f"{value.digest}.{check}.refused"

    def find(self, step: str, value_digest: str) -> StoredValue | None:
        pickled, facts_file = self._paths(step, value_digest)
        try:
            facts = json.loads(facts_file.read_text())
            if pickled.stat().st_size != facts["_bytes"] or facts.get("_format") != _FORMAT:
                return None
        except (OSError, ValueError, KeyError):
            return None
        for path in (pickled, facts_file):
            os.utime(path)  # newest first when pruning
        return StoredValue(step, value_digest, str(pickled), facts, reused=True)

    def save(self, step: str, value_digest: str, value: Any, facts: dict[str, Any]) -> StoredValue:
        pickled, facts_file = self._paths(step, value_digest)
        pickled.parent.mkdir(parents=True, exist_ok=True)
        size = _write_atomically(pickled, lambda out: _dump_parts(value, out))
        facts = {**facts, "_bytes": size, "_format": _FORMAT}
        _write_atomically(facts_file, lambda out: out.write(json.dumps(facts).encode()))
        self._prune(step)
        return StoredValue(step, value_digest, str(pickled), facts)

    def find_or_make(
        self, step: str, value_digest: str, make: Callable[[], tuple[Any, dict[str, Any]]]
    ) -> StoredValue:
        """The stored value of this digest, or `make()`'s (value, facts) stored under it.

        A value made here is let go once stored, and the memory its making freed is handed back
        before the run's next step (`release_freed_memory`).
        """
        found = self.find(step, value_digest)
        if found is not None:
            return found
        stored = self.save(step, value_digest, *make())
        release_freed_memory()
        return stored

    def _paths(self, step: str, value_digest: str) -> tuple[Path, Path]:
        folder = self.directory / step
        return folder / f"{value_digest}.pkl", folder / f"{value_digest}.json"

    def _prune(self, step: str) -> None:
        served = self._served()
        facts = sorted(
            (path for path in (self.directory / step).glob("*.json") if path.stem not in served),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for old in facts[KEEP_PER_STEP:]:
            for path in (old, old.with_suffix(".pkl"), *old.parent.glob(f"{old.stem}.*.refused")):
                path.unlink(missing_ok=True)


def _dump_parts(value: Any, out: Any) -> None:
    join, rows, parts = split(value)
    parts = list(parts)  # slices and views: no copy of the rows
    pickle.dump((join, rows, len(parts)), out, protocol=5)
    for part in parts:
        pickle.dump(part, out, protocol=5)


def _write_atomically(path: Path, write: Callable[[Any], object]) -> int:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as out:
            write(out)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path.stat().st_size
