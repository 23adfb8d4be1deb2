"""The exact requests the Elasticsearch backend sends, through the real client, to a recording fake."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from spacy.language import Language

from rag_assets.defs.resources import ElasticsearchResource
from rag_assets.index.backend import IndexContent, IndexNotFoundError, PublishError, RagError
from rag_assets.index.elasticsearch import (
    LEMMA_ANALYZER,
    MAPPING_VERSION,
    ElasticsearchIndex,
    knn_query,
    lexical_query,
)

from .conftest import index_content
from .fake_elasticsearch import FakeElasticsearch

ALIAS = "faq"
VERSION_NAME = r"^/faq-\d{20}-[0-9a-f]{6}$"


@pytest.fixture
def fake() -> Iterator[FakeElasticsearch]:
    server = FakeElasticsearch()
    yield server
    server.close()


@pytest.fixture(scope="module")
def content(nlp: Language, documents_2025: pd.DataFrame) -> IndexContent:
    return index_content(nlp, documents_2025.head(120))


def backend(fake: FakeElasticsearch, **options: object) -> ElasticsearchIndex:
    index = ElasticsearchResource(url=fake.url, alias=ALIAS, **options).index()  # type: ignore[arg-type]
    index.bulk_initial_backoff_s = 0.01
    return index


def bulk_actions(fake: FakeElasticsearch) -> list[tuple[str, str]]:
    return [
        (op, meta["_id"])
        for call in fake.calls("PUT", "/_bulk$") + fake.calls("POST", "/_bulk$")
        for line in call.body
        for op, meta in line.items()
        if op in ("index", "delete")
    ]


def live(fake: FakeElasticsearch) -> str | None:
    return fake.aliases.get(ALIAS)


def test_first_publish_creates_maps_loads_verifies_and_swaps(
    fake: FakeElasticsearch, content: IndexContent
) -> None:
    report = backend(fake, shards=2, replicas=1).publish(content)
    paths = [(r.method, r.path) for r in fake.requests]
    name = report.version
    assert paths[0] == ("GET", f"/_alias/{ALIAS}")
    assert paths[1] == ("PUT", f"/{name}")
    assert ("POST", f"/{name}/_refresh") in paths and ("POST", f"/{name}/_count") in paths
    assert not fake.calls(pattern="_reindex")

    body = fake.calls("PUT", VERSION_NAME)[0].body
    assert body["settings"]["number_of_shards"] == 2 and body["settings"]["number_of_replicas"] == 1
    assert body["settings"]["analysis"]["analyzer"][LEMMA_ANALYZER] == {
        "type": "custom",
        "tokenizer": "lemma_split",
        "filter": ["lowercase"],
    }
    properties = body["mappings"]["properties"]
    assert body["mappings"]["dynamic"] == "strict"
    assert body["mappings"]["_meta"]["mapping_version"] == MAPPING_VERSION
    assert {f: properties[f]["type"] for f in ("chunk_id", "doc_id", "course", "content_hash")} == {
        "chunk_id": "keyword",
        "doc_id": "keyword",
        "course": "keyword",
        "content_hash": "keyword",
    }
    for field in ("question_lemmas", "text_lemmas", "section_lemmas"):
        assert properties[field] == {"type": "text", "analyzer": LEMMA_ANALYZER}
    for field in ("question", "text", "section"):
        assert properties[field] == {"type": "text", "index": False}
    assert properties["vector"] == {
        "type": "dense_vector",
        "dims": 300,
        "index": True,
        "similarity": "cosine",
    }

    actions = bulk_actions(fake)
    assert actions == [("index", cid) for cid in content.rows.chunk_id]
    first_doc = fake.calls(pattern="/_bulk$")[0].body[1]
    assert first_doc["chunk_id"] == content.rows.chunk_id[0]
    assert len(first_doc["vector"]) == 300
    assert first_doc["question_lemmas"] == content.rows.question_lemmas[0]

    [swap] = fake.calls("POST", "^/_aliases$")
    assert swap.body == {"actions": [{"add": {"index": name, "alias": ALIAS}}]}
    assert live(fake) == name
    assert (report.upserted, report.deleted, report.previous) == (len(content.rows), 0, None)


def test_bulk_is_streamed_in_bounded_chunks(fake: FakeElasticsearch, content: IndexContent) -> None:
    index = backend(fake)
    index.bulk_chunk_size = 50
    index.publish(content)
    sizes = [len(call.body) // 2 for call in fake.calls(pattern="/_bulk$")]
    assert sizes == [50, 50, len(content.rows) - 100]


def test_a_refresh_reindexes_server_side_and_sends_only_the_delta(
    fake: FakeElasticsearch, content: IndexContent
) -> None:
    es = backend(fake)
    first = es.publish(content).version
    rows = edited(content, [3]).rows
    keep = rows.index != 7
    delta = IndexContent(rows=rows[keep].reset_index(drop=True), vectors=content.vectors[keep])
    fake.requests.clear()

    report = es.publish(delta)
    [reindex] = fake.calls("POST", "^/_reindex$")
    assert reindex.body == {"source": {"index": first}, "dest": {"index": report.version}}
    assert reindex.params["wait_for_completion"] == "true"
    assert bulk_actions(fake) == [("index", rows.chunk_id[3]), ("delete", rows.chunk_id[7])]
    [swap] = fake.calls("POST", "^/_aliases$")
    assert swap.body == {
        "actions": [
            {"remove": {"index": first, "alias": ALIAS}},
            {"add": {"index": report.version, "alias": ALIAS}},
        ]
    }
    assert (report.upserted, report.deleted, report.previous) == (1, 1, first)
    assert es.chunk_hashes() == dict(zip(delta.rows.chunk_id, delta.rows.content_hash, strict=True))


def test_an_unchanged_source_writes_nothing(fake: FakeElasticsearch, content: IndexContent) -> None:
    es = backend(fake)
    first = es.publish(content).version
    fake.requests.clear()
    report = es.publish(content)
    assert (report.upserted, report.deleted, report.version) == (0, 0, first)
    assert {r.method for r in fake.requests} <= {"GET", "POST"}
    assert not fake.calls("PUT") and not fake.calls(pattern="_bulk|_aliases|_reindex")


def test_an_index_with_another_mapping_is_not_reused(fake: FakeElasticsearch, content: IndexContent) -> None:
    es = backend(fake)
    first = es.publish(content).version
    fake.indices[first].body["mappings"]["_meta"]["mapping_version"] = "older"
    fake.requests.clear()
    report = es.publish(content)
    assert not fake.calls(pattern="_reindex")
    assert len(bulk_actions(fake)) == len(content.rows) == report.upserted


def edited(content: IndexContent, positions: list[int], row_hash: str = "edited") -> IndexContent:
    """The same chunks with a new row hash at `positions`, as a changed answer would have."""
    rows = content.rows.copy()
    rows.loc[positions, "row_hash"] = row_hash
    return replace(content, rows=rows)


def publish_revisions(es: ElasticsearchIndex, content: IndexContent, n: int) -> list[str]:
    return [es.publish(edited(content, [0], f"revision {revision}")).version for revision in range(n)]


def test_old_versions_beyond_the_retention_are_deleted(
    fake: FakeElasticsearch, content: IndexContent
) -> None:
    es = backend(fake, keep_previous=2)
    names = publish_revisions(es, content, 4)
    assert [v.name for v in es.versions()] == names[::-1][:3]
    assert [v.live for v in es.versions()] == [True, False, False]
    assert [r.path for r in fake.calls("DELETE")] == [f"/{names[0]}"]


def test_a_failed_retention_delete_is_a_warning_not_a_failed_publish(
    fake: FakeElasticsearch, content: IndexContent
) -> None:
    es = backend(fake, keep_previous=0)
    [first] = publish_revisions(es, content, 1)
    fake.undeletable.add(first)
    report = es.publish(content)  # differs from revision 0, so a new version is built and served
    assert live(fake) == report.version and set(fake.indices) == {first, report.version}
    assert report.warnings == (
        f"could not delete old version {first}: "
        f"Elasticsearch answered 500: deleting [{first}] failed on purpose",
    )
    fake.undeletable.clear()
    [third] = publish_revisions(es, content, 1)  # the next publish retries the retention
    assert set(fake.indices) == {third}


def test_retention_never_touches_indices_it_did_not_create(
    fake: FakeElasticsearch, content: IndexContent
) -> None:
    fake.create("faq-archive", {})
    names = publish_revisions(backend(fake, keep_previous=0), content, 2)
    assert set(fake.indices) == {"faq-archive", names[1]}
    assert [r.path for r in fake.calls("DELETE")] == [f"/{names[0]}"]


def test_rollback_moves_the_alias_back_in_one_call(fake: FakeElasticsearch, content: IndexContent) -> None:
    es = backend(fake)
    first = es.publish(content).version
    second = es.publish(edited(content, [0])).version
    fake.requests.clear()
    assert es.rollback() == first
    [swap] = fake.calls("POST", "^/_aliases$")
    assert swap.body == {
        "actions": [{"remove": {"index": second, "alias": ALIAS}}, {"add": {"index": first, "alias": ALIAS}}]
    }
    assert live(fake) == first
    with pytest.raises(RagError, match="no earlier index"):
        es.rollback()
    assert es.rollback(second) == second
    with pytest.raises(RagError, match="is not a version of faq"):
        es.rollback("faq-nope")


def assert_failed_publish_left_everything(fake: FakeElasticsearch, before: str | None) -> None:
    assert live(fake) == before
    assert set(fake.indices) == ({before} if before else set())
    created = [r.path.lstrip("/") for r in fake.calls("PUT", VERSION_NAME)]
    assert [r.path for r in fake.calls("DELETE")] == [f"/{created[-1]}"]


def test_a_bulk_item_error_fails_with_its_reason_and_removes_the_new_index(
    fake: FakeElasticsearch, content: IndexContent
) -> None:
    es = backend(fake)
    first = es.publish(content).version
    chunk_ids = content.rows.chunk_id
    fake.reject_ids = {chunk_ids[2], chunk_ids[5]}
    with pytest.raises(PublishError) as error:
        es.publish(edited(content, [2, 5]))
    assert str(error.value).startswith("2 of 2 bulk actions failed; first: index ")
    assert f"failed to parse field [vector] of {chunk_ids[2]}" in str(error.value)
    assert_failed_publish_left_everything(fake, first)


def test_a_count_mismatch_fails_before_the_swap(fake: FakeElasticsearch, content: IndexContent) -> None:
    fake.count_offset = -1
    with pytest.raises(
        PublishError,
        match=rf"holds {len(content.rows) - 1} documents after loading, "
        rf"expected {len(content.rows)}; the alias faq was not moved",
    ):
        backend(fake).publish(content)
    assert_failed_publish_left_everything(fake, None)
    assert not fake.calls("POST", "^/_aliases$")


def test_a_failed_swap_keeps_the_old_alias(fake: FakeElasticsearch, content: IndexContent) -> None:
    es = backend(fake, max_retries=0)
    first = es.publish(content).version
    fake.fail_alias_swap = True
    message = "moving alias faq to faq-.* failed .Elasticsearch answered 500: alias swap failed on purpose.; "
    with pytest.raises(PublishError, match=message + f"it still points at {first}"):
        es.publish(edited(content, [0]))
    assert_failed_publish_left_everything(fake, first)


def test_throttled_bulk_items_are_retried(fake: FakeElasticsearch, content: IndexContent) -> None:
    fake.throttle_items = 5
    report = backend(fake).publish(content)
    assert report.upserted == len(content.rows)
    bulks = fake.calls(pattern="/_bulk$")
    assert len(bulks) == 2
    assert len(bulks[1].body) // 2 == 5  # only the rejected items are sent again


def test_queries(fake: FakeElasticsearch, content: IndexContent) -> None:
    es = backend(fake)
    es.publish(content)
    fake.requests.clear()
    vector = content.vectors[0]
    es.lexical_search(["join", "course"], "data-engineering-zoomcamp", 7)
    es.vector_search(vector, "data-engineering-zoomcamp", 7)
    es.fetch(["a-0", "b-0"])
    lexical, knn, mget = fake.requests
    assert (lexical.method, lexical.path) == ("POST", f"/{ALIAS}/_search")
    assert lexical.body == {
        "size": 7,
        "_source": False,
        "query": {
            "bool": {
                "must": {
                    "combined_fields": {
                        "query": "join course",
                        "fields": ["question_lemmas^2", "text_lemmas^1", "section_lemmas^1"],
                        "operator": "or",
                    }
                },
                "filter": [{"term": {"course": "data-engineering-zoomcamp"}}],
            }
        },
    }
    assert knn.path == f"/{ALIAS}/_search"
    assert knn.body["knn"]["filter"] == {"term": {"course": "data-engineering-zoomcamp"}}
    assert "query" not in knn.body and "post_filter" not in knn.body
    assert (knn.body["knn"]["k"], knn.body["knn"]["num_candidates"], knn.body["size"]) == (7, 100, 7)
    assert np.allclose(knn.body["knn"]["query_vector"], vector)
    assert (mget.path, mget.body) == (f"/{ALIAS}/_mget", {"ids": ["a-0", "b-0"]})
    assert "filter" not in lexical_query(["x"], None, 3)["query"]["bool"]
    assert "filter" not in knn_query(vector, None, 3)["knn"]


def test_reading_before_any_publish_says_so(fake: FakeElasticsearch) -> None:
    es = backend(fake)
    with pytest.raises(IndexNotFoundError, match="no index behind alias faq"):
        es.stats()
    with pytest.raises(IndexNotFoundError, match="no index behind alias faq"):
        es.lexical_search(["docker"], None, 5)


def test_credentials_are_sent_as_headers(fake: FakeElasticsearch) -> None:
    ElasticsearchResource(url=fake.url, api_key="c2VjcmV0").index().live_index()
    assert fake.requests[-1].headers["authorization"] == "ApiKey c2VjcmV0"
    ElasticsearchResource(url=fake.url, username="elastic", password="pw").index().live_index()
    assert fake.requests[-1].headers["authorization"] == "Basic ZWxhc3RpYzpwdw=="
