"""Damaged answers are never served: the course content checks and the publish gate each refuse
blanked, shuffled and repeated answers on their own, a refused course stays as served while the
others publish, and ids survive a reordered source. Real refreshes of the real 2025 snapshot with
one course edited, as an operator's fault matrix found them (issue 26)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from rag_assets import quality
from rag_assets.defs.resources import QualityResource
from rag_assets.index.embedded import EmbeddedIndex

from .conftest import DATA, write_json
from .test_definitions import RefreshEvents, materialize

ROOT = Path(__file__).resolve().parents[1]
COURSE, OTHER = "mlops-zoomcamp", "data-engineering-zoomcamp"
Groups = list[dict[str, Any]]
CONTENT_CHECKS_OFF = {"max_blank_answer_share": 1.0, "max_duplicate_share": 1.0, "max_answer_churn": 1.0}


def snapshot() -> Groups:
    return json.loads((DATA / "documents-2025.json").read_text())


def edited(
    groups: Groups, course: str, edit: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
) -> Groups:
    return [{**g, "documents": edit(g["documents"])} if g["course"] == course else g for g in groups]


def answers(new: Callable[[int, str], str]) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    return lambda documents: [{**d, "text": new(n, d["text"])} for n, d in enumerate(documents)]


def shuffled(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    texts = [d["text"] for d in documents]
    random.Random(26).shuffle(texts)
    return [{**d, "text": text} for d, text in zip(documents, texts, strict=True)]


@pytest.fixture(scope="module")
def served_2025(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory serving the 2025 snapshot, copied by each test (values and NLP cache
    included, so a test's refresh computes only the course it edits)."""
    data = tmp_path_factory.mktemp("served") / "data"
    source = write_json(data.parent / "faq.json", snapshot())
    assert materialize(str(source), data, dg.DagsterInstance.ephemeral()).success
    return data


@pytest.fixture
def serving(served_2025: Path, tmp_path: Path) -> Path:
    shutil.copytree(served_2025, tmp_path / "data")
    return tmp_path / "data"


def course_rows(data: Path, course: str) -> dict[str, str]:
    """chunk id -> content hash of one course as served."""
    index = EmbeddedIndex(data)
    hashes = index.chunk_hashes()
    chunks = index.fetch(sorted(hashes))
    return {chunk_id: hashes[chunk_id] for chunk_id in hashes if chunks[chunk_id].course == course}


def refresh(groups: Groups, data: Path, **quality: float) -> RefreshEvents:
    source = write_json(data.parent / "faq.json", groups)
    overrides = {"quality_settings": QualityResource(**quality)} if quality else {}
    return materialize(str(source), data, dg.DagsterInstance.ephemeral(), **overrides)


def test_blanked_answers_keep_the_course_as_served_and_the_others_publish(serving: Path) -> None:
    """Case 3: every answer of one course empty, and an ordinary edit of another course, through
    `make run`: the edit is published, the course stays as served, the last lines say why."""
    before = course_rows(serving, COURSE)
    groups = edited(snapshot(), COURSE, answers(lambda n, text: ""))
    groups = edited(groups, OTHER, answers(lambda n, text: text + " Updated for 2026." if n == 3 else text))
    source = write_json(serving.parent / "faq.json", groups)
    env = {**os.environ, "RAG_DATA_DIR": str(serving), "DOCUMENTS_URL": str(source), "RAG_NLP_PROCESSES": "1"}
    env.pop("DAGSTER_HOME", None)
    done = subprocess.run(
        [sys.executable, "-m", "rag_assets.defs.refresh"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-5:]
    assert last[0].startswith("refresh: run ") and last[0].endswith(" did not do everything:")
    assert last[1] == (
        f"refresh:   raw_documents_content: course '{COURSE}': 138 of 138 answers are empty or have no "
        "words (100.0%), more than the allowed 10% (RAG_MAX_BLANK_ANSWER_SHARE) (refused, kept as "
        "served; 2 other courses go on)"
    )
    assert last[2].startswith("refresh: published 948 entries (963 chunks) of 3 courses to ")
    assert last[2].endswith(": 1 written, 0 deleted, 962 unchanged"), last
    assert last[3] == f"refresh: kept as served (refused by a check): {COURSE}"
    assert last[4].startswith("refresh: now served: 948 entries at ")
    assert "no longer in the source" not in done.stdout + done.stderr
    assert course_rows(serving, COURSE) == before
    index = EmbeddedIndex(serving)
    assert index.stats().courses[COURSE] == 138
    updated = [chunk for chunk in index.fetch(sorted(course_rows(serving, OTHER))).values()]
    assert sum(chunk.text.endswith("Updated for 2026.") for chunk in updated) == 1


@pytest.mark.parametrize(
    ("damage", "check", "reason"),
    [
        (
            answers(lambda n, text: "."),
            "raw_documents_content",
            "138 of 138 answers are empty or have no words",
        ),
        (
            shuffled,
            "chunks_answer_churn",
            "of the 138 entries it serves would change their answer",
        ),
    ],
    ids=["answers replaced by '.'", "answers shuffled"],
)
def test_each_layer_refuses_damaged_answers_on_its_own(
    serving: Path, damage: Callable, check: str, reason: str
) -> None:
    """Cases 1 and 2: the course check refuses the course (kept as served); with that check
    switched off, the publish gate's answer probes refuse the whole publish."""
    before = EmbeddedIndex(serving).chunk_hashes()
    groups = edited(snapshot(), COURSE, damage)

    checked = refresh(groups, serving)
    evaluation = checked.checks()[check]
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
    assert evaluation.description.startswith(f"course '{COURSE}': ") and reason in evaluation.description
    assert f"| {COURSE} " in evaluation.metadata["per_course"].value  # each course's figures
    assert checked.metadata("es_index")["courses_as_served"] == [COURSE]
    assert EmbeddedIndex(serving).chunk_hashes() == before  # nothing else changed either

    gated = refresh(groups, serving, **CONTENT_CHECKS_OFF)
    assert all(e.passed for e in gated.checks().values() if e.check_name != "es_index_matches_chunks")
    [refusal] = gated.failures()
    assert refusal.startswith("publish refused, the served index is unchanged: "), refusal
    assert f"course '{COURSE}': its served answers would be found at their entries for " in refusal
    assert "(RAG_MAX_ANSWER_PROBE_DROP)" in refusal
    assert EmbeddedIndex(serving).chunk_hashes() == before


def test_repeated_entries_are_refused_and_served_once_when_allowed(serving: Path) -> None:
    """Case 4: every entry of a course doubled."""
    before = course_rows(serving, COURSE)
    doubled = edited(snapshot(), COURSE, lambda documents: documents + documents)

    refused = refresh(doubled, serving)
    evaluation = refused.checks()["raw_documents_content"]
    assert not evaluation.passed
    assert (
        f"course '{COURSE}': 138 of 276 entries repeat another entry's question and answer (50.0%), "
        "more than the allowed 10% (RAG_MAX_DUPLICATE_SHARE)"
    ) in evaluation.description
    assert course_rows(serving, COURSE) == before

    allowed = refresh(doubled, serving, max_duplicate_share=1.0)
    assert allowed.success, allowed.refresh.problems
    assert EmbeddedIndex(serving).stats().courses[COURSE] == 138  # each entry once, with its own id
    assert course_rows(serving, COURSE) == before
    assert allowed.metadata("es_index")["upserted"] == 0


def test_a_reordered_source_rewrites_nothing(serving: Path) -> None:
    """Ids derived from (course, question, rank among identical questions by content): the
    snapshot's four repeated questions keep their ids when the source reverses its entries."""
    reordered = [{**g, "documents": g["documents"][::-1]} for g in snapshot()[::-1]]
    run = refresh(reordered, serving)
    assert run.success, run.refresh.problems
    published = run.metadata("es_index")
    assert (published["upserted"], published["deleted"]) == (0, 0)


def test_the_real_snapshots_publish_both_ways_without_any_setting(tmp_path: Path) -> None:
    """2025 -> 2024-06 (the served index goes back a year): every check and the gate pass."""
    data = tmp_path / "data"
    instance = dg.DagsterInstance.ephemeral()
    for snapshot_file in ("documents-2025.json", "documents-2024-06.json", "documents-2025.json"):
        run = materialize(str(DATA / snapshot_file), data, instance)
        assert run.success, run.refresh.problems
    churn = run.checks()["chunks_answer_churn"].metadata["per_course"].value
    assert COURSE in churn


def test_an_answer_probe_asks_with_the_answer_words_its_question_lacks() -> None:
    question = "Can I still join the course after the start date?"
    answer = "Yes.\nYes, even if you don't register, you're still eligible to submit the homeworks."
    assert (
        quality.answer_sentence(answer, question)
        == "Yes even if you don t register you re eligible to submit homeworks"
    )
    assert quality.answer_sentence(".", question) is None
    assert quality.answer_sentence("Join the course, I can!", question) is None  # nothing of its own
