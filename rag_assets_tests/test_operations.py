"""Operations: the schedule, the first build, run timeouts, freshness and the asset checks."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from dagster._core.remote_origin import InProcessCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
from dagster._core.test_utils import create_run_for_test
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._daemon.monitoring import run_monitoring
from spacy.language import Language

from rag_assets import quality, settings
from rag_assets.common.errors import RagError
from rag_assets.common.lock import DirectoryLock
from rag_assets.definitions import load_definitions
from rag_assets.defs.automation import JOB_NAME, daily_document_refresh, initial_index_build
from rag_assets.defs.refresh import main as refresh_main
from rag_assets.defs.refresh import summary
from rag_assets.defs.resources import QualityResource, environment_resources
from rag_assets.index.backend import IndexContent
from rag_assets.index.embedded import EmbeddedIndex
from rag_assets.ingest.chunking import ChunkingConfig, make_chunks
from rag_assets.nlp.analysis import model_fingerprint
from rag_assets.nlp.features import ChunkVectors, embed_chunks, lemmatize_chunks
from rag_assets.retrieval import Retriever

from .conftest import DATA, eval_slice, write_json
from .test_definitions import materialize

ROOT = Path(__file__).resolve().parents[1]
defs = load_definitions()


@pytest.fixture
def instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dg.DagsterInstance]:
    """A persistent instance with the project's own dagster.yaml (run monitoring on), and a data
    directory of its own (RAG_DATA_DIR)."""
    monkeypatch.setenv("RAG_DATA_DIR", str(tmp_path / "data"))
    shutil.copy(ROOT / "dagster-instance.yaml", tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as real_instance:
        yield real_instance


def add_run(
    instance: dg.DagsterInstance, status: dg.DagsterRunStatus, job_name: str = JOB_NAME, **tags: str
) -> dg.DagsterRun:
    """A run of a job (by default the refresh job) in the given state, as the daemon would store it."""
    origin = RemoteJobOrigin(
        repository_origin=RemoteRepositoryOrigin(
            code_location_origin=InProcessCodeLocationOrigin(
                loadable_target_origin=LoadableTargetOrigin(module_name="rag_assets.definitions")
            ),
            repository_name="__repository__",
        ),
        job_name=job_name,
    )
    tags = {**defs.resolve_job_def(JOB_NAME).tags, **tags}
    return create_run_for_test(
        instance, job_name=job_name, status=status, tags=tags, remote_job_origin=origin
    )


# -- schedule -------------------------------------------------------------------------------


def test_schedule_starts_the_whole_refresh_daily_at_midnight_utc() -> None:
    schedule = defs.get_schedule_def("daily_document_refresh")
    assert schedule.cron_schedule == "0 0 * * *"
    assert schedule.execution_timezone == "UTC"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    assert schedule.job_name == JOB_NAME
    # one run of every asset, with the seed's limit
    job = defs.resolve_job_def(JOB_NAME)
    assert job.tags["dagster/max_runtime"] == "3600"
    assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} == {
        "faq_source", "raw_documents", "chunks", "lemmas", "embeddings", "es_index"
    }  # fmt: skip
    assert len(defs.resolve_asset_graph().asset_check_keys) == 9
    assert [sensor.name for sensor in defs.sensors] == ["initial_index_build"]


def test_schedule_settings_come_from_the_environment() -> None:
    env = {
        "RAG_SCHEDULE_CRON": "30 4 * * *",
        "RAG_SCHEDULE_TIMEZONE": "Europe/Berlin",
        "RAG_MAX_RUNTIME_S": "900",
    }
    assert (settings.schedule_cron(env), settings.schedule_timezone(env), settings.max_runtime_s(env)) == (
        "30 4 * * *",
        "Europe/Berlin",
        900,
    )


@pytest.mark.parametrize(
    ("setting", "env", "message"),
    [
        (settings.max_runtime_s, {"RAG_MAX_RUNTIME_S": "1h"}, "RAG_MAX_RUNTIME_S='1h' is not a whole number"),
        (
            settings.freshness_hours,
            {"RAG_FRESHNESS_WARN_HOURS": "1d"},
            "RAG_FRESHNESS_WARN_HOURS='1d' is not a number",
        ),
    ],
)
def test_a_bad_schedule_setting_is_named(setting, env: dict[str, str], message: str) -> None:
    with pytest.raises(RagError, match=re.escape(message)):
        setting(env)


def test_a_refresh_with_a_bad_setting_names_it_and_runs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make run` loads the definitions first; Dagster wraps a bad setting in its own errors,
    and the refresh prints the setting's message instead of their traceback."""
    monkeypatch.setenv("RAG_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("RAG_RERANKER", "smart")
    assert refresh_main([]) == 2
    assert capsys.readouterr().err == (
        "refresh: error: RAG_RERANKER='smart' is not one of none, features, semantic; "
        "nothing was run, the served index is unchanged\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_schedule_requests_a_run_when_idle(instance: dg.DagsterInstance) -> None:
    assert isinstance(daily_document_refresh(dg.build_schedule_context(instance=instance)), dg.RunRequest)
    add_run(instance, dg.DagsterRunStatus.SUCCESS)  # a refresh is one run: once it ended, nothing follows
    add_run(instance, dg.DagsterRunStatus.FAILURE)
    assert isinstance(daily_document_refresh(dg.build_schedule_context(instance=instance)), dg.RunRequest)


def test_a_killed_refresh_does_not_hold_back_the_next_tick(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    """`kill -9` of `make run`: the instance still says STARTED, but its claim on the data
    directory ended with its process; the tick runs, and the next run marks the dead one failed."""
    killed = add_run(instance, dg.DagsterRunStatus.STARTED)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from rag_assets.common.lock import DirectoryLock; "
         f"DirectoryLock({str(tmp_path / 'data')!r}).acquire({killed.run_id!r}); import time; time.sleep(60)"]
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while (
            not (tmp_path / "data" / "refresh.lock").exists()
            or "pids" not in (tmp_path / "data" / "refresh.lock").read_text()
        ):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        skip = daily_document_refresh(dg.build_schedule_context(instance=instance))
        assert isinstance(skip, dg.SkipReason) and killed.run_id in skip.skip_message  # alive: it waits
    finally:
        holder.kill()
        holder.wait()
    assert DirectoryLock(tmp_path / "data").ended_holder() == killed.run_id
    assert isinstance(daily_document_refresh(dg.build_schedule_context(instance=instance)), dg.RunRequest)


@pytest.mark.parametrize("status", [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.QUEUED])
def test_schedule_skips_while_a_run_is_in_flight(
    instance: dg.DagsterInstance, status: dg.DagsterRunStatus
) -> None:
    run = add_run(instance, status)
    skip = daily_document_refresh(dg.build_schedule_context(instance=instance))
    assert isinstance(skip, dg.SkipReason)
    assert skip.skip_message == (
        f"run {run.run_id} of {JOB_NAME} is still {status.value.lower()}; skipping this tick"
    )


def test_schedule_skips_while_a_materialization_from_the_ui_runs(instance: dg.DagsterInstance) -> None:
    run = add_run(instance, dg.DagsterRunStatus.STARTED, job_name="__ASSET_JOB")
    skip = daily_document_refresh(dg.build_schedule_context(instance=instance))
    assert isinstance(skip, dg.SkipReason)
    assert skip.skip_message == f"run {run.run_id} of __ASSET_JOB is still started; skipping this tick"


def test_initial_build_runs_at_once_when_no_index_exists(instance: dg.DagsterInstance) -> None:
    request = initial_index_build(dg.build_sensor_context(instance=instance))
    assert isinstance(request, dg.RunRequest)
    assert request.run_key == "initial-index-build"

    running = add_run(instance, dg.DagsterRunStatus.STARTED)
    busy = initial_index_build(dg.build_sensor_context(instance=instance))
    assert isinstance(busy, dg.SkipReason) and running.run_id in busy.skip_message

    instance.report_runless_asset_event(dg.AssetMaterialization("es_index"))
    done = initial_index_build(dg.build_sensor_context(instance=instance))
    assert isinstance(done, dg.SkipReason) and "has been published" in done.skip_message


def test_run_monitoring_fails_a_run_past_its_max_runtime(
    instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert instance.run_monitoring_enabled
    run = add_run(instance, dg.DagsterRunStatus.STARTED)
    record = instance.get_run_record_by_id(run.run_id)
    assert record is not None
    started = record.start_time or record.create_timestamp.timestamp()
    record = record._replace(start_time=started)
    logger = logging.getLogger("test")

    monkeypatch.setattr(run_monitoring, "get_current_timestamp", lambda: started + 3599)
    run_monitoring.check_run_timeout(instance, record, logger, 0)
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED

    monkeypatch.setattr(run_monitoring, "get_current_timestamp", lambda: started + 3601)
    run_monitoring.check_run_timeout(instance, record, logger, 0)
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE


# -- freshness ------------------------------------------------------------------------------


def test_freshness_policies_on_the_source_and_the_served_index() -> None:
    graph = defs.resolve_asset_graph()
    for key in ("faq_source", "es_index"):
        policy = graph.get(dg.AssetKey(key)).freshness_policy
        assert policy is not None, key
        assert policy.warn_window.to_timedelta() == timedelta(hours=25)
        assert policy.fail_window.to_timedelta() == timedelta(hours=37)
    assert graph.get(dg.AssetKey("lemmas")).freshness_policy is None
    assert settings.freshness_hours({"RAG_FRESHNESS_WARN_HOURS": "2", "RAG_FRESHNESS_FAIL_HOURS": "3"}) == (
        2,
        3,
    )
    with pytest.raises(RagError, match="must exceed"):
        settings.freshness_hours({"RAG_FRESHNESS_WARN_HOURS": "5", "RAG_FRESHNESS_FAIL_HOURS": "3"})


# -- checks on good and bad data ------------------------------------------------------------


@pytest.fixture(scope="module")
def stages(
    nlp: Language, documents_2025: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, ChunkVectors]:
    documents = documents_2025.head(80).reset_index(drop=True)
    chunks = make_chunks(documents, ChunkingConfig())
    lemmas = lemmatize_chunks(nlp, chunks)
    return documents, chunks, lemmas, embed_chunks(nlp, lemmas)


def test_document_check(stages: tuple) -> None:
    documents = stages[0]
    assert quality.check_documents(documents).passed
    assert quality.check_documents(documents.head(0)).problems == ["no rows"]
    bad = documents.copy()
    bad.loc[3, "doc_id"] = bad.loc[2, "doc_id"]
    bad.loc[5, "answer"] = " "  # judged per course (check_course_content), not here
    bad.loc[6, "question"] = " "
    assert quality.check_documents(bad).problems == [
        f"1 duplicate doc_id values (first: {bad.loc[2, 'doc_id']})",
        "1 rows with an empty question",
    ]
    assert quality.check_documents(documents.drop(columns="question")).problems == [
        "missing columns: question"
    ]


def test_chunk_check(stages: tuple) -> None:
    chunks = stages[1]
    assert quality.check_chunks(chunks, 2000).passed
    assert quality.check_chunks(chunks, 300).problems[0].endswith("chunks longer than 300 characters")


def test_lemma_check(stages: tuple) -> None:
    _, chunks, lemmas, _ = stages
    ids = list(chunks.chunk_id)
    assert quality.check_lemmas(lemmas, ids, 0.02).passed
    empty = lemmas.copy()
    empty.loc[:9, ["question_lemmas", "text_lemmas", "section_lemmas"]] = ""
    assert "have no lemmas" in quality.check_lemmas(empty, ids, 0.02).description
    assert quality.check_lemmas(lemmas, ids[::-1], 0.02).problems == [
        "chunk ids differ from the chunks asset"
    ]


def test_vector_check(stages: tuple) -> None:
    _, chunks, _, vectors = stages
    ids = list(chunks.chunk_id)
    verdict = quality.check_vectors(vectors, ids, 0.05)
    assert verdict.passed and verdict.metadata["dimensions"] == 300
    broken = vectors.matrix.copy()
    broken[0, 0] = np.nan
    broken[1:20] = 0
    problems = quality.check_vectors(ChunkVectors(ids, broken), ids, 0.05).problems
    assert problems[0] == "1 vectors contain NaN"
    assert problems[1].endswith("zero vectors (at most 5% allowed)")
    narrow = ChunkVectors.__new__(ChunkVectors)
    narrow.chunk_ids, narrow.matrix = ids, np.ones((len(ids), 100), dtype=np.float32)
    assert "expected (n, 300)" in quality.check_vectors(narrow, ids, 0.05).description


def test_entry_drop_guard_in_all_and_per_course() -> None:
    served = {"a": 600, "b": 348}
    assert quality.check_course_drops({"a": 600, "b": 348}, None, 0.2, 0.5).passed
    # 2024-06 -> 2025 took mlops-zoomcamp from 190 to 138 entries (27 %): within the course limit
    assert quality.check_course_drops({"a": 600, "b": 250}, served, 0.2, 0.5).passed
    overall = quality.check_course_drops({"a": 280, "b": 348}, served, 0.2, 0.5)
    assert overall.problems == [
        "entries dropped from 948 (served index) to 628 (33.8%), more than the allowed 20% "
        "(RAG_MAX_ENTRY_DROP)",
        "course 'a' dropped from 600 to 280 entries (53.3% of its 600 served entries), more than the "
        "allowed 50% (RAG_MAX_COURSE_ENTRY_DROP)",
    ]
    # a small course gone from the source: within the overall limit, refused for itself
    gone = quality.check_course_drops({"a": 600, "c": 10}, {"a": 600, "b": 40}, 0.2, 0.5)
    assert gone.problems == [
        "course 'b' is no longer in the source (100.0% of its 40 served entries), more than the allowed "
        "50% (RAG_MAX_COURSE_ENTRY_DROP)"
    ]
    assert gone.metadata["courses_gone"] == "b"
    assert quality.check_course_drops({"a": 600}, {"a": 600, "b": 40}, 0.2, 1.0).passed


def test_index_checks(tmp_path: Path, nlp: Language, stages: tuple) -> None:
    _, chunks, lemmas, vectors = stages
    index = EmbeddedIndex(tmp_path)
    index.publish(IndexContent.assemble(chunks, lemmas, vectors, model_fingerprint()))
    assert quality.check_index_matches(index.chunk_hashes(), chunks).passed
    changed = chunks.copy()
    changed.loc[0, "content_hash"] = "new"
    extra = pd.concat([changed, changed.head(1).assign(chunk_id="zz-0")])
    verdict = quality.check_index_matches(index.chunk_hashes(), extra.iloc[1:])
    assert verdict.problems == [
        "1 chunks missing (first: zz-0)",
        f"1 chunks not in the source (first: {chunks.chunk_id[0]})",
    ]
    stale = quality.check_index_matches(index.chunk_hashes(), changed)
    assert stale.problems == [f"1 chunks with outdated content (first: {chunks.chunk_id[0]})"]

    retriever = Retriever(index, nlp)
    probe = quality.smoke_probe(chunks)
    assert quality.check_smoke_query(retriever, probe).passed
    assert not quality.check_smoke_query(retriever, replace(probe, document="someone-else")).passed


# -- real runs ------------------------------------------------------------------------------


def test_every_check_passes_on_a_real_run_and_the_guard_blocks_a_collapsed_source(
    tmp_path: Path, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    first = materialize(str(DATA / "documents-2025.json"), data, instance)
    assert first.success
    evaluations = first.checks()
    # two on the source, one or two on each course asset (judging every course), two on the served index
    assert len(evaluations) == 2 + 5 + 2
    assert all(
        evaluations[f"{asset}_well_formed"].metadata["courses_judged"].value == 3
        for asset in ("chunks", "lemmas", "embeddings")
    )
    assert all(e.passed for e in evaluations.values()), {n: e.description for n, e in evaluations.items()}

    import json

    documents = json.loads((DATA / "documents-2025.json").read_text())
    for group in documents:
        group["documents"] = group["documents"][: len(group["documents"]) // 2]
    halved = write_json(tmp_path / "halved.json", documents)
    # A new instance (DAGSTER_HOME lost or never set) knows no earlier run: the guard asks the index.
    fresh = dg.DagsterInstance.ephemeral()
    second = materialize(str(halved), data, fresh)
    assert not second.success
    guard = second.checks()["faq_source_count_guard"]
    assert not guard.passed
    overall = "entries dropped from 948 (served index) to 473 (50.1%), more than the allowed 20%"
    course = "course 'data-engineering-zoomcamp' dropped from 435 to 217 entries"
    assert guard.description.startswith(f"{overall} (RAG_MAX_ENTRY_DROP); {course}")
    assert guard.metadata["served_entries"].value == 948
    assert second.materializations("raw_documents") == []  # nothing ran after it
    assert EmbeddedIndex(data).stats().entries == 948
    errors = [e.user_message for e in second.logs() if e.level == logging.ERROR]
    assert f"faq_source_count_guard failed: {guard.description}" in errors
    monkeypatch.setenv("RAG_DATA_DIR", str(data))
    lines = summary(second.refresh, fresh)  # how `make run` ends
    assert lines[:2] == [
        f"run {second.refresh.run_id} did not do everything:",
        f"  blocked by faq_source_count_guard: {guard.description}",
    ]
    assert len(lines) == 3, "\n".join(lines)
    assert lines[2].startswith(f"the served index is unchanged: 948 entries at {data}")


def test_the_retrieval_quality_check_runs_only_when_configured(tmp_path: Path) -> None:
    from rag_assets.defs.checks import all_checks

    assert "es_index_retrieval_quality" not in {c.check_key.name for c in all_checks(QualityResource())}
    configured = all_checks(QualityResource(ground_truth="gt.csv"))
    assert "es_index_retrieval_quality" in {c.check_key.name for c in configured}
    assert (
        environment_resources({"RAG_GROUND_TRUTH": "gt.csv", "RAG_EVAL_MIN_MRR": "0.85"})[
            "quality_settings"
        ].min_mrr
        == 0.85
    )


def test_the_retrieval_quality_check_measures_the_served_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    documents, ground_truth = eval_slice(tmp_path)
    monkeypatch.setenv("RAG_GROUND_TRUTH", str(ground_truth))  # the check exists only when set
    settings = QualityResource(ground_truth=str(ground_truth), min_hit_rate=0.8, min_mrr=0.6)
    run = materialize(
        str(documents), tmp_path / "data", dg.DagsterInstance.ephemeral(), quality_settings=settings
    )
    assert run.success
    evaluation = run.checks()["es_index_retrieval_quality"]
    assert evaluation.passed, evaluation.description
    assert evaluation.metadata["questions"].value == 80
    assert 0.8 <= evaluation.metadata["hit_rate"].value <= 1
    assert evaluation.metadata["ground_truth"].value == str(ground_truth)

    strict = QualityResource(ground_truth=str(ground_truth), min_hit_rate=1.01, min_mrr=1.01)
    failed = materialize(
        str(documents), tmp_path / "data", dg.DagsterInstance.ephemeral(), quality_settings=strict
    )
    evaluation = failed.checks()["es_index_retrieval_quality"]
    assert not evaluation.passed
    assert evaluation.description.startswith("hit rate ") and "below 1.01; MRR " in evaluation.description
