"""Real Dagster runs of the whole graph, in process, against the embedded index on disk."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
from spacy.language import Language

from rag_assets.common.stored import StoredValue
from rag_assets.definitions import load_definitions, with_resources
from rag_assets.defs.automation import JOB_NAME
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

ASSET_KEYS = {"raw_documents", "chunks", "lemmas", "embeddings", "es_index"}
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


def materialize(
    source: str, data_dir: Path, instance: dg.DagsterInstance, **overrides: object
) -> dg.ExecuteInJobResult:
    """A real run of the project's refresh job (assets and checks) with test resources."""
    definitions = with_resources(load_definitions(), run_resources(source, data_dir, **overrides))
    return definitions.resolve_job_def(JOB_NAME).execute_in_process(instance=instance, raise_on_error=False)


def test_definitions_load_with_every_asset() -> None:
    defs = load_definitions()
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    assert {key.to_user_string() for key in graph.get_all_asset_keys()} == ASSET_KEYS
    assert graph.get(dg.AssetKey("es_index")).parent_keys == {
        dg.AssetKey(k) for k in ("chunks", "lemmas", "embeddings")
    }
    for key in ASSET_KEYS:
        node = graph.get(dg.AssetKey(key))
        assert node.group_name == "faq_index"
        assert node.kinds


def test_full_graph_replaces_the_index_and_survives_a_broken_source(tmp_path: Path, nlp: Language) -> None:
    instance = dg.DagsterInstance.ephemeral()
    first = materialize(str(DATA / "documents-2024-06.json"), tmp_path, instance)
    assert first.success
    assert EmbeddedIndex(tmp_path).stats().entries == 1002

    second = materialize(str(DATA / "documents-2025.json"), tmp_path, instance)
    assert second.success
    stats = EmbeddedIndex(tmp_path).stats()
    assert stats.entries == 948
    events = {
        e.asset_key.to_user_string(): e.materialization.metadata
        for e in second.get_asset_materialization_events()
    }
    assert set(events) == ASSET_KEYS
    assert events["raw_documents"]["entries"].value == 948
    assert events["es_index"]["entries"].value == 948
    assert events["es_index"]["deleted"].value == 68  # the removed entries, none of them split
    assert events["chunks"]["chunks"].value == stats.chunks
    assert "| doc_id" in events["raw_documents"]["preview"].value
    assert all("preview" in metadata for metadata in events.values())
    # the publish gate asked both versions before serving the new one
    assert events["es_index"]["gate_smoke_hit_rate_new"].value >= 0.9
    assert events["es_index"]["gate_smoke_hit_rate_served"].value >= 0.9

    broken = tmp_path / "broken.json"
    broken.write_text("[{oops")
    failed = materialize(str(broken), tmp_path, instance)
    assert not failed.success
    [failure] = [e for e in failed.all_events if e.is_step_failure]
    assert "broken.json is not valid JSON" in failure.step_failure_data.user_failure_data.description
    assert EmbeddedIndex(tmp_path).stats().entries == 948
    hits = Retriever(EmbeddedIndex(tmp_path), nlp).search(
        "I just discovered the course, can I still join?", course="data-engineering-zoomcamp"
    )
    assert hits[0].question == JOIN_QUESTION


def test_dropped_entries_are_counted(tmp_path: Path) -> None:
    source = write_json(
        tmp_path / "flat.json",
        [entry("c", "How do I join?", "Register on the site."), {"course": "c", "question": "no answer"}],
    )
    result = materialize(str(source), tmp_path / "data", dg.DagsterInstance.ephemeral())
    assert result.success
    metadata = result.asset_materializations_for_node("raw_documents")[0].metadata
    assert metadata["entries"].value == 1
    assert metadata["dropped_entries"].value == 1


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
        metadata = result.asset_materializations_for_node("es_index")[0].metadata
        assert metadata["backend"].value == "elasticsearch"
        assert metadata["index_version"].value == fake.aliases["faq"]
        assert metadata["chunks"].value == 30
        assert metadata["warnings"].value == "none"
        assert all(r.headers["authorization"] == f"ApiKey {secret}" for r in fake.requests)
        logged = " ".join(str(event) for event in result.all_events)
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
    events = {
        e.asset_key.to_user_string(): e.materialization.metadata
        for e in unchanged.get_asset_materialization_events()
    }
    assert set(events) == ASSET_KEYS  # all materialized: freshness sees the refresh
    for step in ("raw_documents", "chunks", "lemmas", "embeddings"):
        assert events[step]["stored_value"].value == "reused (inputs unchanged)"
    assert (events["lemmas"]["computed"].value, events["lemmas"]["reused"].value) == (0, 30)
    assert events["es_index"]["confirmed_without_reading"].value is True
    assert events["es_index"]["upserted"].value == 0
    evaluations = unchanged.get_asset_check_evaluations()
    assert evaluations and all(e.passed for e in evaluations)
    judged = {e.check_name: e.metadata["judged"].value for e in evaluations if "judged" in e.metadata}
    assert set(judged) == {
        "raw_documents_well_formed",
        "chunks_well_formed",
        "lemmas_well_formed",
        "embeddings_well_formed",
    }
    assert set(judged.values()) == {"earlier, of these same values"}
    assert EmbeddedIndex(data_dir).stats().published_at == published_at

    monkeypatch.undo()
    entries[3]["answer"] = "Reinstall service 3."
    write_json(tmp_path / "flat.json", entries)
    changed = materialize(source, data_dir, instance)
    assert changed.success
    metadata = {
        e.asset_key.to_user_string(): e.materialization.metadata
        for e in changed.get_asset_materialization_events()
    }
    assert {metadata[step]["stored_value"].value for step in ASSET_KEYS - {"es_index"}} == {"made"}
    assert (metadata["lemmas"]["computed"].value, metadata["lemmas"]["reused"].value) == (1, 29)
    assert metadata["es_index"]["confirmed_without_reading"].value is False
    assert metadata["es_index"]["upserted"].value == 1
