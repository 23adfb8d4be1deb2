"""The exact requests the Elasticsearch backend sends, through the real client, to a recording fake."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from spacy.language import Language

from rag_assets.defs.resources import ElasticsearchResource
from rag_assets.index.backend import (
    LEMMA_FIELD_COLUMNS,
    GateVerdict,
    IndexContent,
    IndexNotFoundError,
    PublishError,
    PublishRefusedError,
    RagError,
    SearchBackend,
)
from rag_assets.index.elasticsearch import (
    LEMMA_ANALYZER,
    MAPPING_VERSION,
    ElasticsearchIndex,
    knn_query,
    lexical_query,
)
from rag_assets.index.embedded import EmbeddedIndex
from rag_assets.nlp.sentence import SENTENCE_DIM

from .conftest import content_rows, index_content, semantic_content, subset
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

    rows, _ = content_rows(content)
    actions = bulk_actions(fake)
    assert actions == [("index", cid) for cid in rows.chunk_id]
    first_doc = fake.calls(pattern="/_bulk$")[0].body[1]
    assert first_doc["chunk_id"] == rows.chunk_id[0]
    assert len(first_doc["vector"]) == 300
    assert first_doc["question_lemmas"] == rows.question_lemmas[0]

    [swap] = fake.calls("POST", "^/_aliases$")
    assert swap.body == {"actions": [{"add": {"index": name, "alias": ALIAS}}]}
    assert live(fake) == name
    assert (report.upserted, report.deleted, report.previous) == (len(content), 0, None)


def test_bulk_is_streamed_in_bounded_chunks(fake: FakeElasticsearch, content: IndexContent) -> None:
    index = backend(fake)
    index.bulk_chunk_size = 50
    index.publish(content)
    sizes = [len(call.body) // 2 for call in fake.calls(pattern="/_bulk$")]
    assert sizes == [50, 50, len(content) - 100]


def test_a_refresh_reindexes_server_side_and_sends_only_the_delta(
    fake: FakeElasticsearch, content: IndexContent
) -> None:
    es = backend(fake)
    first = es.publish(content).version
    keep = np.arange(len(content)) != 7
    delta = subset(edited(content, [3]), keep)
    rows, _ = content_rows(content)
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
    assert es.chunk_hashes() == dict(zip(rows.chunk_id[keep], rows.content_hash[keep], strict=True))


def test_an_unchanged_source_writes_nothing_but_the_confirmation(
    fake: FakeElasticsearch, content: IndexContent
) -> None:
    es = backend(fake)
    first = es.publish(content).version
    fake.requests.clear()
    report = es.publish(content)
    assert (report.upserted, report.deleted, report.version) == (0, 0, first)
    assert {r.method for r in fake.requests} <= {"GET", "POST", "PUT"}
    assert [r.path for r in fake.calls("PUT")] == [f"/{first}/_mapping"]
    assert not fake.calls(pattern="_bulk|_aliases|_reindex")


def test_a_publish_that_changed_nothing_moves_confirmed_at_not_published_at(
    fake: FakeElasticsearch, content: IndexContent
) -> None:
    es = backend(fake)
    first = es.publish(content).version
    stats = es.stats()
    assert stats.published_at and stats.confirmed_at == stats.published_at
    meta = fake.indices[first].body["mappings"]["_meta"]
    last_night = "2000-01-01T00:00:00+00:00"
    meta.update(published_at=last_night, confirmed_at=last_night)
    fake.requests.clear()
    assert es.publish(content).warnings == ()
    [confirm] = fake.calls("PUT", f"^/{first}/_mapping$")
    assert confirm.body["_meta"] == {**meta, "confirmed_at": confirm.body["_meta"]["confirmed_at"]}
    stats = es.stats()
    assert stats.published_at == last_night and stats.confirmed_at > last_night

    fake.unavailable = "^PUT "  # a read-only cluster: the served index is fine, the run is not failed
    assert es.publish(content).warnings == (
        f"could not record that {first} is current: Elasticsearch answered 503: unavailable on purpose",
    )


def test_an_index_with_another_mapping_is_not_reused(fake: FakeElasticsearch, content: IndexContent) -> None:
    es = backend(fake)
    first = es.publish(content).version
    fake.indices[first].body["mappings"]["_meta"]["mapping_version"] = "older"
    fake.requests.clear()
    report = es.publish(content)
    assert not fake.calls(pattern="_reindex")
    assert len(bulk_actions(fake)) == len(content) == report.upserted


def edited(content: IndexContent, positions: list[int], row_hash: str = "edited") -> IndexContent:
    """The same chunks with a new row hash at `positions`, as a changed answer would have."""
    row_hashes = list(content.row_hashes)
    for position in positions:
        row_hashes[position] = row_hash
    return replace(content, row_hashes=row_hashes)


def publish_revisions(es: ElasticsearchIndex, content: IndexContent, n: int) -> list[str]:
    return [es.publish(edited(content, [0], f"revision {revision}")).version for revision in range(n)]


def strand_partial_index(fake: FakeElasticsearch, content: IndexContent) -> str:
    """The incident: a publish's bulk request times out, the cleanup deletes the new index, then the
    server carries the request out, re-creating the index by auto-create with its 2 documents."""
    before = live(fake)
    fake.late, fake.late_s = r"^(PUT|POST) /_bulk$", 1.0
    with pytest.raises(PublishError) as error:
        backend(fake, request_timeout_s=0.3, max_retries=0).publish(edited(content, [0, 1], "lost"))
    fake.settle()
    fake.late = None
    name = fake.calls("PUT", VERSION_NAME)[-1].path.lstrip("/")
    assert str(error.value) == (
        f"publishing {name} failed while sending the bulk actions (Elasticsearch did not answer in time: "
        f"Connection timed out during request); the alias faq still points at {before}"
    )
    assert len(fake.indices[name].docs) == 2 and "_meta" not in fake.indices[name].body.get("mappings", {})
    return name


def test_a_partial_index_left_by_a_late_bulk_does_not_count_for_retention_or_rollback(
    fake: FakeElasticsearch, content: IndexContent
) -> None:
    es = backend(fake, keep_previous=1)
    first = es.publish(content).version
    partial = strand_partial_index(fake, content)
    third = es.publish(edited(content, [3])).version
    assert set(fake.indices) == {first, partial, third}  # the partial one is young: it may be in use
    versions = [(v.name, v.live, v.complete) for v in es.versions()]
    assert versions == [(third, True, True), (partial, False, False), (first, False, True)]
    assert es.rollback() == first


def test_rollback_refuses_an_incomplete_version_or_one_that_lost_documents(
    fake: FakeElasticsearch, content: IndexContent
) -> None:
    es = backend(fake)
    first = es.publish(content).version
    partial = strand_partial_index(fake, content)
    es.publish(edited(content, [3]))
    with pytest.raises(RagError) as incomplete:
        es.rollback(partial)
    assert str(incomplete.value) == (
        f"not rolling back to {partial}: it was never marked complete (it holds 2 documents)"
    )
    fake.indices[first].docs.popitem()
    n = len(content)
    with pytest.raises(RagError) as damaged:
        es.rollback()
    assert str(damaged.value) == (
        f"not rolling back to {first}: it holds {n - 1} documents, {n} when it was marked complete"
    )


def test_retention_deletes_orphans_once_no_run_can_still_write_them(
    fake: FakeElasticsearch, content: IndexContent
) -> None:
    es = backend(fake, keep_previous=5)
    es.publish(content)
    partial = strand_partial_index(fake, content)
    es.publish(edited(content, [3]))
    assert partial in fake.indices
    es.orphan_age_s = 0
    es.publish(edited(content, [4]))
    assert partial not in fake.indices and len(fake.indices) == 3


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
    chunk_ids = content.chunk_ids
    fake.reject_ids = {chunk_ids[2], chunk_ids[5]}
    with pytest.raises(PublishError) as error:
        es.publish(edited(content, [2, 5]))
    assert "failed while sending the bulk actions (2 of 2 failed; first: index " in str(error.value)
    assert str(error.value).endswith(f"; the alias faq still points at {first}")
    assert f"failed to parse field [vector] of {chunk_ids[2]}" in str(error.value)
    assert_failed_publish_left_everything(fake, first)


def test_a_count_mismatch_fails_before_the_swap(fake: FakeElasticsearch, content: IndexContent) -> None:
    fake.count_offset = -1
    with pytest.raises(
        PublishError,
        match=rf"failed while counting its documents \(it holds {len(content) - 1}, "
        rf"expected {len(content)}\); the alias faq still points at nothing$",
    ):
        backend(fake).publish(content)
    assert_failed_publish_left_everything(fake, None)
    assert not fake.calls("POST", "^/_aliases$")


def test_a_failed_swap_keeps_the_old_alias(fake: FakeElasticsearch, content: IndexContent) -> None:
    es = backend(fake, max_retries=0)
    first = es.publish(content).version
    fake.fail_alias_swap = True
    message = (
        r"failed while moving the alias to it \(Elasticsearch answered 500: alias swap failed on purpose\); "
    )
    with pytest.raises(PublishError, match=message + f"the alias faq still points at {first}$"):
        es.publish(edited(content, [0]))
    assert_failed_publish_left_everything(fake, first)


@pytest.mark.parametrize(
    ("failing", "step"),
    [
        (r"^PUT /faq-[^/]+$", "creating it"),
        (r"^POST /_reindex$", "copying {first} into it"),
        (r"^(PUT|POST) /_bulk$", "sending the bulk actions"),
        (r"^POST /faq-[^/]+/_refresh$", "refreshing it"),
        (r"^POST /faq-[^/]+/_count$", "counting its documents"),
        (r"^PUT /faq-[^/]+/_mapping$", "marking it complete"),
    ],
)
def test_a_failed_build_step_says_in_one_line_what_failed_and_where_the_alias_points(
    fake: FakeElasticsearch, content: IndexContent, failing: str, step: str
) -> None:
    es = backend(fake, max_retries=0)
    first = es.publish(content).version
    fake.unavailable = failing
    with pytest.raises(PublishError) as error:
        es.publish(edited(content, [0]))
    name = fake.calls("PUT", VERSION_NAME)[-1].path.lstrip("/")
    assert str(error.value) == (
        f"publishing {name} failed while {step.format(first=first)} "
        f"(Elasticsearch answered 503: unavailable on purpose); the alias faq still points at {first}"
    )
    assert_failed_publish_left_everything(fake, first)


def test_a_refusing_gate_leaves_the_alias_and_deletes_the_new_version(
    fake: FakeElasticsearch, content: IndexContent
) -> None:
    es = backend(fake)
    first = es.publish(content).version
    verdict = GateVerdict(passed=False, description="hit rate 0.50 < 0.90", metadata={"hit_rate": 0.5})
    with pytest.raises(PublishRefusedError) as error:
        es.publish(edited(content, [0]), gate=lambda candidate, live: verdict)
    assert error.value.verdict is verdict
    assert_failed_publish_left_everything(fake, first)


def test_a_passing_gate_reads_the_new_version_beside_the_live_one(
    fake: FakeElasticsearch, content: IndexContent
) -> None:
    es = backend(fake)
    seen: list[tuple[SearchBackend | None, list[str]]] = []
    verdict = GateVerdict(passed=True, description="hit rate 0.95 >= 0.90")

    def gate(candidate: SearchBackend, served: SearchBackend | None) -> GateVerdict:
        start = len(fake.requests)
        candidate.lexical_search(["docker"], None, 3)
        candidate.vector_search(content_rows(content)[1][0], None, 3)
        candidate.fetch([content.chunk_ids[0]])
        assert candidate.stats().chunks == len(content)
        if served is not None:
            served.lexical_search(["docker"], None, 3)
        seen.append((served, [r.path for r in fake.requests[start:] if "_alias" not in r.path]))
        return verdict

    first = es.publish(content, gate=gate)
    second = es.publish(edited(content, [0]), gate=gate)
    es.publish(edited(content, [0]), gate=gate)  # changes nothing: no gate
    assert first.gate == second.gate == verdict
    (none, first_reads), (served, second_reads) = seen
    assert none is None and served is es
    assert first_reads[:3] == [
        f"/{first.version}/_search",
        f"/{first.version}/_search",
        f"/{first.version}/_mget",
    ]
    assert second_reads[:3] == [
        f"/{second.version}/_search",
        f"/{second.version}/_search",
        f"/{second.version}/_mget",
    ]
    assert second_reads[-1] == f"/{ALIAS}/_search"
    assert fake.aliases[ALIAS] == second.version


def test_reads_inside_a_snapshot_stay_on_one_version_while_a_publish_moves_the_alias(
    fake: FakeElasticsearch, content: IndexContent
) -> None:
    es = backend(fake)
    first = es.publish(content).version
    rows, _ = content_rows(content)
    gone = rows.chunk_id[7]
    without = subset(content, (rows.chunk_id != gone).to_numpy())
    with es.snapshot():
        hits = [c for c, _ in es.lexical_search(rows.question_lemmas[7].split(), None, 5)]
        second = backend(fake).publish(without).version
        lookups = len(fake.calls("GET", "^/_alias/"))
        with es.snapshot():
            fetched = es.fetch(hits)
        stats = es.stats()
        assert len(fake.calls("GET", "^/_alias/")) == lookups  # resolved once, by the outer snapshot
    assert live(fake) == second and gone in hits and gone in fetched
    assert stats.chunks == len(content) and stats.location.endswith(f"-> {first}")
    assert not fake.calls(pattern=rf"^/{ALIAS}/")
    assert gone not in es.fetch(hits)  # outside a snapshot the alias is read again
    assert fake.requests[-1].path == f"/{ALIAS}/_mget"


def test_throttled_bulk_items_are_retried(fake: FakeElasticsearch, content: IndexContent) -> None:
    fake.throttle_items = 5
    report = backend(fake).publish(content)
    assert report.upserted == len(content)
    bulks = fake.calls(pattern="/_bulk$")
    assert len(bulks) == 2
    assert len(bulks[1].body) // 2 == 5  # only the rejected items are sent again


def test_queries(fake: FakeElasticsearch, content: IndexContent) -> None:
    es = backend(fake)
    es.publish(content)
    fake.requests.clear()
    vector = content_rows(content)[1][0]
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


def with_sentences(content: IndexContent) -> IndexContent:
    """`content` for the semantic mode, its sentence vectors made up (the requests are the test)."""
    sentences = np.random.default_rng(0).normal(size=(len(content), SENTENCE_DIM)).astype(np.float32)
    return semantic_content(content, sentences / np.linalg.norm(sentences, axis=1, keepdims=True))


def test_the_semantic_mode_stores_a_second_vector_and_searches_it_by_knn(
    fake: FakeElasticsearch, content: IndexContent
) -> None:
    semantic = with_sentences(content)
    es = backend(fake)
    es.publish(semantic)
    body = fake.calls("PUT", VERSION_NAME)[0].body
    assert body["mappings"]["properties"]["sentence_vector"] == {
        "type": "dense_vector",
        "dims": SENTENCE_DIM,
        "index": True,
        "similarity": "cosine",
    }
    assert body["mappings"]["_meta"]["reranker"] == "semantic"
    first_doc = fake.calls(pattern="/_bulk$")[0].body[1]
    assert len(first_doc["sentence_vector"]) == SENTENCE_DIM
    assert es.stats().reranker == "semantic"
    fake.requests.clear()
    found = es.candidates(["a-0", content.chunk_ids[0]])
    [mget] = fake.requests
    assert mget.path == f"/{ALIAS}/_mget" and mget.body == {"ids": ["a-0", content.chunk_ids[0]]}
    assert mget.params["_source_includes"].split(",") == [
        *["chunk_id", "doc_id", "course", "section", "question", "text"],
        *LEMMA_FIELD_COLUMNS,
        "sentence_vector",
    ]
    [candidate] = found.values()  # a-0 is no chunk of this content
    rows, _ = content_rows(semantic)
    assert candidate.lemmas["question_lemmas"] == rows.question_lemmas[0]
    sentences = next(semantic.vectors.parts()).sentences
    assert np.allclose(candidate.sentence, sentences[0])
    # the sentence kNN: one filtered kNN request on that field, after the index's record is read
    fake.requests.clear()
    with es.snapshot():
        found = es.sentence_search(sentences[3], "data-engineering-zoomcamp", 7)
    meta, knn = fake.requests[-2:]
    assert meta.path.endswith("/_mapping") and knn.path == f"/{live(fake)}/_search"
    assert knn.body["knn"]["field"] == "sentence_vector"
    assert knn.body["knn"]["filter"] == {"term": {"course": "data-engineering-zoomcamp"}}
    assert (knn.body["knn"]["k"], knn.body["knn"]["num_candidates"], knn.body["size"]) == (7, 100, 7)
    assert np.allclose(knn.body["knn"]["query_vector"], sentences[3])
    assert found[0] == rows.chunk_id[3] and len(found) == 7
    with es.snapshot():
        es.sentence_search(sentences[3], None, 7)
    assert not any(r.path.endswith("/_mapping") for r in fake.requests[-2:])  # the record is read once


def test_an_index_without_indexed_sentence_vectors_answers_no_knn_and_sends_none(
    fake: FakeElasticsearch, content: IndexContent
) -> None:
    """Another mode's index has no sentence vectors; one of an older mapping has them unindexed,
    and Elasticsearch would refuse a kNN on them: both answer [] until the next refresh rebuilds."""
    es = backend(fake)
    es.publish(replace(content, reranker="features"))
    query = np.ones(SENTENCE_DIM, dtype=np.float32) / np.sqrt(SENTENCE_DIM)
    fake.requests.clear()
    assert es.sentence_search(query, None, 5) == []
    assert not fake.calls(pattern="_search$")
    older = backend(fake)
    older.publish(with_sentences(content))
    index = live(fake)
    fake.indices[index].body["mappings"]["_meta"]["mapping_version"] = "older"
    fake.indices[index].body["mappings"]["properties"]["sentence_vector"]["index"] = False
    fake.requests.clear()
    assert backend(fake).sentence_search(query, None, 5) == []
    assert not fake.calls(pattern="_search$")


def test_without_the_semantic_mode_no_sentence_vector_is_sent(
    fake: FakeElasticsearch, content: IndexContent
) -> None:
    es = backend(fake)
    es.publish(replace(content, reranker="features"))
    first_doc = fake.calls(pattern="/_bulk$")[0].body[1]
    assert "sentence_vector" not in first_doc
    assert fake.calls("PUT", VERSION_NAME)[0].body["mappings"]["_meta"]["reranker"] == "features"
    [candidate] = es.candidates([content.chunk_ids[0]]).values()
    assert candidate.sentence is None


def test_term_frequencies_are_one_count_request_and_agree_with_the_embedded_index(
    fake: FakeElasticsearch, content: IndexContent, tmp_path: Path
) -> None:
    """The relevance's idf weights: how many chunks hold each query term, read without hits."""
    es = backend(fake)
    es.publish(content)
    terms = ["docker", "cours", "kafka", "lasagna"]
    start = len(fake.requests)
    rows, held = es.term_frequencies(terms)
    [request] = fake.requests[start:]
    assert (request.method, request.path) == ("POST", f"/{ALIAS}/_search")
    assert request.body == {
        "size": 0,
        "track_total_hits": True,
        "aggs": {
            "terms_held": {
                "filters": {
                    "filters": {
                        term: {"combined_fields": {"query": term, "fields": list(LEMMA_FIELD_COLUMNS)}}
                        for term in terms
                    }
                }
            }
        },
    }
    embedded = EmbeddedIndex(tmp_path)
    embedded.publish(content)
    assert (rows, held) == embedded.term_frequencies(terms)
    assert rows == len(content) and held["lasagna"] == 0 and held["cours"] > 0
