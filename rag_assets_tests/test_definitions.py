"""Real Dagster runs of the whole graph, in process, against the embedded index on disk."""

from __future__ import annotations

import itertools
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from spacy.language import Language

from rag_assets.common.stored import StoredValue
from rag_assets.definitions import load_definitions, with_resources
from rag_assets.defs.courses import CourseSet
from rag_assets.defs.refresh import RunOutcome, refresh
from rag_assets.defs.resources import (
    DocumentSourceResource,
    NlpResource,
    QualityResource,
    RefreshLockResource,
    SearchIndexResource,
    environment_resources,
)
from rag_assets.index.embedded import EmbeddedIndex
from rag_assets.retrieval import Retriever

from .conftest import DATA, entry, write_json
from .fake_elasticsearch import FakeElasticsearch

ASSET_KEYS = {"faq_source", "raw_documents", "chunks", "lemmas", "embeddings", "es_index"}
COURSE_ASSETS = ("raw_documents", "chunks", "lemmas", "embeddings")
JOIN_QUESTION = "Course - Can I still join the course after the start date?"


def run_resources(source: str, data_dir: Path, **overrides: object) -> dict[str, object]:
    return {
        "source": DocumentSourceResource(url=source, retries=0),
        "nlp": NlpResource(processes=1, cache_dir=str(data_dir / "cache")),
        "search_index": SearchIndexResource(data_dir=str(data_dir)),
        "quality_settings": QualityResource(),
        "io_manager": dg.FilesystemIOManager(base_dir=str(data_dir / "assets")),
        "refresh_lock": RefreshLockResource(data_dir=str(data_dir)),
        **overrides,
    }


@dataclass
class RefreshEvents:
    """The run of one refresh, as a test reads its events and the values it handed on."""

    instance: dg.DagsterInstance
    refresh: RunOutcome
    data_dir: Path

    @property
    def success(self) -> bool:
        return self.refresh.success

    def logs(self) -> list[dg.EventLogEntry]:
        return list(self.instance.all_logs(self.refresh.run_id))

    def materializations(self, asset: str) -> list[dg.AssetMaterialization]:
        return [
            log.asset_materialization
            for log in self.logs()
            if log.asset_materialization and log.asset_materialization.asset_key.to_user_string() == asset
        ]

    def metadata(self, asset: str) -> dict[str, Any]:
        """The metadata values of the asset's one materialization."""
        found = self.materializations(asset)
        assert len(found) == 1, f"{len(found)} materializations of {asset}"
        return {key: value.value for key, value in found[0].metadata.items()}

    def courses(self, asset: str) -> CourseSet:
        """A course asset's value as its run stored it (what the next asset read)."""
        with open(self.data_dir / "assets" / asset, "rb") as stored:
            return pickle.load(stored)

    def facts(self, asset: str, course: str) -> dict[str, Any]:
        """The facts of one course's value of a course asset."""
        return self.courses(asset).values[course][asset].facts

    def checks(self) -> dict[str, dg.AssetCheckEvaluation]:
        found = {}
        for log in self.logs():
            event = log.dagster_event
            if event is not None and event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
                evaluation = event.asset_check_evaluation_data
                found[evaluation.check_name] = evaluation
        return found

    def failures(self) -> list[str]:
        return [
            log.dagster_event.step_failure_data.user_failure_data.description
            for log in self.logs()
            if log.dagster_event is not None and log.dagster_event.is_step_failure
        ]


def materialize(
    source: str, data_dir: Path, instance: dg.DagsterInstance, **overrides: object
) -> RefreshEvents:
    """A real refresh with test resources: one run of the refresh job, in process."""
    definitions = with_resources(load_definitions(), run_resources(source, data_dir, **overrides))
    return RefreshEvents(instance, refresh(instance, definitions), data_dir)


def test_definitions_load_with_every_asset() -> None:
    defs = load_definitions()
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    assert {key.to_user_string() for key in graph.get_all_asset_keys()} == ASSET_KEYS
    chain = ["faq_source", *COURSE_ASSETS, "es_index"]
    for parent, child in itertools.pairwise(chain):  # the design's lineage: a chain
        assert graph.get(dg.AssetKey(child)).parent_keys == {dg.AssetKey(parent)}
    for key in ASSET_KEYS:
        node = graph.get(dg.AssetKey(key))
        assert node.group_name == "faq_index"
        assert node.kinds
        assert not node.is_partitioned  # one run builds every course
    assert [job.name for job in defs.jobs] == ["faq_index_refresh"]
    job = defs.resolve_job_def("faq_index_refresh")
    assert {key.to_user_string() for key in job.asset_layer.executable_asset_keys} == ASSET_KEYS


def test_full_graph_replaces_the_index_and_survives_a_broken_source(tmp_path: Path, nlp: Language) -> None:
    instance = dg.DagsterInstance.ephemeral()
    first = materialize(str(DATA / "documents-2024-06.json"), tmp_path, instance)
    assert first.success
    assert EmbeddedIndex(tmp_path).stats().entries == 1002

    second = materialize(str(DATA / "documents-2025.json"), tmp_path, instance)
    assert second.success
    stats = EmbeddedIndex(tmp_path).stats()
    assert stats.entries == 948
    source = second.metadata("faq_source")
    assert source["entries"] == 948 and sum(source["courses"].values()) == 948
    courses = sorted(source["courses"])
    for asset in COURSE_ASSETS:  # one materialization, a row per course in its table
        metadata = second.metadata(asset)
        assert (metadata["courses"], metadata["courses_built"]) == (3, 3)
        assert all(f"| {course}" in metadata["per_course"] for course in courses)
    per_course = {c: second.facts("raw_documents", c)["entries"] for c in courses}
    assert per_course == source["courses"]
    published = second.metadata("es_index")
    assert published["entries"] == 948
    assert published["deleted"] == 68  # the removed entries, none of them split
    assert published["courses_refreshed"] == courses
    assert second.metadata("chunks")["chunks"] == stats.chunks
    assert "| doc_id" in source["preview"]
    assert all("preview" in m.metadata for asset in ASSET_KEYS for m in second.materializations(asset))
    # the publish gate asked both versions before serving the new one
    assert published["gate_smoke_hit_rate_new"] >= 0.9
    assert published["gate_smoke_hit_rate_served"] >= 0.9

    broken = tmp_path / "broken.json"
    broken.write_text("[{oops")
    failed = materialize(str(broken), tmp_path, instance)
    assert not failed.success
    [failure] = failed.failures()
    assert "broken.json is not valid JSON" in failure
    assert EmbeddedIndex(tmp_path).stats().entries == 948
    hits = Retriever(EmbeddedIndex(tmp_path), nlp).search(
        "Can I still join the course after the start date?", course="data-engineering-zoomcamp"
    )
    assert hits[0].question == JOIN_QUESTION


def test_dropped_entries_are_counted(tmp_path: Path) -> None:
    source = write_json(
        tmp_path / "flat.json",
        [entry("c", "How do I join?", "Register on the site."), {"course": "c", "question": "no answer"}],
    )
    result = materialize(str(source), tmp_path / "data", dg.DagsterInstance.ephemeral())
    assert result.success
    metadata = result.metadata("faq_source")
    assert (metadata["entries"], metadata["dropped_entries"]) == (1, 1)
    assert result.facts("raw_documents", "c")["entries"] == 1


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/documents.json"])
def test_unreachable_source_fails_the_run(tmp_path: Path, url: str) -> None:
    result = materialize(url, tmp_path, dg.DagsterInstance.ephemeral())
    assert not result.success
    assert not (tmp_path / "index.sqlite").exists()


def test_es_index_publishes_to_elasticsearch_with_the_key_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "c2VjcmV0LWtleS0xMjM0"
    monkeypatch.setenv("ELASTICSEARCH_API_KEY", secret)
    env = {"ELASTICSEARCH_URL": "placeholder", "ELASTICSEARCH_API_KEY": secret, "ELASTICSEARCH_ALIAS": "faq"}
    fake = FakeElasticsearch()
    try:
        env["ELASTICSEARCH_URL"] = fake.url
        search_index = environment_resources({**env, "RAG_DATA_DIR": str(tmp_path)})["search_index"]
        assert search_index.elasticsearch is not None
        assert isinstance(search_index.elasticsearch.api_key, dg.EnvVar)
        source = write_json(
            tmp_path / "flat.json",
            [entry("c", f"How do I fix error {n}?", f"Restart service {n}.") for n in range(30)],
        )
        result = materialize(str(source), tmp_path, dg.DagsterInstance.ephemeral(), search_index=search_index)
        assert result.success
        metadata = result.metadata("es_index")
        assert metadata["backend"] == "elasticsearch"
        assert metadata["index_version"] == fake.aliases["faq"]
        assert metadata["chunks"] == 30
        assert metadata["warnings"] == "none"
        assert all(r.headers["authorization"] == f"ApiKey {secret}" for r in fake.requests)
        logged = " ".join(str(log) for log in result.logs())
        assert secret not in logged
        assert not (tmp_path / "index.sqlite").exists()
    finally:
        fake.close()


def test_a_refresh_of_an_unchanged_source_loads_no_stored_value_and_confirms_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    instance = dg.DagsterInstance.ephemeral()
    entries = [entry("c", f"How do I fix error {n}?", f"Restart service {n}.") for n in range(30)]
    source = str(write_json(tmp_path / "flat.json", entries))
    data_dir = tmp_path / "data"
    assert materialize(source, data_dir, instance).success
    published_at = EmbeddedIndex(data_dir).stats().published_at

    def refuse_to_load(value: StoredValue) -> object:
        raise AssertionError(f"the unchanged run loaded the stored {value.step}")

    monkeypatch.setattr(StoredValue, "load", refuse_to_load)
    unchanged = materialize(source, data_dir, instance)
    assert unchanged.success
    events = {asset: unchanged.metadata(asset) for asset in ASSET_KEYS}  # all: freshness sees the refresh
    assert events["faq_source"]["stored_value"] == "reused (inputs unchanged)"
    for step in COURSE_ASSETS:
        assert events[step]["values_made"] == 0
    assert (events["lemmas"]["computed"], events["lemmas"]["reused"]) == (0, 30)
    assert all(events[step]["chunks"] == 30 for step in COURSE_ASSETS[1:])  # reused values count too
    assert events["es_index"]["confirmed_without_reading"] is True
    assert events["es_index"]["upserted"] == 0
    evaluations = unchanged.checks()
    assert len(evaluations) == 9 and all(e.passed for e in evaluations.values())
    judged = evaluations["faq_source_well_formed"].metadata["judged"].value
    assert judged == "earlier, of these same values"  # the course rules, judged in their steps, load nothing
    assert EmbeddedIndex(data_dir).stats().published_at == published_at

    monkeypatch.undo()
    entries[3]["answer"] = "Reinstall service 3."
    write_json(tmp_path / "flat.json", entries)
    changed = materialize(source, data_dir, instance)
    assert changed.success
    metadata = {asset: changed.metadata(asset) for asset in ASSET_KEYS}
    assert metadata["faq_source"]["stored_value"] == "made"
    assert all(metadata[step]["values_made"] == 1 for step in COURSE_ASSETS)
    assert (metadata["lemmas"]["computed"], metadata["lemmas"]["reused"]) == (1, 29)
    assert metadata["es_index"]["confirmed_without_reading"] is False
    assert metadata["es_index"]["upserted"] == 1


def test_the_semantic_mode_adds_cached_sentence_vectors_and_switches_back(
    tmp_path: Path, nlp: Language
) -> None:
    entries = [
        entry(c, f"How do I fix error {n} of {c}?", f"Restart service {n}.") for c in "ab" for n in range(12)
    ]
    source = write_json(tmp_path / "flat.json", entries)
    instance = dg.DagsterInstance.ephemeral()
    semantic = NlpResource(processes=1, cache_dir=str(tmp_path / "cache"), reranker="semantic")
    first = materialize(str(source), tmp_path, instance, nlp=semantic)
    assert first.success, first.failures()
    assert [first.facts("embeddings", c)["sentence_computed"] for c in "ab"] == [12, 12]
    assert first.metadata("es_index")["reranker"] == "semantic"
    index = EmbeddedIndex(tmp_path)
    assert index.stats().reranker == "semantic"
    with index.snapshot():
        vectors = [c.sentence for c in index.candidates(index.chunk_hashes()).values()]
    assert len(vectors) == 24 and all(v is not None and v.shape == (384,) for v in vectors)

    entries[0]["text"] = "Reinstall the service."  # one changed answer: one sentence vector made
    write_json(tmp_path / "flat.json", entries)
    second = materialize(str(source), tmp_path, instance, nlp=semantic)
    assert second.success
    assert second.facts("embeddings", "a")["sentence_computed"] == 1
    assert second.metadata("es_index")["upserted"] == 1

    features = NlpResource(processes=1, cache_dir=str(tmp_path / "cache"), reranker="features")
    third = materialize(str(source), tmp_path, instance, nlp=features)
    assert third.success
    assert third.facts("embeddings", "a")["sentence_vectors"].startswith("off")
    assert third.metadata("es_index")["upserted"] == 24  # the rows lose their sentence vectors
    assert third.metadata("es_index")["mode_switch"] == (
        f"RAG_RERANKER=features, but the served index at {tmp_path / 'index.sqlite'} was built for "
        "RAG_RERANKER=semantic: this refresh rewrites all of its 24 rows (set RAG_RERANKER=semantic "
        "to keep that mode)"
    )
    assert second.metadata("es_index")["mode_switch"] == ""
    assert index.stats().reranker == "features"
    retriever = Retriever(index, nlp, reranker="semantic")
    assert retriever.search("How do I fix error 3 of a?", "a")[0].question == "How do I fix error 3 of a?"
    assert retriever.fallbacks == 1
