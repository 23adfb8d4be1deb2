"""The Elasticsearch backend: blue/green publishes behind an alias, the same ranking as embedded.

Each publish builds a new concrete index `<alias>-<UTC time to the microsecond>-<random suffix>`.
When a live index exists it is copied server-side with `_reindex` and only the delta (changed and
new chunks, deletions) is sent; otherwise everything is bulk-loaded. A source that changed nothing
writes nothing but `_meta.confirmed_at` on the live index. The new index is refreshed, its
document count checked against the chunks, the publish gate (if any) shown it beside the live one,
and only then is it marked complete in its `_meta` and the alias moved to it in one `_aliases`
call. Anything failing before the swap deletes the new index and leaves the alias where it was.
Only complete indices count as versions: the last `keep_previous` stay for rollback, older ones
are deleted, and incomplete leftovers are deleted once no run can still be writing them. Reads
inside `snapshot()` go to one concrete index, whatever the alias does meanwhile.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pydantic
from elasticsearch import ApiError, ConnectionTimeout, Elasticsearch, NotFoundError, TransportError
from elasticsearch.helpers import streaming_bulk

from rag_assets.common.errors import RagError
from rag_assets.common.progress import Progress
from rag_assets.index.backend import (
    LEMMA_FIELD_COLUMNS,
    SEMANTIC,
    Candidate,
    IndexContent,
    IndexNotFoundError,
    IndexStats,
    PublishError,
    PublishGate,
    PublishRefusedError,
    PublishReport,
    StoredChunk,
)
from rag_assets.index.ranking import FIELD_WEIGHTS
from rag_assets.ingest.sources import redact, stable_hash
from rag_assets.nlp.analysis import VECTOR_DIM
from rag_assets.nlp.sentence import SENTENCE_DIM

LEMMA_ANALYZER = "lemma_tokens"
_DISPLAY_FIELDS = ["chunk_id", "doc_id", "course", "section", "question", "text"]
_SOURCE_FIELDS = [*_DISPLAY_FIELDS, "chunk_index", "content_hash", "row_hash", *LEMMA_FIELD_COLUMNS]
_PAGE = 5000
# What the client raises when the cluster cannot be reached or refuses a request.
CLIENT_ERRORS = (ApiError, TransportError)


_ANALYSIS = {
    # The lemma fields hold terms already (runs of letters and digits, joined by spaces): split
    # on anything not a letter or digit, nothing else, giving the embedded index's terms.
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
    # The semantic mode's kNN first stage; in the other modes no document has one, so its graph is empty.
    "sentence_vector": {"type": "dense_vector", "dims": SENTENCE_DIM, "index": True, "similarity": "cosine"},
}
# Changes whenever the mapping or analysis does, so an index built otherwise is not reused.
MAPPING_VERSION = stable_hash(json.dumps(_PROPERTIES, sort_keys=True), json.dumps(_ANALYSIS, sort_keys=True))


def index_meta(published_at: str, content: IndexContent) -> dict[str, Any]:
    """The `_meta` a new index starts with: not complete until its publish marks it so."""
    return {
        "published_at": published_at,
        "confirmed_at": published_at,
        "mapping_version": MAPPING_VERSION,
        "analysis_fingerprint": content.fingerprint,
        "content_digest": content.digest,
        "content_sources": content.sources,
        "reranker": content.reranker,
        "complete": False,
    }


def index_body(shards: int, replicas: int, meta: dict[str, Any]) -> dict[str, Any]:
    """Settings and the explicit mapping of one concrete index."""
    return {
        "settings": {"number_of_shards": shards, "number_of_replicas": replicas, "analysis": _ANALYSIS},
        "mappings": {"dynamic": "strict", "_meta": meta, "properties": _PROPERTIES},
    }


def lexical_query(lemmas: Sequence[str], course: str | None, k: int) -> dict[str, Any]:
    """BM25F over the lemma fields (`combined_fields`), as the embedded index's postings do."""
    fields = [f"{c}^{FIELD_WEIGHTS[c.removesuffix('_lemmas')]:g}" for c in LEMMA_FIELD_COLUMNS]
    query: dict[str, Any] = {
        "bool": {
            "must": {"combined_fields": {"query": " ".join(lemmas), "fields": fields, "operator": "or"}},
        }
    }
    if course:
        query["bool"]["filter"] = [{"term": {"course": course}}]
    return {"size": k, "_source": False, "query": query}


def term_frequencies_query(terms: Sequence[str]) -> dict[str, Any]:
    """How many chunks hold each term in a lemma field (a `filters` bucket per term, matched as
    the lexical query matches it), and how many there are: no hit is read."""
    filters = {term: {"combined_fields": {"query": term, "fields": LEMMA_FIELD_COLUMNS}} for term in terms}
    return {"size": 0, "track_total_hits": True, "aggs": {"terms_held": {"filters": {"filters": filters}}}}


def knn_query(vector: np.ndarray, course: str | None, k: int, field: str = "vector") -> dict[str, Any]:
    """Approximate kNN over `field` with the course filter applied inside the search, not after it."""
    knn: dict[str, Any] = {
        "field": field,
        "query_vector": [float(x) for x in vector],
        "k": k,
        "num_candidates": min(10_000, max(100, 4 * k)),
    }
    if course:
        knn["filter"] = {"term": {"course": course}}
    return {"size": k, "_source": False, "knn": knn}


def chunk_source(row: Any, vector: np.ndarray, sentence: np.ndarray | None = None) -> dict[str, Any]:
    source = {field: getattr(row, field) for field in _SOURCE_FIELDS}
    source["chunk_index"] = int(source["chunk_index"])
    source["vector"] = [float(x) for x in vector]
    if sentence is not None:
        source["sentence_vector"] = [float(x) for x in sentence]
    return source


def delta_actions(
    index: str, content: IndexContent, changed: list[int], removed: list[str]
) -> Iterator[dict[str, Any]]:
    """Bulk actions writing the rows at positions `changed` and deleting the `removed` chunk ids.

    Made one at a time as `streaming_bulk` sends them: a million documents with their vectors as
    JSON numbers would not fit in memory at once.
    """
    for block in content.blocks(np.array(changed, dtype=np.int64)):
        sentences = [None] * len(block.rows) if block.sentences is None else list(block.sentences)
        rows = zip(block.rows.itertuples(index=False), block.vectors, sentences, strict=True)
        for row, vector, sentence in rows:
            source = chunk_source(row, vector, sentence)
            yield {"_op_type": "index", "_index": index, "_id": row.chunk_id, "_source": source}
    for chunk_id in removed:
        yield {"_op_type": "delete", "_index": index, "_id": chunk_id}


LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_log = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(risk: str) -> None:
    """Each risk once per process (a client is made per resource use), as a WARNING log line."""
    if risk not in _warned:
        _warned.add(risk)
        _log.warning(risk)


# Least privilege on the cluster: the pipeline manages only its own indices and alias, the
# search services only read them. `rag es-users` creates these roles, and a user of each name.
PIPELINE_ROLE, READER_ROLE = "rag_pipeline", "rag_reader"
_ROLE_PRIVILEGES = {
    # create and delete versions, bulk-write them, reindex from the live one, refresh, read its
    # _meta and write it (put mapping: manage), move the alias (manage on index and alias)
    PIPELINE_ROLE: ["create_index", "delete_index", "manage", "read", "write", "view_index_metadata"],
    # search, mget, count, and the _meta and alias reads of `rag stats`
    READER_ROLE: ["read", "view_index_metadata"],
}


def roles(alias: str) -> dict[str, dict[str, Any]]:
    """The role bodies for `alias`: no cluster privilege, index privileges on the alias and its
    versions (`<alias>-*`) only."""
    return {
        role: {"cluster": [], "indices": [{"names": [alias, f"{alias}-*"], "privileges": privileges}]}
        for role, privileges in _ROLE_PRIVILEGES.items()
    }


def create_users(client: Elasticsearch, alias: str, passwords: dict[str, str]) -> list[str]:
    """Create (or update) each role and a user of the same name holding it; what was done."""
    done = []
    for role, body in roles(alias).items():
        client.security.put_role(name=role, **body)
        client.security.put_user(username=role, password=passwords[role], roles=[role])
        privileges = ", ".join(body["indices"][0]["privileges"])
        done.append(f"role and user {role}: {privileges} on {alias} and {alias}-*")
    return done


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

    def risks(self) -> list[str]:
        """What these settings expose, in one line each: credentials in clear over the network, a
        certificate nobody checks. Loopback is exempt: nothing crosses a network."""
        risks = []
        parts = urlsplit(self.url)
        credentials = self.api_key or self.username
        if parts.scheme == "http" and credentials and parts.hostname not in LOOPBACK:
            risks.append(
                f"ELASTICSEARCH_URL is http:// ({redact(self.url)}): the credentials and every document "
                "cross the network in clear; use https:// (ELASTICSEARCH_CA_CERTS names the cluster's CA)"
            )
        if parts.scheme == "https" and not self.verify_certs:
            risks.append(
                "ELASTICSEARCH_VERIFY_CERTS=false: the cluster's certificate is not checked, so anyone "
                "on the path can pose as it and read the credentials; set ELASTICSEARCH_CA_CERTS instead"
            )
        return risks

    def client(self) -> Elasticsearch:
        for risk in self.risks():
            _warn_once(risk)
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

    def open_index(self, log: Callable[[str], None] | None = None) -> ElasticsearchIndex:
        return ElasticsearchIndex(
            self.client(),
            self.alias,
            url=redact(self.url),
            shards=self.shards,
            replicas=self.replicas,
            keep_previous=self.keep_previous,
            log=log,
        )


@dataclass(frozen=True)
class IndexVersion:
    name: str
    documents: int
    created_at: str
    live: bool
    complete: bool  # loaded, counted and passed the gate; else a leftover, never a rollback target
    completed_documents: int | None  # the count recorded when it was marked complete


class _StepFailed(Exception):
    """A publish step went wrong without a client error (rejected bulk items, a wrong count)."""


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
        orphan_age_s: float = 3600.0,
        bulk_chunk_size: int = 500,
        bulk_max_retries: int = 5,
        bulk_initial_backoff_s: float = 1.0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.alias = alias
        self.location = f"{url.rstrip('/')}/{alias}" if url else alias
        self.shards = shards
        self.replicas = replicas
        self.keep_previous = keep_previous
        self.orphan_age_s = orphan_age_s
        self.bulk_chunk_size = bulk_chunk_size
        self.bulk_max_retries = bulk_max_retries
        self.bulk_initial_backoff_s = bulk_initial_backoff_s
        self._log = log  # progress of long bulk loads (the Dagster log)
        self._pinned: str | None = None  # the concrete index reads go to, inside a snapshot
        self._records: dict[str, dict[str, Any]] = {}  # concrete index -> its _meta, read once

    # -- publishing -------------------------------------------------------------------------

    def publish(self, content: IndexContent, gate: PublishGate | None = None) -> PublishReport:
        live = self.live_index()
        live_meta = self._meta(live) if live is not None else {}
        served = self._served_hashes(live, live_meta)
        changed = [
            i
            for i, (cid, h) in enumerate(zip(content.chunk_ids, content.row_hashes, strict=True))
            if served.get(cid) != h
        ]
        removed = sorted(set(served) - set(content.chunk_ids))
        report = PublishReport(
            location=self.location,
            chunks=len(content),
            upserted=len(changed),
            deleted=len(removed),
            unchanged=len(content) - len(changed),
            version=live,
            previous=live,
        )
        same_analysis = live_meta.get("analysis_fingerprint") == content.fingerprint
        if live is not None and not changed and not removed and same_analysis:
            # The live index already holds exactly this content: only say it was found current.
            confirmed = {
                **live_meta,
                "content_digest": content.digest,
                "content_sources": content.sources,
                "reranker": content.reranker,
            }
            return replace(report, warnings=tuple(self._confirm(live, confirmed)))
        now = datetime.now(UTC)
        name = f"{self.alias}-{now:%Y%m%d%H%M%S%f}-{uuid.uuid4().hex[:6]}"
        meta = index_meta(now.isoformat(timespec="seconds"), content)
        try:
            with self._step(name, live, "creating it"):
                self.client.indices.create(index=name, **index_body(self.shards, self.replicas, meta))
            if served:
                with self._step(name, live, f"copying {live} into it"):
                    self.client.reindex(
                        source={"index": live}, dest={"index": name}, wait_for_completion=True, refresh=False
                    )
            with self._step(name, live, "sending the bulk actions"):
                self._bulk(delta_actions(name, content, changed, removed), len(changed) + len(removed))
            with self._step(name, live, "refreshing it"):
                self.client.indices.refresh(index=name)
            with self._step(name, live, "counting its documents"):
                count = self.client.count(index=name)["count"]
                if count != len(content):
                    raise _StepFailed(f"it holds {count}, expected {len(content)}")
            verdict = None
            if gate is not None:
                verdict = gate(self._reading(name), self if live is not None else None)
                if not verdict.passed:
                    raise PublishRefusedError(verdict)
            with self._step(name, live, "marking it complete"):
                self._put_meta(name, {**meta, "complete": True, "documents": count})
            with self._step(name, live, "moving the alias to it"):
                self._swap(live, name)
        except BaseException:
            self.client.options(ignore_status=404).indices.delete(index=name)
            raise
        return replace(report, version=name, gate=verdict, warnings=tuple(self._delete_old_versions()))

    def confirm(self, digest: str) -> PublishReport | None:
        try:
            live = self.live_index()
            meta = {} if live is None else self._meta(live)
        except CLIENT_ERRORS:
            return None  # the publish reports the cluster's problem in its own words
        current = meta.get("complete") and meta.get("mapping_version") == MAPPING_VERSION
        if live is None or not digest or not current or meta.get("content_digest") != digest:
            return None
        chunks = int(meta.get("documents", 0))
        return PublishReport(
            location=self.location,
            chunks=chunks,
            upserted=0,
            deleted=0,
            unchanged=chunks,
            version=live,
            previous=live,
            warnings=tuple(self._confirm(live, meta)),
        )

    @contextmanager
    def _step(self, name: str, live: str | None, step: str) -> Iterator[None]:
        """One line saying which step of building `name` failed and that nothing is served from it."""
        try:
            yield
        except (*CLIENT_ERRORS, _StepFailed) as exc:
            raise PublishError(
                f"publishing {name} failed while {step} ({describe_error(exc)}); "
                f"the alias {self.alias} still points at {live or 'nothing'}"
            ) from exc

    def _served_hashes(self, live: str | None, meta: dict[str, Any]) -> dict[str, str]:
        """chunk_id -> row_hash of the live index, or nothing when it cannot seed the next one."""
        if live is None:
            return {}
        if meta.get("mapping_version") != MAPPING_VERSION:
            return {}  # built with another mapping: load everything into the new one
        return {cid: row_hash for cid, (_, row_hash) in self._hashes(live).items()}

    def _confirm(self, live: str, meta: dict[str, Any]) -> list[str]:
        """Record that a refresh found `live` current; failing to is a warning, `live` is fine."""
        try:
            self._put_meta(live, {**meta, "confirmed_at": datetime.now(UTC).isoformat(timespec="seconds")})
        except CLIENT_ERRORS as exc:
            return [f"could not record that {live} is current: {describe_error(exc)}"]
        return []

    def _meta(self, index: str) -> dict[str, Any]:
        return self.client.indices.get_mapping(index=index)[index]["mappings"].get("_meta", {})

    def _put_meta(self, index: str, meta: dict[str, Any]) -> None:
        """Elasticsearch replaces `_meta` as a whole: `meta` carries every key to keep."""
        self.client.indices.put_mapping(index=index, meta=meta)

    def _bulk(self, actions: Iterable[dict[str, Any]], total: int) -> None:
        failures: list[str] = []
        failed = 0
        progress = Progress("bulk", total, self._log)
        for ok, item in streaming_bulk(
            self.client,
            actions,
            chunk_size=self.bulk_chunk_size,
            max_retries=self.bulk_max_retries,
            initial_backoff=self.bulk_initial_backoff_s,
            raise_on_error=False,
        ):
            progress.update()
            if not ok:
                failed += 1
                if len(failures) < 3:
                    [(op, result)] = item.items()
                    error = result.get("error", {})
                    reason = error.get("reason", error) if isinstance(error, dict) else error
                    failures.append(f"{op} {result.get('_id')}: {result.get('status')} {reason}")
        progress.close()
        if failed:
            raise _StepFailed(f"{failed} of {total} failed; first: {'; '.join(failures)}")

    def _swap(self, live: str | None, name: str) -> None:
        actions: list[dict[str, Any]] = [{"add": {"index": name, "alias": self.alias}}]
        if live is not None:
            actions.insert(0, {"remove": {"index": live, "alias": self.alias}})
        self.client.indices.update_aliases(actions=actions)

    def _delete_old_versions(self) -> list[str]:
        """Keep the last `keep_previous` complete versions; delete older ones and old leftovers.

        An incomplete index (a failed publish whose cleanup failed, or one re-created by a bulk
        request that ran on after the publish gave up) never counts as a version. It is deleted
        once older than `orphan_age_s`: the refresh job's maximum runtime (`dagster/max_runtime`,
        an hour) has passed, so no run can still be writing it; a younger one may be the new index
        of a publish running now.
        Retention runs after the swap: a failure here leaves a spare index, not a broken one. So it
        is reported as a warning (the next publish tries again) instead of failing a run whose
        index is already served.
        """
        try:
            versions = [v for v in self.versions() if not v.live]
        except CLIENT_ERRORS as exc:
            return [f"could not list old versions of {self.alias} for retention: {describe_error(exc)}"]
        cutoff = datetime.now(UTC) - timedelta(seconds=self.orphan_age_s)
        doomed = [v.name for v in versions if v.complete][self.keep_previous :]
        doomed += [
            v.name for v in versions if not v.complete and datetime.fromisoformat(v.created_at) <= cutoff
        ]
        warnings = []
        for name in doomed:
            try:
                self.client.options(ignore_status=404).indices.delete(index=name)
            except CLIENT_ERRORS as exc:
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
        """The concrete indices named like this backend's own, newest first, complete or not."""
        live = self.live_index()
        indices = self.client.indices.get(index=f"{self.alias}-*", expand_wildcards="open")
        own = re.compile(rf"{re.escape(self.alias)}-\d{{20}}-[0-9a-f]{{6}}")
        versions = []
        for name in sorted((name for name in indices.body if own.fullmatch(name)), reverse=True):
            meta = indices[name]["mappings"].get("_meta", {})
            created_ms = int(indices[name]["settings"]["index"]["creation_date"])
            versions.append(
                IndexVersion(
                    name=name,
                    documents=int(self.client.count(index=name)["count"]),
                    created_at=datetime.fromtimestamp(created_ms / 1000, UTC).isoformat(timespec="seconds"),
                    live=name == live,
                    complete=meta.get("complete") is True,
                    completed_documents=meta.get("documents"),
                )
            )
        return versions

    def rollback(self, target: str | None = None) -> str:
        """Point the alias at `target`, by default the newest complete index older than the live one.

        An index that was never marked complete, or holds another count than when it was, is
        refused: it would serve part of the FAQ.
        """
        versions = self.versions()
        live = next((v.name for v in versions if v.live), None)
        names = ", ".join(v.name for v in versions) or "none"
        if target is None:
            older = [v for v in versions if v.complete and (live is None or v.name < live)]
            if not older:
                raise RagError(f"no earlier index to roll back to; versions: {names}")
            version = older[0]
        else:
            found = [v for v in versions if v.name == target]
            if not found:
                raise RagError(f"{target} is not a version of {self.alias}; versions: {names}")
            version = found[0]
        if not version.complete:
            raise RagError(
                f"not rolling back to {version.name}: it was never marked complete "
                f"(it holds {version.documents} documents)"
            )
        if version.documents != version.completed_documents:
            raise RagError(
                f"not rolling back to {version.name}: it holds {version.documents} documents, "
                f"{version.completed_documents} when it was marked complete"
            )
        if version.name != live:
            self._swap(live, version.name)
        return version.name

    # -- reading ----------------------------------------------------------------------------

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads inside go to the concrete index the alias names on entry, not to the alias.

        A search ranks, then fetches; a publish moving the alias in between would make the fetch
        read another version. Nested snapshots keep the outer one's index.
        """
        if self._pinned is not None:
            yield
            return
        self._pinned = self._concrete()
        try:
            yield
        finally:
            self._pinned = None

    def _reading(self, index: str) -> ElasticsearchIndex:
        """This backend with every read going to `index`, as inside a snapshot of it."""
        view = copy.copy(self)
        view._pinned = index
        return view

    def _concrete(self) -> str:
        """The concrete index reads go to: the snapshot's, else the one the alias names now."""
        index = self._pinned or self.live_index()
        if index is None:
            raise self._missing()
        return index

    def _search(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        return self._search_body(body)["hits"]["hits"]

    def _search_body(self, body: dict[str, Any]) -> Any:
        """The whole response of a search of the served (or pinned) index."""
        try:
            return self.client.search(index=self._pinned or self.alias, **body)
        except NotFoundError as exc:
            raise self._missing() from exc

    def _missing(self) -> IndexNotFoundError:
        return IndexNotFoundError(
            f"no index behind alias {self.alias} at {self.location}: materialize es_index first"
        )

    def lexical_search(self, lemmas: Sequence[str], course: str | None, k: int) -> list[tuple[str, float]]:
        if not lemmas:
            return []
        return [(hit["_id"], float(hit["_score"])) for hit in self._search(lexical_query(lemmas, course, k))]

    def vector_search(self, vector: np.ndarray, course: str | None, k: int) -> list[str]:
        return [hit["_id"] for hit in self._search(knn_query(vector, course, k))]

    def sentence_search(self, sentence: np.ndarray, course: str | None, k: int) -> list[str]:
        record = self._record()
        # Only an index of this mapping has its sentence vectors indexed for kNN.
        if record.get("reranker") != SEMANTIC or record.get("mapping_version") != MAPPING_VERSION:
            return []
        return [hit["_id"] for hit in self._search(knn_query(sentence, course, k, "sentence_vector"))]

    def term_frequencies(self, terms: Sequence[str]) -> tuple[int, dict[str, int]]:
        found = self._search_body(term_frequencies_query(terms))
        buckets = found["aggregations"]["terms_held"]["buckets"]
        return int(found["hits"]["total"]["value"]), {t: int(buckets[t]["doc_count"]) for t in terms}

    def fetch(self, chunk_ids: Sequence[str]) -> dict[str, StoredChunk]:
        return {
            doc["_id"]: StoredChunk(**{f: doc["_source"][f] for f in _DISPLAY_FIELDS})
            for doc in self._mget(chunk_ids, _DISPLAY_FIELDS)
        }

    def candidates(self, chunk_ids: Sequence[str]) -> dict[str, Candidate]:
        found = {}
        for doc in self._mget(chunk_ids, [*_DISPLAY_FIELDS, *LEMMA_FIELD_COLUMNS, "sentence_vector"]):
            source = doc["_source"]
            sentence = source.get("sentence_vector")
            found[doc["_id"]] = Candidate(
                StoredChunk(**{f: source[f] for f in _DISPLAY_FIELDS}),
                {f: source[f] for f in LEMMA_FIELD_COLUMNS},
                None if sentence is None else np.asarray(sentence, dtype=np.float32),
            )
        return found

    def _mget(self, chunk_ids: Sequence[str], fields: list[str]) -> list[dict[str, Any]]:
        """The found documents of `chunk_ids`, with `fields` of their source: one request."""
        if not chunk_ids:
            return []
        try:
            index = self._pinned or self.alias
            docs = self.client.mget(index=index, ids=list(chunk_ids), source_includes=fields)
        except NotFoundError as exc:
            raise self._missing() from exc
        return [doc for doc in docs["docs"] if doc.get("found")]

    def stats(self) -> IndexStats:
        live = self._concrete()
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
        meta = self._meta(live)
        aggs = result["aggregations"]
        return IndexStats(
            backend=self.kind,
            location=f"{self.location} -> {live}",
            entries=int(aggs["entries"]["value"]),
            chunks=int(result["hits"]["total"]["value"]),
            courses={b["key"]: int(b["entries"]["value"]) for b in aggs["courses"]["buckets"]},
            published_at=meta.get("published_at"),
            # Indices published before confirmed_at existed were confirmed when published.
            confirmed_at=meta.get("confirmed_at", meta.get("published_at")),
            reranker=meta.get("reranker"),
        )

    def chunk_hashes(self) -> dict[str, str]:
        return {cid: content for cid, (content, _) in self._hashes(self._concrete()).items()}

    def analysis_fingerprint(self) -> str | None:
        return self._record().get("analysis_fingerprint")

    def _record(self) -> dict[str, Any]:
        """The served index's `_meta`, read once per concrete index: a new publish is a new
        index, with its own record."""
        index = self._concrete()
        if index not in self._records:
            self._records[index] = self._meta(index)
        return self._records[index]

    def served_sources(self) -> dict[str, list[str]]:
        live = self.live_index()
        return {} if live is None else dict(self._meta(live).get("content_sources", {}))

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
    """A one-line reason from a client error, naming the setting to check, without request
    details that could hold secrets."""
    if isinstance(exc, ApiError):
        error = exc.body.get("error") if isinstance(exc.body, dict) else None
        reason = error.get("reason", exc.message) if isinstance(error, dict) else (error or exc.message)
        advice = _SETTING_TO_CHECK.get(exc.meta.status, "")
        return f"Elasticsearch answered {exc.meta.status}: {reason}{advice}"
    if isinstance(exc, ConnectionTimeout):  # reached, but slow: it may still carry the request out
        return f"Elasticsearch did not answer in time: {exc.message}"
    if isinstance(exc, TransportError):
        return (
            f"cannot reach Elasticsearch: {exc.message}; check ELASTICSEARCH_URL and that the cluster is up"
        )
    return str(exc)


# What a refusal by status means for the user's settings.
_SETTING_TO_CHECK = {
    401: "; check ELASTICSEARCH_API_KEY (or ELASTICSEARCH_USERNAME and ELASTICSEARCH_PASSWORD)",
    403: "; the credentials in ELASTICSEARCH_API_KEY (or ELASTICSEARCH_USERNAME) lack a privilege this needs",
}
