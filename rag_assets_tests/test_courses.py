"""Courses in one run: shards of courses as steps, a refused course kept as served, course names
as data, a refused source never built on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from spacy.language import Language

from rag_assets.common.stored import StoredValue
from rag_assets.definitions import load_definitions, with_resources
from rag_assets.defs.courses import CourseSet, Refusal
from rag_assets.defs.resources import QualityResource
from rag_assets.index.embedded import EmbeddedIndex
from rag_assets.retrieval import Retriever

from .conftest import entry, write_json
from .test_definitions import COURSE_ASSETS, materialize, run_resources

HOW = "How do I fix error"
# Distinct entries that leave no lemma: a course of them is refused by its lemma rule.
STOP_WORDS = [
    *("the", "a", "an", "of", "and", "or", "to", "in", "on", "at"),
    *("by", "for", "with", "is", "it", "be", "as", "was", "are", "this"),
]


def faq(tmp_path: Path, courses: dict[str, int], answer: str = "Restart service") -> str:
    """A flat source with `n` distinct entries per course."""
    entries = [
        entry(course, f"{HOW} {n} in {course}?", f"{answer} {n} of the {course} stack.")
        for course, n_entries in courses.items()
        for n in range(n_entries)
    ]
    return str(write_json(tmp_path / "faq.json", entries))


def served_hashes(data_dir: Path) -> dict[str, str]:
    return EmbeddedIndex(data_dir).chunk_hashes()


def source_value(courses: dict[str, int]) -> StoredValue:
    return StoredValue("faq_source", "d" * 32, "/nowhere", {"courses": courses})


def test_shards_pack_whole_courses_in_name_order() -> None:
    sizes = {"a": 4_000, "b": 5_000, "c": 2_000, "d": 25_000, "e": 10}
    courses = CourseSet(source_value(sizes), {course: {} for course in sizes})
    shards = courses.shards()
    assert [sorted(shard.values) for shard in shards] == [["a", "b"], ["c"], ["d"], ["e"]]
    assert sum(len(shard.values) for shard in shards) == len(sizes)  # each course in one shard
    tiny = CourseSet(source_value({f"c{n:03}": 4 for n in range(200)}), {f"c{n:03}": {} for n in range(200)})
    assert len(tiny.shards()) == 1  # two hundred small courses: one step


def test_a_refused_course_stays_out_of_the_shards_and_comes_back_when_joined() -> None:
    refusal = Refusal("lemmas", "lemmas_well_formed", "no lemmas")
    courses = CourseSet(source_value({"a": 1, "b": 1}), {"a": {}}, {"b": refusal})
    [shard] = courses.shards()
    assert list(shard.values) == ["a"] and shard.refused == {}
    assert courses.joined([shard]).refused == {"b": refusal}
    assert courses.courses == ["a", "b"]


def test_a_refused_course_stays_as_served_and_holds_no_other_course_back(tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    data = tmp_path / "data"
    source = faq(tmp_path, {"alpha": 20, "beta": 20})
    assert materialize(source, data, instance).success
    before = served_hashes(data)

    # beta's answers become stop words only: its lemma rule refuses it; alpha's update goes on
    entries = [
        entry(
            "alpha",
            f"{HOW} {n} in alpha?",
            f"{'Reinstall' if n < 3 else 'Restart'} service {n} of the alpha stack.",
        )
        for n in range(20)
    ] + [entry("beta", word, f"{word} of and", section="the") for word in STOP_WORDS]
    write_json(tmp_path / "faq.json", entries)
    second = materialize(source, data, instance)
    assert not second.success  # not everything was refreshed
    check = second.checks()["lemmas_well_formed"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert check.description.startswith("course 'beta': ")
    published = second.metadata("es_index")
    assert (published["courses_refreshed"], published["courses_as_served"]) == (["alpha"], ["beta"])
    assert published["refusals"]["beta"].startswith("lemmas_well_formed: ")
    assert "| beta     |         0 |        0 | refused here: " in second.metadata("lemmas")["per_course"]
    after = served_hashes(data)
    assert {c for c in after if c.startswith("beta")} == {c for c in before if c.startswith("beta")}
    assert all(after[c] == before[c] for c in after if c.startswith("beta"))  # beta as it was
    assert published["upserted"] == 3  # alpha's three edited answers, nothing else
    assert second.refresh.problems == (f"lemmas_well_formed: {check.description}",)


def test_every_course_refused_blocks_the_publish(tmp_path: Path) -> None:
    data = tmp_path / "data"
    source = write_json(
        tmp_path / "faq.json", [entry("beta", w, f"{w} of and", section="the") for w in STOP_WORDS]
    )
    run = materialize(str(source), data, dg.DagsterInstance.ephemeral())
    assert not run.success
    assert run.checks()["lemmas_well_formed"].severity == dg.AssetCheckSeverity.ERROR
    assert run.materializations("embeddings") == [] and not (data / "index.sqlite").exists()


def test_a_gone_course_is_refused_by_the_guard_then_removed_when_allowed(tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    data = tmp_path / "data"
    assert materialize(faq(tmp_path, {"alpha": 20, "beta": 5}), data, instance).success

    only_alpha = faq(tmp_path, {"alpha": 20})
    refused = materialize(only_alpha, data, instance)
    assert not refused.success and refused.materializations("raw_documents") == []
    guard = refused.checks()["faq_source_count_guard"]
    assert "course 'beta' is no longer in the source" in guard.description
    assert sorted(EmbeddedIndex(data).stats().courses) == ["alpha", "beta"]  # never silently dropped

    allowed = materialize(
        only_alpha, data, instance, quality_settings=QualityResource(max_course_entry_drop=1)
    )
    assert allowed.success
    assert allowed.metadata("es_index")["courses_removed"] == ["beta"]
    assert list(EmbeddedIndex(data).stats().courses) == ["alpha"]


def test_a_source_its_checks_refused_is_never_built_on(tmp_path: Path) -> None:
    """The refused value stays the asset's newest output: a later run of the course assets
    alone (`--select 'raw_documents*'`) must not read it."""
    instance = dg.DagsterInstance.ephemeral()
    data = tmp_path / "data"
    source = faq(tmp_path, {"alpha": 20, "beta": 20})
    assert materialize(source, data, instance).success
    before = served_hashes(data)
    faq(tmp_path, {"alpha": 20, "beta": 4})  # beta cut from 20 to 4 entries: over the allowed drop
    refused = materialize(source, data, instance)
    assert not refused.checks()["faq_source_count_guard"].passed

    definitions = with_resources(load_definitions(), run_resources(source, data))
    downstream = definitions.get_implicit_global_asset_job_def().get_subset(
        asset_selection={dg.AssetKey(asset) for asset in (*COURSE_ASSETS, "es_index")}
    )
    run = downstream.execute_in_process(instance=instance, raise_on_error=False)
    assert not run.success
    [failure] = [e.step_failure_data.user_failure_data.description for e in run.get_step_failure_events()]
    assert "was refused (faq_source_count_guard: " in failure and "nothing is built on it" in failure
    assert served_hashes(data) == before


def test_course_names_are_data_not_paths(tmp_path: Path, nlp: Language) -> None:
    names = ["x", "x/y", "X", "a.b", "../up", "Ünïcødé курс", "c" * 300]
    instance = dg.DagsterInstance.ephemeral()
    data = tmp_path / "data"
    source = faq(tmp_path, dict.fromkeys(names, 3))
    every_answer_changes = QualityResource(max_answer_churn=1)
    for answer in ("Restart service", "Reboot service"):  # the second refresh reads stored values
        faq(tmp_path, dict.fromkeys(names, 3), answer=answer)
        run = materialize(source, data, instance, quality_settings=every_answer_changes)
        assert run.success, run.refresh.problems
    index = EmbeddedIndex(data)
    assert sorted(index.stats().courses) == sorted(names)
    retriever = Retriever(index, nlp)
    for name in names:
        [hit, *_] = retriever.search(f"{HOW} 1 in {name}?", course=name)
        assert (hit.course, hit.question) == (name, f"{HOW} 1 in {name}?")
    assert not (data / "up").exists()


def test_several_shards_build_what_one_shard_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = {"alpha": 12, "beta": 12, "gamma": 12}
    one = materialize(faq(tmp_path, sizes), tmp_path / "one", dg.DagsterInstance.ephemeral())
    monkeypatch.setenv("RAG_SHARD_ROWS", "12")  # a course a step
    three = materialize(faq(tmp_path, sizes), tmp_path / "three", dg.DagsterInstance.ephemeral())
    assert one.success and three.success
    steps = {log.step_key for log in three.logs() if log.step_key and "lemmas_of_shard" in log.step_key}
    assert steps == {f"lemmas.lemmas_of_shard[shard_{n}]" for n in range(3)}
    assert served_hashes(tmp_path / "one") == served_hashes(tmp_path / "three")


def test_two_hundred_tiny_courses_are_one_step_per_asset(tmp_path: Path) -> None:
    names = [f"course-{n:03}" for n in range(200)]
    run = materialize(
        faq(tmp_path, dict.fromkeys(names, 4)), tmp_path / "data", dg.DagsterInstance.ephemeral()
    )
    assert run.success, run.refresh.problems
    shard_steps = {log.step_key for log in run.logs() if log.step_key and "_of_shard[" in log.step_key}
    assert len(shard_steps) == 4
    assert len(EmbeddedIndex(tmp_path / "data").stats().courses) == 200


@pytest.mark.slow
def test_steps_in_other_processes_share_the_runs_data_directory(tmp_path: Path) -> None:
    """RAG_EXECUTOR=multiprocess: each step in a process of its own, two at a time, two shards
    per course asset; the steps take the directory as their run's. The source and the first two
    course assets only: each step costs a process start (about 6 s here), and the steps after
    them run the same way (the whole graph on separate workers: the rehearsal's Celery run)."""
    source = faq(tmp_path, {"alpha": 30, "beta": 30})
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "RAG_DATA_DIR": str(tmp_path / "data"),
        "DOCUMENTS_URL": source,
        "RAG_NLP_PROCESSES": "1",
        "RAG_EXECUTOR": "multiprocess",
        "RAG_SHARD_ROWS": "30",  # a course a step
    }
    dagster = str(Path(sys.executable).parent / "dagster")
    selection = "faq_source,raw_documents,chunks"
    command = [dagster, "asset", "materialize", "--select", selection, "-m", "rag_assets.definitions"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "RUN_SUCCESS" in output
    with dg.DagsterInstance.from_config(str(home)) as instance:
        # From the run's events, not the console: the processes' log lines can interleave there.
        [run] = instance.get_run_records()
        succeeded = instance.all_logs(run.dagster_run.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)
        shard_steps = sorted(entry.step_key for entry in succeeded if "_of_shard[" in (entry.step_key or ""))
        assert shard_steps == [
            f"{asset}.{asset}_of_shard[shard_{n}]" for asset in ("chunks", "raw_documents") for n in (0, 1)
        ]
        pids = {entry.dagster_event.pid for entry in succeeded if entry.dagster_event is not None}
        assert len(pids) > 1  # the steps ran in processes of their own
        chunked = instance.get_latest_materialization_event(dg.AssetKey("chunks"))
        assert chunked is not None and chunked.asset_materialization.metadata["chunks"].value == 60


@pytest.mark.slow
def test_dg_lists_the_assets_the_job_and_the_checks(tmp_path: Path) -> None:
    """`dg list defs` and `dg check defs`, as the project's dg configuration loads them."""
    dg_cli = str(Path(sys.executable).parent / "dg")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "RAG_DATA_DIR": str(tmp_path)}
    checked = subprocess.run([dg_cli, "check", "defs"], cwd=root, env=env, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    listed = subprocess.run(
        [dg_cli, "list", "defs", "--json"], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    defs = json.loads(listed.stdout)
    assets = {a["asset_key"]: a for a in defs["assets"]}
    assert set(assets) == {"faq_source", "raw_documents", "chunks", "lemmas", "embeddings", "es_index"}
    assert [j["name"] for j in defs["jobs"]] == ["faq_index_refresh"]
    assert {s["name"] for s in defs["sensors"]} == {"initial_index_build"}
    assert len(defs["asset_checks"]) == 9
