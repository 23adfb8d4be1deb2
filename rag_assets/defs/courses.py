"""What the per-course assets hand on, and how their work is cut into steps.

Each of `raw_documents`, `chunks`, `lemmas` and `embeddings` is one Dagster asset whose value is
a `CourseSet`: every course of the source, with the stored values made for it so far, or the
reason it stopped (a rule it broke). The work inside each asset is fanned out as steps over
shards: whole courses packed together up to `SHARD_ROWS` rows, so a course is never split and
two hundred tiny courses cost one step, not two hundred. The executor decides where the steps
run; everything a step needs travels in its shard.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from rag_assets import settings
from rag_assets.common.stored import StoredValue

# About 10,000 chunks: 3-4 s of spaCy here, so a step's own overhead (about 0.1 s of Dagster
# events on a SQLite instance) stays small, and a large source has enough steps to spread.
SHARD_ROWS = 10_000


def shard_rows() -> int:
    """RAG_SHARD_ROWS, else SHARD_ROWS: the most rows of small courses packed into one step."""
    return settings.number(os.environ, "RAG_SHARD_ROWS", SHARD_ROWS)


@dataclass(frozen=True)
class Refusal:
    """Why a course stopped: the step and rule that refused its value, in the user's words."""

    step: str
    check: str
    reason: str


@dataclass(frozen=True)
class CourseSet:
    """The courses of one source: their values so far (course -> step -> value) and refusals.

    A refused course is carried along, not dropped: the publish keeps it as it is served, while
    a course no longer in the source at all is removed.
    """

    source: StoredValue
    values: dict[str, dict[str, StoredValue]] = field(default_factory=dict)
    refused: dict[str, Refusal] = field(default_factory=dict)
    # check -> course -> the figures its rule found, shown in the check's metadata
    figures: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    @property
    def courses(self) -> list[str]:
        """Every course the source names, refused or not."""
        return sorted({*self.values, *self.refused})

    def rows(self, course: str) -> int:
        """The course's size in rows of its newest value (chunks once there are chunks)."""
        newest = list(self.values[course].values())[-1] if self.values[course] else None
        if newest is None:
            return int(self.source.facts["courses"].get(course, 0))
        return int(newest.facts.get("chunks", newest.facts.get("entries", 0)))

    def shards(self, max_rows: int | None = None) -> list[CourseSet]:
        """The courses still going, packed in name order into shards of at most `max_rows` rows
        (`shard_rows()`; a larger course alone). The refusals stay out of them: `joined` adds them
        back."""
        max_rows = max_rows or shard_rows()
        shards: list[list[str]] = []
        rows = 0
        for course in sorted(self.values):
            size = self.rows(course)
            if not shards or rows + size > max_rows:
                shards.append([])
                rows = 0
            shards[-1].append(course)
            rows += size
        return [
            replace(self, values={c: self.values[c] for c in shard}, refused={}, figures={})
            for shard in shards
        ]

    def joined(self, shards: Iterable[CourseSet]) -> CourseSet:
        """This set's courses as the shards made them, with the refusals and figures from before
        and theirs."""
        values: dict[str, dict[str, StoredValue]] = {}
        refused = dict(self.refused)
        figures = {check: dict(found) for check, found in self.figures.items()}
        for shard in shards:
            values.update(shard.values)
            refused.update(shard.refused)
            for check, found in shard.figures.items():
                figures.setdefault(check, {}).update(found)
        return replace(
            self,
            values=dict(sorted(values.items())),
            refused=dict(sorted(refused.items())),
            figures={check: dict(sorted(found.items())) for check, found in figures.items()},
        )

    def refused_at(self, step: str) -> dict[str, Refusal]:
        return {course: refusal for course, refusal in self.refused.items() if refusal.step == step}

    def refused_by(self, check: str) -> dict[str, Refusal]:
        return {course: refusal for course, refusal in self.refused.items() if refusal.check == check}

    def build(
        self,
        step: str,
        make: Callable[[str, dict[str, StoredValue]], StoredValue],
        judge: Callable[[str, dict[str, StoredValue]], tuple[Refusal | None, dict[str, Any]]],
        progress: Callable[[], None],
    ) -> CourseSet:
        """Each course's value of `step` (`make`), kept only if `judge` (its refusal, if any, and
        the figures of each rule it applied) finds nothing wrong."""
        values: dict[str, dict[str, StoredValue]] = {}
        refused: dict[str, Refusal] = {}
        figures: dict[str, dict[str, dict[str, Any]]] = {}
        for course in sorted(self.values):
            made = {**self.values[course], step: make(course, self.values[course])}
            refusal, found = judge(course, made)
            for check, metadata in found.items():
                figures.setdefault(check, {})[course] = metadata
            if refusal is None:
                values[course] = made
            else:
                refused[course] = refusal
            progress()
        return replace(self, values=values, refused=refused, figures=figures)
