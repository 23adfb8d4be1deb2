"""TEST FIXTURE ONLY: a tiny recording stand-in for Elasticsearch on 127.0.0.1.

It answers the few endpoints `ElasticsearchIndex` uses, in the shapes Elasticsearch uses, keeps
just enough state (indices, aliases, documents) for publishes to be followed through, and records
every request so tests can assert exactly what the real client sent. Its "search" is a crude
term-overlap and cosine scorer: good for checking filters and plumbing, not Elasticsearch's ranking.
Failures can be injected: refused credentials, rejected bulk items, 429 throttling, a wrong count,
a failing alias swap, failing index deletions, any endpoint answering 503, and late requests:
answered after the client gave up, then carried out anyway, as a timed-out bulk request is
(re-creating a deleted index by auto-create, without our mapping, holding just that request's
documents).
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

CONTENT_TYPE = "application/vnd.elasticsearch+json;compatible-with=9"


@dataclass
class Recorded:
    method: str
    path: str
    params: dict[str, str]
    body: Any
    headers: dict[str, str]


@dataclass
class FakeIndex:
    body: dict[str, Any]
    created_ms: int
    docs: dict[str, dict[str, Any]] = field(default_factory=dict)


class FakeElasticsearch:
    def __init__(self) -> None:
        self.indices: dict[str, FakeIndex] = {}
        self.aliases: dict[str, str] = {}  # alias -> index
        self.requests: list[Recorded] = []
        self.reject_ids: set[str] = set()  # bulk items for these ids fail with a mapping error
        self.throttle_items = 0  # this many bulk items answer 429 before any succeeds
        self.count_offset = 0  # added to every _count answer
        self.fail_alias_swap = False
        self.undeletable: set[str] = set()  # DELETE of these indices fails with a 500
        self.unavailable: str | None = None  # requests whose "METHOD /path" matches answer 503
        self.late: str | None = None  # requests whose "METHOD /path" matches wait late_s, then run
        self.late_s = 0.0
        self.api_key: str | None = None  # when set, requests without it answer 401, as security does
        self.security: dict[str, dict[str, Any]] = {}  # "role" / "user" -> name -> body put
        self._late_running = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def calls(self, method: str | None = None, pattern: str = "") -> list[Recorded]:
        return [
            r for r in self.requests if (method is None or r.method == method) and re.search(pattern, r.path)
        ]

    def settle(self, timeout_s: float = 10.0) -> None:
        """Wait until every late request has been carried out."""
        deadline = time.monotonic() + timeout_s
        while self._late_running:
            if time.monotonic() > deadline:
                raise TimeoutError("late requests still running")
            time.sleep(0.01)

    # -- HTTP plumbing ------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                parts = urlsplit(self.path)
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                if raw and parts.path.endswith("/_bulk"):
                    body: Any = [json.loads(line) for line in raw.splitlines() if line.strip()]
                else:
                    body = json.loads(raw) if raw else None
                params = {k: v[0] for k, v in parse_qs(parts.query).items()}
                request = Recorded(
                    self.command, parts.path, params, body, {k.lower(): v for k, v in self.headers.items()}
                )
                with fake._lock:
                    fake.requests.append(request)
                    late = int(fake.matches(fake.late, request))
                    fake._late_running += late
                time.sleep(fake.late_s * late)  # the client may give up meanwhile; the request still runs
                with fake._lock:
                    status, answer = fake.answer(request)
                    fake._late_running -= late
                payload = json.dumps(answer).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", CONTENT_TYPE)
                    self.send_header("X-Elastic-Product", "Elasticsearch")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # a late answer: the client has closed the connection

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler

    @staticmethod
    def error(status: int, kind: str, reason: str) -> tuple[int, dict[str, Any]]:
        return status, {"error": {"type": kind, "reason": reason, "root_cause": []}, "status": status}

    def resolve(self, name: str) -> str | None:
        return self.aliases.get(name, name if name in self.indices else None)

    @staticmethod
    def matches(pattern: str | None, request: Recorded) -> bool:
        return pattern is not None and re.search(pattern, f"{request.method} {request.path}") is not None

    def answer(self, request: Recorded) -> tuple[int, Any]:
        if self.api_key is not None and request.headers.get("authorization") != f"ApiKey {self.api_key}":
            return self.error(
                401,
                "security_exception",
                "unable to authenticate with provided credentials and anonymous access is not allowed "
                "for this request",
            )
        if self.matches(self.unavailable, request):
            return self.error(503, "unavailable_shards_exception", "unavailable on purpose")
        return self.route(request.method, request.path, request.params, request.body)

    def route(self, method: str, path: str, params: dict[str, str], body: Any) -> tuple[int, Any]:
        segments = [s for s in path.split("/") if s]
        if len(segments) == 3 and segments[0] == "_security" and method in ("PUT", "POST"):
            self.security.setdefault(segments[1], {})[segments[2]] = body
            return 200, {segments[1]: {"created": True}} if segments[1] == "role" else {"created": True}
        if segments == ["_bulk"]:
            return self.bulk(body)
        if segments == ["_aliases"]:
            return self.update_aliases(body["actions"])
        if segments == ["_reindex"]:
            return self.reindex(body)
        if len(segments) == 2 and segments[0] == "_alias":
            return self.get_alias(segments[1])
        if len(segments) == 1 and method == "PUT":
            return self.create(segments[0], body or {})
        if len(segments) == 1 and method == "DELETE":
            return self.delete(segments[0])
        if len(segments) == 1 and method == "GET":
            return self.get_indices(segments[0])
        if len(segments) == 2:
            index = self.resolve(segments[0])
            if index is None:
                return self.error(404, "index_not_found_exception", f"no such index [{segments[0]}]")
            action = segments[1]
            if action == "_refresh":
                return 200, {"_shards": {"total": 1, "successful": 1, "failed": 0}}
            if action == "_count":
                return 200, {"count": len(self.indices[index].docs) + self.count_offset}
            if action == "_mapping" and method == "PUT":
                return self.put_mapping(index, body)
            if action == "_mapping":
                return 200, {index: {"mappings": self.indices[index].body.get("mappings", {})}}
            if action == "_mget":
                return self.mget(index, body)
            if action == "_search":
                return self.search(index, body or {}, params)
        return self.error(400, "unsupported", f"the fake does not know {method} {path}")

    # -- endpoints --------------------------------------------------------------------------

    def create(self, name: str, body: dict[str, Any]) -> tuple[int, Any]:
        if name in self.indices:
            return self.error(400, "resource_already_exists_exception", f"index [{name}] already exists")
        self.indices[name] = FakeIndex(body=body, created_ms=int(time.time() * 1000))
        return 200, {"acknowledged": True, "shards_acknowledged": True, "index": name}

    def put_mapping(self, index: str, body: dict[str, Any]) -> tuple[int, Any]:
        """Only `_meta`, which Elasticsearch replaces as a whole."""
        if set(body) != {"_meta"}:
            return self.error(400, "unsupported", f"the fake only updates _meta, not {sorted(body)}")
        self.indices[index].body.setdefault("mappings", {})["_meta"] = copy.deepcopy(body["_meta"])
        return 200, {"acknowledged": True}

    def delete(self, name: str) -> tuple[int, Any]:
        if name in self.undeletable:
            return self.error(500, "exception", f"deleting [{name}] failed on purpose")
        if name not in self.indices:
            return self.error(404, "index_not_found_exception", f"no such index [{name}]")
        del self.indices[name]
        self.aliases = {a: i for a, i in self.aliases.items() if i != name}
        return 200, {"acknowledged": True}

    def get_indices(self, pattern: str) -> tuple[int, Any]:
        regex = re.compile(re.escape(pattern).replace(r"\*", ".*"))
        return 200, {
            name: {
                "aliases": {a: {} for a, i in self.aliases.items() if i == name},
                "mappings": index.body.get("mappings", {}),
                "settings": {"index": {"creation_date": str(index.created_ms)}},
            }
            for name, index in self.indices.items()
            if regex.fullmatch(name)
        }

    def get_alias(self, alias: str) -> tuple[int, Any]:
        if alias not in self.aliases:
            return 404, {"error": f"alias [{alias}] missing", "status": 404}
        return 200, {self.aliases[alias]: {"aliases": {alias: {}}}}

    def update_aliases(self, actions: list[dict[str, Any]]) -> tuple[int, Any]:
        if self.fail_alias_swap:
            return self.error(500, "cluster_block_exception", "alias swap failed on purpose")
        aliases = dict(self.aliases)
        for action in actions:
            [(kind, spec)] = action.items()
            if kind == "remove":
                if aliases.get(spec["alias"]) != spec["index"]:
                    return self.error(404, "aliases_not_found_exception", spec["alias"])
                del aliases[spec["alias"]]
            elif kind == "add":
                if spec["index"] not in self.indices:
                    return self.error(404, "index_not_found_exception", spec["index"])
                aliases[spec["alias"]] = spec["index"]
        self.aliases = aliases
        return 200, {"acknowledged": True}

    def reindex(self, body: dict[str, Any]) -> tuple[int, Any]:
        source = self.indices[self.resolve(body["source"]["index"]) or ""]
        dest = self.indices[body["dest"]["index"]]
        dest.docs.update({k: dict(v) for k, v in source.docs.items()})
        n = len(source.docs)
        return 200, {"took": 1, "total": n, "created": n, "updated": 0, "failures": []}

    def bulk(self, lines: list[dict[str, Any]]) -> tuple[int, Any]:
        items = []
        position = 0
        while position < len(lines):
            [(op, meta)] = lines[position].items()
            source = lines[position + 1] if op in ("index", "create") else None
            position += 2 if source is not None else 1
            doc_id = meta["_id"]
            if op != "delete" and meta["_index"] not in self.indices:
                self.create(meta["_index"], {})  # auto-create: no mapping of ours, no _meta
            index = self.indices.get(meta["_index"])
            if self.throttle_items > 0:
                self.throttle_items -= 1
                items.append(
                    {
                        op: {
                            "_id": doc_id,
                            "status": 429,
                            "error": {
                                "type": "es_rejected_execution_exception",
                                "reason": "rejected execution",
                            },
                        }
                    }
                )
            elif doc_id in self.reject_ids:
                items.append(
                    {
                        op: {
                            "_id": doc_id,
                            "status": 400,
                            "error": {
                                "type": "document_parsing_exception",
                                "reason": f"failed to parse field [vector] of {doc_id}",
                            },
                        }
                    }
                )
            elif index is None:
                items.append(
                    {
                        op: {
                            "_id": doc_id,
                            "status": 404,
                            "error": {"type": "index_not_found_exception", "reason": "no such index"},
                        }
                    }
                )
            elif op == "delete":
                found = index.docs.pop(doc_id, None) is not None
                items.append({op: {"_id": doc_id, "status": 200 if found else 404}})
            else:
                index.docs[doc_id] = source
                items.append({op: {"_id": doc_id, "status": 201}})
        errors = any(not 200 <= next(iter(i.values()))["status"] < 300 for i in items)
        return 200, {"took": 1, "errors": errors, "items": items}

    def mget(self, index: str, body: dict[str, Any]) -> tuple[int, Any]:
        docs = self.indices[index].docs
        return 200, {
            "docs": [
                {"_index": index, "_id": i, "found": True, "_source": docs[i]}
                if i in docs
                else {"_index": index, "_id": i, "found": False}
                for i in body["ids"]
            ]
        }

    def search(self, index: str, body: dict[str, Any], params: dict[str, str]) -> tuple[int, Any]:
        docs = self.indices[index].docs
        if "terms_held" in body.get("aggs", {}):
            filters = body["aggs"]["terms_held"]["filters"]["filters"]
            held = {
                term: sum(
                    any(
                        query["combined_fields"]["query"] in d[f].split()
                        for f in query["combined_fields"]["fields"]
                    )
                    for d in docs.values()
                )
                for term, query in filters.items()
            }
            return 200, {
                "hits": {"total": {"value": len(docs), "relation": "eq"}, "hits": []},
                "aggregations": {"terms_held": {"buckets": {t: {"doc_count": n} for t, n in held.items()}}},
            }
        if "aggs" in body:
            return 200, self._aggregate(docs)
        if "sort" in body:
            ordered = sorted(docs.items())
            after = body.get("search_after", [None])[0]
            page = [(i, d) for i, d in ordered if after is None or i > after][: body["size"]]
            keep = params.get("_source_includes", "").split(",")
            return 200, _hits([{"_id": i, "_source": {k: d[k] for k in keep}, "sort": [i]} for i, d in page])
        if "knn" in body:
            knn = body["knn"]
            mapped = self.indices[index].body.get("mappings", {}).get("properties", {}).get(knn["field"], {})
            if not mapped.get("index"):  # Elasticsearch's words for a field not indexed for kNN
                reason = f"[knn] queries are only supported on indexed dense_vector fields: {knn['field']}"
                return 400, {"error": {"type": "illegal_argument_exception", "reason": reason}, "status": 400}
            course = knn.get("filter", {}).get("term", {}).get("course")
            query = np.asarray(knn["query_vector"])
            scored = [
                (float(np.dot(query, d[knn["field"]])), i)
                for i, d in docs.items()
                if knn["field"] in d and (course is None or d["course"] == course)
            ]
        else:
            match = body["query"]["bool"]["must"]["combined_fields"]
            terms = set(match["query"].split())
            weights = {f.split("^")[0]: float(f.split("^")[1]) for f in match["fields"]}
            course = next((f["term"]["course"] for f in body["query"]["bool"].get("filter", [])), None)
            scored = [
                (sum(w * len(terms & set(d[f].split())) for f, w in weights.items()), i)
                for i, d in docs.items()
                if course is None or d["course"] == course
            ]
            scored = [pair for pair in scored if pair[0] > 0]
        scored.sort(key=lambda pair: (-pair[0], pair[1]))
        return 200, _hits([{"_id": i, "_score": s} for s, i in scored[: body["size"]]])

    @staticmethod
    def _aggregate(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        per_course: dict[str, set[str]] = {}
        for d in docs.values():
            per_course.setdefault(d["course"], set()).add(d["doc_id"])
        return {
            **_hits([]),
            "hits": {"total": {"value": len(docs), "relation": "eq"}, "hits": []},
            "aggregations": {
                "entries": {"value": len({d["doc_id"] for d in docs.values()})},
                "courses": {
                    "buckets": [
                        {"key": c, "doc_count": 0, "entries": {"value": len(ids)}}
                        for c, ids in sorted(per_course.items())
                    ]
                },
            },
        }


def _hits(hits: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "took": 1,
        "timed_out": False,
        "hits": {"total": {"value": len(hits), "relation": "eq"}, "hits": hits},
    }
