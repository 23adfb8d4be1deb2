"""The course as the unit of work: partitions from the source, runs per course, one publish."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from rag_assets.definitions import load_definitions, with_resources
from rag_assets.defs.assets import COURSES
from rag_assets.defs.automation import (
    COURSE_JOB_NAME,
    JOB_NAME,
    PUBLISH_JOB_NAME,
    course_run_digests,
    course_runs_after_source,
    publish_after_courses,
    publish_run_config,
)
from rag_assets.defs.resources import QualityResource
from rag_assets.index.embedded import EmbeddedIndex

from .conftest import entry, write_json
from .test_definitions import materialize, run_resources

HOW = "How do I fix error"


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


def test_a_failed_course_stays_as_served_and_holds_no_other_course_back(tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    data = tmp_path / "data"
    source = faq(tmp_path, {"alpha": 20, "beta": 20})
    assert materialize(source, data, instance).success
    before = served_hashes(data)

    # beta's answers become stop words only: its lemma check fails, its run stops before publishing
    entries = [
        entry("alpha", f"{HOW} {n} in alpha?", f"Reinstall service {n} of the alpha stack.")
        for n in range(20)
    ] + [entry("beta", "the", "the of and", section="the") for _ in range(20)]
    write_json(tmp_path / "faq.json", entries)
    second = materialize(source, data, instance)
    assert not second.success  # one course failed
    outcomes = {run.name: run.success for run in second.refresh.courses}
    assert outcomes == {"alpha": True, "beta": False}
    assert second.refresh.publish is not None and second.refresh.publish.success
    published = second.metadata("es_index")
    assert (published["courses_refreshed"], published["courses_as_served"]) == (["alpha"], ["beta"])
    after = served_hashes(data)
    assert {c for c in after if c.startswith("beta")} == {c for c in before if c.startswith("beta")}
    assert all(after[c] == before[c] for c in after if c.startswith("beta"))  # beta as it was
    assert all(after[c] != before[c] for c in after if c.startswith("alpha"))  # alpha refreshed


def test_a_gone_course_is_refused_by_the_guard_then_removed_when_allowed(tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    data = tmp_path / "data"
    assert materialize(faq(tmp_path, {"alpha": 20, "beta": 5}), data, instance).success
    assert sorted(instance.get_dynamic_partitions(COURSES.name)) == ["alpha", "beta"]

    only_alpha = faq(tmp_path, {"alpha": 20})
    refused = materialize(only_alpha, data, instance)
    assert not refused.success and refused.refresh.courses == []
    guard = refused.checks()["faq_source_count_guard"]
    assert "course 'beta' is no longer in the source" in guard.description
    assert sorted(EmbeddedIndex(data).stats().courses) == ["alpha", "beta"]  # never silently dropped

    allowed = materialize(
        only_alpha, data, instance, quality_settings=QualityResource(max_course_entry_drop=1)
    )
    assert allowed.success
    assert allowed.metadata("es_index")["courses_removed"] == ["beta"]
    assert list(EmbeddedIndex(data).stats().courses) == ["alpha"]
    assert instance.get_dynamic_partitions(COURSES.name) == ["alpha"]


def test_one_course_backfill_touches_only_that_course(tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    data = tmp_path / "data"
    source = faq(tmp_path, {"alpha": 10, "beta": 10})
    assert materialize(source, data, instance).success
    before = served_hashes(data)
    faq(tmp_path, {"alpha": 10, "beta": 10}, answer="Reboot service")  # both courses changed
    definitions = with_resources(load_definitions(), run_resources(source, data))
    assert definitions.resolve_job_def(JOB_NAME).execute_in_process(instance=instance).success

    run = definitions.resolve_job_def(COURSE_JOB_NAME).execute_in_process(
        instance=instance, partition_key="beta"
    )
    assert run.success
    touched = {(e.asset_key.to_user_string(), e.partition) for e in run.get_asset_materialization_events()}
    assert touched == {(asset, "beta") for asset in ("raw_documents", "chunks", "lemmas", "embeddings")}
    values = course_run_digests(instance, [run.run_id])
    assert list(values) == ["beta"]
    publish = definitions.resolve_job_def(PUBLISH_JOB_NAME).execute_in_process(
        instance=instance, run_config=publish_run_config(values)
    )
    [published] = publish.asset_materializations_for_node("es_index")
    assert published.metadata["courses_refreshed"].value == ["beta"]
    assert published.metadata["courses_as_served"].value == ["alpha"]
    assert published.metadata["upserted"].value == 10
    after = served_hashes(data)
    assert all(after[c] == before[c] for c in after if c.startswith("alpha"))
    assert all(after[c] != before[c] for c in after if c.startswith("beta"))


def test_the_sensors_run_each_course_then_publish_what_succeeded(tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    data = tmp_path / "data"
    definitions = with_resources(
        load_definitions(), run_resources(faq(tmp_path, {"alpha": 5, "beta": 5}), data)
    )
    source = definitions.resolve_job_def(JOB_NAME).execute_in_process(instance=instance)
    [success] = [e for e in source.all_events if e.event_type == dg.DagsterEventType.RUN_SUCCESS]
    context = dg.build_run_status_sensor_context(
        sensor_name="course_runs_after_source",
        dagster_instance=instance,
        dagster_run=source.dagster_run,
        dagster_event=success,
    )
    requested = course_runs_after_source(context)
    assert isinstance(requested, dg.SensorResult)
    assert [(r.partition_key, r.run_key) for r in requested.run_requests] == [
        ("alpha", f"{source.run_id}:alpha"),
        ("beta", f"{source.run_id}:beta"),
    ]
    [add, delete] = requested.dynamic_partitions_requests
    assert (list(add.partition_keys), list(delete.partition_keys)) == (["alpha", "beta"], [])

    instance.add_dynamic_partitions(COURSES.name, ["alpha", "beta"])
    nothing = publish_after_courses(dg.build_sensor_context(instance=instance))
    assert isinstance(nothing, dg.SkipReason) and "no course run finished" in nothing.skip_message
    course_job = definitions.resolve_job_def(COURSE_JOB_NAME)
    runs = [course_job.execute_in_process(instance=instance, partition_key=c) for c in ("alpha", "beta")]
    publish = publish_after_courses(dg.build_sensor_context(instance=instance))
    assert isinstance(publish, dg.SensorResult)
    [request] = publish.run_requests
    assert (
        request.run_config
        == publish_run_config(course_run_digests(instance, [r.run_id for r in runs])).to_config_dict()
    )
    assert set(request.run_config["ops"]["es_index"]["config"]["courses"]) == {"alpha", "beta"}
    again = publish_after_courses(dg.build_sensor_context(instance=instance, cursor=publish.cursor))
    assert isinstance(again, dg.SkipReason)  # these runs are published once


@pytest.mark.slow
def test_two_course_workers_build_the_same_index_as_one(tmp_path: Path) -> None:
    """`make run` with RAG_COURSE_WORKERS=2: two processes run the course runs side by side."""
    source = faq(tmp_path, {"alpha": 30, "beta": 30, "gamma": 30})
    built = {}
    for workers in (1, 2):
        home = tmp_path / f"home-{workers}"
        home.mkdir()
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "RAG_DATA_DIR": str(tmp_path / f"data-{workers}"),
            "DOCUMENTS_URL": source,
            "RAG_NLP_PROCESSES": "1",
            "RAG_COURSE_WORKERS": str(workers),
        }
        done = subprocess.run(
            [sys.executable, "-m", "rag_assets.defs.refresh"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "refresh: published 90 entries (90 chunks) of 3 courses" in done.stdout
        built[workers] = served_hashes(tmp_path / f"data-{workers}")
    assert built[1] == built[2] and len(built[1]) == 90


@pytest.mark.slow
def test_dg_lists_the_partitioned_assets_and_the_jobs_of_a_refresh(tmp_path: Path) -> None:
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
    assert {j["name"] for j in defs["jobs"]} >= {"faq_index_refresh", "course_refresh", "index_publish"}
    assert {s["name"] for s in defs["sensors"]} == {
        "initial_index_build",
        "course_runs_after_source",
        "publish_after_courses",
    }
