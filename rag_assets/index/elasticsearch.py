"""The Elasticsearch backend: blue/green publishes behind an alias, the same ranking as embedded.

Each publish builds a new concrete index `<alias>-<UTC time to the microsecond>-<random suffix>`.
When a live index exists it is copied server-side with `_reindex` and only the delta (changed and
new chunks, deletions) is sent; otherwise everything is bulk-loaded. A source that changed nothing
writes nothing. The new index is refreshed and its document count
checked against the chunks before the alias moves to it in one `_aliases` call. Anything failing
before the swap deletes the new index and leaves the alias where it was. The last `keep_previous`
indices stay for rollback; older ones are deleted.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pydantic
from elasticsearch import ApiError, Elasticsearch, NotFoundError, TransportError
from elasticsearch.helpers import streaming_bulk

from rag_assets.common.errors import RagError
from rag_assets.index.backend import (
    LEMMA_FIELD_COLUMNS,
    IndexContent,
    IndexNotFoundError,
    IndexStats,
    PublishError,
    PublishReport,
    StoredChunk,
)
from rag_assets.index.ranking import FIELD_WEIGHTS
from rag_assets.ingest.sources import redact, stable_hash
from rag_assets.nlp.analysis import VECTOR_DIM

LEMMA_ANALYZER = "lemma_tokens"
_DISPLAY_FIELDS = ["chunk_id", "doc_id", "course", "section", "question", "text"]
_SOURCE_FIELDS = [*_DISPLAY_FIELDS, "chunk_index", "content_hash", "row_hash", *LEMMA_FIELD_COLUMNS]
_PAGE = 5000


_ANALYSIS = {
    # The lemma fields hold lemmas already: split like the embedded index's FTS5 unicode61
    # tokenizer (on anything not a letter or digit), nothing else.
    "tokenizer": {"lemma_split": {"type": "pattern", "pattern": "[^\\p{L}\\p{N}]+"}},
    "analyzer": {LEMMA_ANALYZER: {"type": "custom", "tokenizer": "lemma_split", "filter": ["lowercase"]}},
}
_STORED = {"type": "text", "index": False}
_KEYWORD = {"type": "keyword"}
_PROPERTIES = {
    "chunk_id": _KEYWORD,
    "doc_id": _KEYWORD,
    "course": _KEYWORD,
    "chunk_index": {"type": "integer"},
    "content_hash": _KEYWORD,
    "row_hash": _KEYWORD,
    "section": _STORED,
    "question": _STORED,
    "text": _STORED,
    **{field: {"type": "text", "analyzer": LEMMA_ANALYZER} for field in LEMMA_FIELD_COLUMNS},
    "vector": {"type": "dense_vector", "dims": VECTOR_DIM, "index": True, "similarity": "cosine"},
}
# Changes whenever the mapping or analysis does, so an index built otherwise is not reused.
MAPPING_VERSION = stable_hash(json.dumps(_PROPERTIES, sort_keys=True), json.dumps(_ANALYSIS, sort_keys=True))


def index_body(shards: int, replicas: int, published_at: str) -> dict[str, Any]:
    """Settings and the explicit mapping of one concrete index."""
    return {
        "settings": {"number_of_shards": shards, "number_of_replicas": replicas, "analysis": _ANALYSIS},
        "mappings": {
            "dynamic": "strict",
            "_meta": {"published_at": published_at, "mapping_version": MAPPING_VERSION},
            "properties": _PROPERTIES,
        },
    }


def lexical_query(lemmas: Sequence[str], course: str | None, k: int) -> dict[str, Any]:
    """BM25F over the lemma fields (`combined_fields`), as FTS5's weighted bm25 does."""
    fields = [f"{c}^{FIELD_WEIGHTS[c.removesuffix('_lemmas')]:g}" for c in LEMMA_FIELD_COLUMNS]
    query: dict[str, Any] = {
        "bool": {
            "must": {"combined_fields": {"query": " ".join(lemmas), "fields": fields, "operator": "or"}},
        }
    }
    if course:
        query["bool"]["filter"] = [{"term": {"course": course}}]
    return {"size": k, "_source": False, "query": query}


def knn_query(vector: np.ndarray, course: str | None, k: int) -> dict[str, Any]:
    """Approximate kNN with the course filter applied inside the search, not after it."""
    knn: dict[str, Any] = {
        "field": "vector",
        "query_vector": [float(x) for x in vector],
        "k": k,
        "num_candidates": min(10_000, max(100, 4 * k)),
    }
    if course:
        knn["filter"] = {"term": {"course": course}}
    return {"size": k, "_source": False, "knn": knn}


def chunk_source(row: Any, vector: np.ndarray) -> dict[str, Any]:
    source = {field: getattr(row, field) for field in _SOURCE_FIELDS}
    source["chunk_index"] = int(source["chunk_index"])
    source["vector"] = [float(x) for x in vector]
    return source


@dataclass(frozen=True)
class ElasticsearchSettings:
    """How to reach the cluster and lay out the indices; the Dagster resource mirrors these fields."""

    url: str
    api_key: str | None = None
    username: str | None = None
    password: str | None = None
    verify_certs: bool = True
    ca_certs: str | None = None
    request_timeout_s: float = 30.0
    max_retries: int = 3
    alias: str = "faq-chunks"
    shards: int = 1
    replicas: int = 0
    keep_previous: int = 2

    @classmethod
    def parse(cls, values: dict[str, Any]) -> ElasticsearchSettings:
        """From strings (environment variables): "false", "30", ... become the field types."""
        return pydantic.TypeAdapter(cls).validate_python(values)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def client(self) -> Elasticsearch:
        auth: dict[str, object] = {}
        if self.api_key:
            auth["api_key"] = self.api_key
        elif self.username:
            auth["basic_auth"] = (self.username, self.password or "")
        return Elasticsearch(
            self.url,
            verify_certs=self.verify_certs,
            ca_certs=self.ca_certs,
            request_timeout=self.request_timeout_s,
            max_retries=self.max_retries,
            retry_on_timeout=True,
            retry_on_status=(429, 502, 503, 504),
            **auth,
        )

    def open_index(self) -> ElasticsearchIndex:
        return ElasticsearchIndex(
            self.client(),
            self.alias,
            url=redact(self.url),
            shards=self.shards,
            replicas=self.replicas,
            keep_previous=self.keep_previous,
        )


@dataclass(frozen=True)
class IndexVersion:
    name: str
    documents: int
    created_at: str
    live: bool


class ElasticsearchIndex:
    kind = "elasticsearch"

    def __init__(
        self,
        client: Elasticsearch,
        alias: str,
        *,
        url: str = "",
        shards: int = 1,
        replicas: int = 0,
        keep_previous: int = 2,
        bulk_chunk_size: int = 500,
        bulk_max_retries: int = 5,
        bulk_initial_backoff_s: float = 1.0,
    ) -> None:
        self.client = client
        self.alias = alias
        self.location = f"{url.rstrip('/')}/{alias}" if url else alias
        self.shards = shards
        self.replicas = replicas
        self.keep_previous = keep_previous
        self.bulk_chunk_size = bulk_chunk_size
        self.bulk_max_retries = bulk_max_retries
        self.bulk_initial_backoff_s = bulk_initial_backoff_s

    # -- publishing -------------------------------------------------------------------------

    def publish(self, content: IndexContent) -> PublishReport:
        live = self.live_index()
        served = self._served_hashes(live)
        rows = content.rows
        changed = [
            i
            for i, (cid, h) in enumerate(zip(rows.chunk_id, rows.row_hash, strict=True))
            if served.get(cid) != h
        ]
        removed = sorted(set(served) - set(rows.chunk_id))
        report = PublishReport(
            location=self.location,
            chunks=len(rows),
            upserted=len(changed),
            deleted=len(removed),
            unchanged=len(rows) - len(changed),
            version=live,
            previous=live,
        )
        if live is not None and not changed and not removed:
            return report  # the live index already holds exactly this content
        now = datetime.now(UTC)
        name = f"{self.alias}-{now:%Y%m%d%H%M%S%f}-{uuid.uuid4().hex[:6]}"
        self.client.indices.create(
            index=name, **index_body(self.shards, self.replicas, now.isoformat(timespec="seconds"))
        )
        try:
            if served:
                self.client.reindex(
                    source={"index": live}, dest={"index": name}, wait_for_completion=True, refresh=False
                )
            wanted = set(changed)
            actions = [
                {
                    "_op_type": "index",
                    "_index": name,
                    "_id": row.chunk_id,
                    "_source": chunk_source(row, vector),
                }
                for i, (row, vector) in enumerate(
                    zip(rows.itertuples(index=False), content.vectors, strict=True)
                )
                if i in wanted
            ]
            actions.extend({"_op_type": "delete", "_index": name, "_id": cid} for cid in removed)
            self._bulk(actions)
            self.client.indices.refresh(index=name)
            count = self.client.count(index=name)["count"]
            if count != len(rows):
                raise PublishError(
                    f"index {name} holds {count} documents after loading, expected {len(rows)}; "
                    f"the alias {self.alias} was not moved"
                )
            try:
                self._swap(live, name)
            except ApiError as exc:
                raise PublishError(
                    f"moving alias {self.alias} to {name} failed ({describe_error(exc)}); "
                    f"it still points at {live or 'nothing'}"
                ) from exc
        except BaseException:
            self.client.options(ignore_status=404).indices.delete(index=name)
            raise
        return replace(report, version=name, warnings=tuple(self._delete_old_versions()))

    def _served_hashes(self, live: str | None) -> dict[str, str]:
        """chunk_id -> row_hash of the live index, or nothing when it cannot seed the next one."""
        if live is None:
            return {}
        mapping = self.client.indices.get_mapping(index=live)[live]["mappings"]
        if mapping.get("_meta", {}).get("mapping_version") != MAPPING_VERSION:
            return {}  # built with another mapping: load everything into the new one
        return {cid: row_hash for cid, (_, row_hash) in self._hashes(live).items()}

    def _bulk(self, actions: list[dict[str, Any]]) -> None:
        failures: list[str] = []
        failed = 0
        for ok, item in streaming_bulk(
            self.client,
            actions,
            chunk_size=self.bulk_chunk_size,
            max_retries=self.bulk_max_retries,
            initial_backoff=self.bulk_initial_backoff_s,
            raise_on_error=False,
        ):
            if not ok:
                failed += 1
                if len(failures) < 3:
                    [(op, result)] = item.items()
                    error = result.get("error", {})
                    reason = error.get("reason", error) if isinstance(error, dict) else error
                    failures.append(f"{op} {result.get('_id')}: {result.get('status')} {reason}")
        if failed:
            raise PublishError(
                f"{failed} of {len(actions)} bulk actions failed; first: {'; '.join(failures)}"
            )

    def _swap(self, live: str | None, name: str) -> None:
        actions: list[dict[str, Any]] = [{"add": {"index": name, "alias": self.alias}}]
        if live is not None:
            actions.insert(0, {"remove": {"index": live, "alias": self.alias}})
        self.client.indices.update_aliases(actions=actions)

    def _delete_old_versions(self) -> list[str]:
        """Retention runs after the swap: a failure here leaves a spare index, not a broken one.

        So it is reported as a warning (the next publish tries again) instead of failing a run
        whose index is already served.
        """
        try:
            older = [v.name for v in self.versions() if not v.live][self.keep_previous :]
        except (ApiError, TransportError) as exc:
            return [f"could not list old versions of {self.alias} for retention: {describe_error(exc)}"]
        warnings = []
        for name in older:
            try:
                self.client.options(ignore_status=404).indices.delete(index=name)
            except (ApiError, TransportError) as exc:
                warnings.append(f"could not delete old version {name}: {describe_error(exc)}")
        return warnings

    # -- versions ---------------------------------------------------------------------------

    def live_index(self) -> str | None:
        try:
            aliases = self.client.indices.get_alias(name=self.alias)
        except NotFoundError:
            return None
        names = sorted(aliases.body)
        if len(names) > 1:
            raise RagError(f"alias {self.alias} points at several indices: {', '.join(names)}")
        return names[0]

    def versions(self) -> list[IndexVersion]:
        """The concrete indices this backend created for the alias, newest first."""
        live = self.live_index()
        indices = self.client.indices.get(index=f"{self.alias}-*", expand_wildcards="open")
        own = re.compile(rf"{re.escape(self.alias)}-\d{{20}}-[0-9a-f]{{6}}")
        counts = {
            name: int(self.client.count(index=name)["count"]) for name in indices.body if own.fullmatch(name)
        }
        return [
            IndexVersion(
                name=name,
                documents=counts[name],
                created_at=datetime.fromtimestamp(
                    int(indices[name]["settings"]["index"]["creation_date"]) / 1000, UTC
                ).isoformat(timespec="seconds"),
                live=name == live,
            )
            for name in sorted(counts, reverse=True)
        ]

    def rollback(self, target: str | None = None) -> str:
        """Point the alias at `target`, by default the newest index older than the live one."""
        versions = self.versions()
        live = next((v.name for v in versions if v.live), None)
        names = [v.name for v in versions]
        if target is None:
            older = [v.name for v in versions if live is None or v.name < live]
            if not older:
                raise RagError(f"no earlier index to roll back to; versions: {', '.join(names) or 'none'}")
            target = older[0]
        elif target not in names:
            raise RagError(
                f"{target} is not a version of {self.alias}; versions: {', '.join(names) or 'none'}"
            )
        if target != live:
            self._swap(live, target)
        return target

    # -- reading ----------------------------------------------------------------------------

    def _search(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            return self.client.search(index=self.alias, **body)["hits"]["hits"]
        except NotFoundError as exc:
            raise self._missing() from exc

    def _missing(self) -> IndexNotFoundError:
        return IndexNotFoundError(
            f"no index behind alias {self.alias} at {self.location}: materialize es_index first"
        )

    def lexical_search(self, lemmas: Sequence[str], course: str | None, k: int) -> list[str]:
        if not lemmas:
            return []
        return [hit["_id"] for hit in self._search(lexical_query(lemmas, course, k))]

    def vector_search(self, vector: np.ndarray, course: str | None, k: int) -> list[str]:
        return [hit["_id"] for hit in self._search(knn_query(vector, course, k))]

    def fetch(self, chunk_ids: Sequence[str]) -> dict[str, StoredChunk]:
        if not chunk_ids:
            return {}
        try:
            docs = self.client.mget(index=self.alias, ids=list(chunk_ids), source_includes=_DISPLAY_FIELDS)
        except NotFoundError as exc:
            raise self._missing() from exc
        return {
            doc["_id"]: StoredChunk(**{f: doc["_source"][f] for f in _DISPLAY_FIELDS})
            for doc in docs["docs"]
            if doc.get("found")
        }

    def stats(self) -> IndexStats:
        live = self.live_index()
        if live is None:
            raise self._missing()
        result = self.client.search(
            index=live,
            size=0,
            track_total_hits=True,
            aggs={
                "entries": {"cardinality": {"field": "doc_id", "precision_threshold": 40000}},
                "courses": {
                    "terms": {"field": "course", "size": 1000, "order": {"_key": "asc"}},
                    "aggs": {"entries": {"cardinality": {"field": "doc_id", "precision_threshold": 40000}}},
                },
            },
        )
        mapping = self.client.indices.get_mapping(index=live)[live]["mappings"]
        aggs = result["aggregations"]
        return IndexStats(
            backend=self.kind,
            location=f"{self.location} -> {live}",
            entries=int(aggs["entries"]["value"]),
            chunks=int(result["hits"]["total"]["value"]),
            courses={b["key"]: int(b["entries"]["value"]) for b in aggs["courses"]["buckets"]},
            published_at=mapping.get("_meta", {}).get("published_at"),
        )

    def chunk_hashes(self) -> dict[str, str]:
        live = self.live_index()
        if live is None:
            raise self._missing()
        return {cid: content for cid, (content, _) in self._hashes(live).items()}

    def _hashes(self, index: str) -> dict[str, tuple[str, str]]:
        """chunk_id -> (content_hash, row_hash), paged with search_after on the chunk id."""
        hashes: dict[str, tuple[str, str]] = {}
        for hit in self._scan(index):
            hashes[hit["_id"]] = (hit["_source"]["content_hash"], hit["_source"]["row_hash"])
        return hashes

    def _scan(self, index: str) -> Iterator[dict[str, Any]]:
        after: list[Any] | None = None
        while True:
            page = self.client.search(
                index=index,
                size=_PAGE,
                source_includes=["content_hash", "row_hash"],
                sort=[{"chunk_id": "asc"}],
                **({"search_after": after} if after else {}),
            )["hits"]["hits"]
            yield from page
            if len(page) < _PAGE:
                return
            after = page[-1]["sort"]


def describe_error(exc: Exception) -> str:
    """A one-line reason from a client error, without request details that could hold secrets."""
    if isinstance(exc, ApiError):
        error = exc.body.get("error") if isinstance(exc.body, dict) else None
        reason = error.get("reason", exc.message) if isinstance(error, dict) else (error or exc.message)
        return f"Elasticsearch answered {exc.meta.status}: {reason}"
    if isinstance(exc, TransportError):
        return f"cannot reach Elasticsearch: {exc.message}"
    return str(exc)
