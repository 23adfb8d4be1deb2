"""`rag serve`: a real server process on 127.0.0.1, real HTTP, the real model and index."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from spacy.language import Language

from rag_assets.index.backend import IndexContent
from rag_assets.index.embedded import EmbeddedIndex
from rag_assets_tests.conftest import free_port, index_content, rag, without_project_settings

API_KEY = "test-key-9f2c4e71"


@dataclass
class Server:
    base: str
    log: Path
    process: subprocess.Popen[bytes]

    def get(self, path: str, **kwargs: object) -> requests.Response:
        return requests.get(self.base + path, timeout=30, **kwargs)  # type: ignore[arg-type]


@contextmanager
def rag_server(data_dir: Path, log: Path, *args: str, workers: int = 1, **env: str) -> Iterator[Server]:
    """`rag serve` in its own process over the embedded index in `data_dir`, up when it answers."""
    port = free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rag_assets.cli",
                "serve",
                "--port",
                str(port),
                "--workers",
                str(workers),
                *args,
            ],
            env=without_project_settings(RAG_DATA_DIR=str(data_dir), **env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", log, process)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if server.get("/healthz").status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "rag serve did not answer within 60 s"
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_ready(server: Server, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while (response := server.get("/readyz")).status_code != 200:
        assert time.monotonic() < deadline, response.json()
        time.sleep(0.1)
    return response.json()


def rag_json(data_dir: Path, *args: str) -> object:
    """`rag ARGS --json` over the embedded index in `data_dir`, as the server in these tests reads it."""
    done = rag(*args, "--json", data_dir=data_dir, ELASTICSEARCH_URL="")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def content_without_mlops(nlp: Language, documents_2025: pd.DataFrame) -> IndexContent:
    return index_content(nlp, documents_2025[documents_2025["course"] != "mlops-zoomcamp"])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, content_2025: IndexContent) -> Iterator[Server]:
    """A server over a published index of documents-2025.json, without an API key."""
    data_dir = tmp_path_factory.mktemp("served")
    EmbeddedIndex(data_dir).publish(content_2025)
    with rag_server(data_dir, data_dir / "serve.log") as server:
        wait_ready(server)
        yield server


def error_locations(response: requests.Response) -> list[list[str]]:
    return [error["loc"] for error in response.json()["detail"]]


def test_search_answers_what_the_cli_answers(
    served: Server, tmp_path_factory: pytest.TempPathFactory
) -> None:
    data_dir = Path(served.log).parent
    question = "I just discovered the course, can I still join?"
    response = served.get(
        "/search",
        params={"query": question, "course": "data-engineering-zoomcamp", "k": 3, "min_relevance": 0},
    )
    assert response.status_code == 200
    body = response.json()
    assert (body["query"], body["course"], body["k"]) == (question, "data-engineering-zoomcamp", 3)
    cli = rag_json(
        data_dir,
        "search",
        question,
        "--course",
        "data-engineering-zoomcamp",
        "--k",
        "3",
        "--min-relevance",
        "0",
    )
    assert body["hits"] == cli
    assert len(body["hits"]) == 3 and body["no_match"] is False
    assert {hit["course"] for hit in body["hits"]} == {"data-engineering-zoomcamp"}


def test_a_question_nothing_answers_gets_no_match(served: Server) -> None:
    """Off-topic: every hit is below the default floor, so none is returned and `no_match` says
    so; `min_relevance=0` still shows the closest entries."""
    question = "How do I knit a scarf?"
    body = served.get("/search", params={"query": question}).json()
    assert (body["hits"], body["no_match"]) == ([], True)
    closest = served.get("/search", params={"query": question, "min_relevance": 0}).json()
    assert len(closest["hits"]) == 5
    assert all(0 <= hit["relevance"] < 0.25 for hit in closest["hits"])
    assert served.get("/search", params={"query": question, "min_relevance": 2}).status_code == 422


def test_courses_and_stats_are_the_served_index(served: Server) -> None:
    data_dir = Path(served.log).parent
    stats = rag_json(data_dir, "stats")
    assert served.get("/stats").json() == stats
    courses = served.get("/courses").json()
    assert courses == [{"course": c, "entries": n} for c, n in sorted(stats["courses"].items())]
    assert served.get("/healthz").json() == {"status": "alive"}
    assert requests.head(served.base + "/healthz", timeout=10).status_code == 200  # uptime checkers use HEAD
    ready = served.get("/readyz").json()
    assert ready["ready"] is True and ready["chunks"] == stats["chunks"]


@pytest.mark.parametrize(
    ("params", "status", "names"),
    [
        ({}, 422, "query"),
        ({"query": ""}, 422, "query"),
        ({"query": "   "}, 422, "query"),
        ({"query": "x" * 1001}, 422, "query"),
        ({"query": "\x1f\x1e"}, 422, "query"),  # blank to Python, not to every regex engine's \s
        ({"query": "\x85\ufeff\u3000"}, 422, "query"),
        ({"query": "join", "k": "0"}, 422, "k"),
        ({"query": "join", "k": "51"}, 422, "k"),
        ({"query": "join", "k": "five"}, 422, "k"),
        ({"query": "join", "course": ""}, 422, "course"),
        ({"query": "join", "course": "c" * 201}, 422, "course"),
        ({"query": "join", "course": "no-such-course"}, 404, "course"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_parameter(
    served: Server, params: dict, status: int, names: str
) -> None:
    response = served.get("/search", params=params)
    assert response.status_code == status, response.text
    assert error_locations(response) == [["query", names]]
    if params.get("query", "x").replace("\ufeff", "").strip() == "":
        assert response.json()["detail"][0]["msg"] == "the query is blank"


@pytest.mark.parametrize(
    "raw_query",
    [
        "query=%00",
        "query=%ED%A0%80",
        "query=%FF%FE",
        "query=%F0%9F%98%80",
        "query=a&k=1e3",
        "query=a&k=",
        "k=3",
    ],
)
def test_odd_bytes_get_an_answer_or_a_4xx_never_a_5xx(served: Server, raw_query: str) -> None:
    response = requests.get(f"{served.base}/search?{raw_query}", timeout=30)
    assert response.status_code in (200, 422), response.text


def test_an_unknown_course_lists_the_known_ones(served: Server) -> None:
    [error] = served.get("/search", params={"query": "join", "course": "no-such-course"}).json()["detail"]
    assert "unknown course 'no-such-course'" in error["msg"]
    assert "data-engineering-zoomcamp" in error["msg"]


def test_unknown_paths_and_methods(served: Server) -> None:
    assert served.get("/nothing-here").status_code == 404
    assert requests.post(served.base + "/search", timeout=10).status_code == 405


def test_openapi_schema_and_docs_page(served: Server) -> None:
    schema = served.get("/openapi.json").json()
    assert {"/search", "/courses", "/stats", "/healthz", "/readyz"} <= set(schema["paths"])
    parameters = {p["name"]: p for p in schema["paths"]["/search"]["get"]["parameters"]}
    assert parameters["query"]["schema"]["maxLength"] == 1000
    assert parameters["k"]["schema"]["maximum"] == 50
    docs = served.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_ready_only_once_an_index_is_published(tmp_path: Path, content_2025: IndexContent) -> None:
    with rag_server(tmp_path, tmp_path / "serve.log") as server:
        assert server.get("/healthz").status_code == 200
        not_ready = server.get("/readyz")
        assert not_ready.status_code == 503 and not_ready.json()["ready"] is False
        assert not_ready.json()["reason"].startswith(f"no index at {tmp_path}")
        search = server.get("/search", params={"query": "join"})
        assert search.status_code == 503 and search.json()["detail"]
        assert server.get("/stats").status_code == 503
        EmbeddedIndex(tmp_path).publish(content_2025)
        assert wait_ready(server)["chunks"] == len(content_2025)
        assert server.get("/search", params={"query": "join"}).status_code == 200


def test_a_publish_is_picked_up_without_restart(
    tmp_path: Path, content_2025: IndexContent, content_without_mlops: IndexContent
) -> None:
    index = EmbeddedIndex(tmp_path)
    index.publish(content_2025)
    with rag_server(tmp_path, tmp_path / "serve.log") as server:
        wait_ready(server)
        query = {"query": "how do I join late?", "course": "mlops-zoomcamp"}
        assert server.get("/search", params=query).status_code == 200
        index.publish(content_without_mlops)
        after = server.get("/search", params=query)
        assert after.status_code == 404 and error_locations(after) == [["query", "course"]]
        assert "mlops-zoomcamp" not in {c["course"] for c in server.get("/courses").json()}
        index.publish(content_2025)
        assert server.get("/search", params=query).status_code == 200


def test_no_request_fails_while_a_publish_runs(
    tmp_path: Path, content_2025: IndexContent, content_without_mlops: IndexContent
) -> None:
    index = EmbeddedIndex(tmp_path)
    index.publish(content_2025)
    with rag_server(tmp_path, tmp_path / "serve.log", workers=2) as server:
        wait_ready(server)
        stop = threading.Event()
        outcomes: list[str] = []

        def client(course: str | None) -> None:
            with requests.Session() as session:
                while not stop.is_set():
                    params = {"query": "can I still join the course?", "k": 5}
                    if course:
                        params["course"] = course
                    try:
                        response = session.get(server.base + "/search", params=params, timeout=30)
                        hits = response.json()["hits"] if response.status_code == 200 else None
                        ok = hits is not None and all(course in (None, h["course"]) for h in hits)
                        outcomes.append("ok" if ok else f"{response.status_code} {response.text[:200]}")
                    except requests.RequestException as exc:
                        outcomes.append(f"error {exc}")

        courses = [None, "data-engineering-zoomcamp", "machine-learning-zoomcamp", None] * 2
        clients = [threading.Thread(target=client, args=(course,)) for course in courses]
        for thread in clients:
            thread.start()
        for content in (content_without_mlops, content_2025, content_without_mlops, content_2025):
            index.publish(content)
        stop.set()
        for thread in clients:
            thread.join()
    failures = [o for o in outcomes if o != "ok"]
    assert len(outcomes) > 50
    assert failures == []


def test_the_api_key_guards_everything_but_probes_and_is_never_logged(
    tmp_path: Path, content_2025: IndexContent
) -> None:
    EmbeddedIndex(tmp_path).publish(content_2025)
    log = tmp_path / "serve.log"
    with rag_server(tmp_path, log, "--access-log", RAG_API_KEY=API_KEY) as server:
        wait_ready(server)
        for path in ("/search?query=join", "/courses", "/stats"):
            missing = server.get(path)
            assert missing.status_code == 401 and "X-API-Key" in missing.json()["detail"]
            assert server.get(path, headers={"X-API-Key": API_KEY + "x"}).status_code == 401
            assert server.get(path, headers={"X-API-Key": API_KEY}).status_code == 200
        assert server.get("/healthz").status_code == 200
        assert server.get("/readyz").status_code == 200
        schema = server.get("/openapi.json").json()
        assert schema["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
    text = log.read_text()
    assert "GET /stats" in text  # the access log was on
    assert API_KEY not in text


def test_it_binds_to_loopback_by_default() -> None:
    from rag_assets.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_the_openapi_contract_holds_for_generated_requests(
    served: Server, mode: schemathesis.GenerationMode
) -> None:
    """Property-based: schemathesis generates requests from the served OpenAPI schema (valid ones,
    then ones that break it) and checks every response against it; no input may produce a 5xx."""
    schema = schemathesis.openapi.from_url(served.base + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 7  # the probes answer HEAD too
    if mode is schemathesis.GenerationMode.NEGATIVE:  # only parameters can be broken
        operations = [o for o in operations if len(o.query)]
    calls: list[str] = []

    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def holds(case: schemathesis.Case) -> None:
            response = case.call(base_url=served.base, timeout=30)
            calls.append(f"{case.method} {case.path} {response.status_code}")
            assert response.status_code < 500, f"{case.method} {case.path} {case.query}: {response.text}"
            case.validate_response(response)

        holds()
    assert {c.rsplit(" ", 1)[0] for c in calls} == {f"{o.method.upper()} {o.path}" for o in operations}
    assert sum(c.startswith("GET /search ") for c in calls) >= 50  # parameterless routes need one call
