"""`rag mcp`: the SDK's own client against a real `rag mcp` process, over stdio and Streamable
HTTP, with the real model and index."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pandas as pd
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from spacy.language import Language

from rag_assets.index.backend import IndexContent
from rag_assets.index.embedded import EmbeddedIndex
from rag_assets_tests.conftest import ROOT, free_port, index_content, without_project_settings

API_KEY = "mcp-test-key-5b81d0"
QUESTION = "I just discovered the course, can I still join?"
JOIN_ENTRY = "The course has already started. Can I still join it?"
COURSES = ["data-engineering-zoomcamp", "machine-learning-zoomcamp", "mlops-zoomcamp"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, content_2025: IndexContent) -> Path:
    directory = tmp_path_factory.mktemp("mcp")
    EmbeddedIndex(directory).publish(content_2025)
    return directory


@contextmanager
def http_server(data_dir: Path, **env: str) -> Iterator[str]:
    """`rag mcp --http` in its own process; its endpoint once it accepts connections."""
    port = free_port()
    log = data_dir / f"mcp-{port}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "rag_assets.cli", "mcp", "--http", "--port", str(port)],
            env=without_project_settings(RAG_DATA_DIR=str(data_dir), **env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx2.get(f"http://127.0.0.1:{port}/mcp", timeout=5)
                break
            except httpx2.TransportError:
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "rag mcp --http did not answer within 60 s"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        process.wait(timeout=30)


def http_client(url: str, key: str | None = None) -> Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return Client(streamable_http_client(url, http_client=httpx2.AsyncClient(headers=headers, timeout=30)))


def readme_mcp_config() -> dict[str, Any]:
    """The desktop-assistant configuration README.md shows, as a user would paste it."""
    blocks = re.findall(r"```json\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    configs = [json.loads(block) for block in blocks if '"mcpServers"' in block]
    assert len(configs) == 1, "README.md shows one mcpServers configuration"
    return configs[0]


async def call(client: Client, tool: str, **arguments: object) -> tuple[bool, Any]:
    """Whether the call failed, and its structured result or its error text."""
    result = await client.call_tool(tool, arguments)
    return result.is_error, (result.content[0].text if result.is_error else result.structured_content)


async def check_tools(client: Client) -> None:
    """What every transport must answer: the tools, a search, each refused input."""
    tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert sorted(tools) == ["index_status", "list_courses", "search_faq"]
    schema = tools["search_faq"].input_schema
    assert schema["required"] == ["query"]
    assert schema["properties"]["query"]["maxLength"] == 1000
    assert (schema["properties"]["k"]["minimum"], schema["properties"]["k"]["maximum"]) == (1, 50)
    assert "list_courses" in schema["properties"]["course"]["description"]

    failed, found = await call(client, "search_faq", query=QUESTION, k=3)
    assert not failed and found["hits"][0]["question"] == JOIN_ENTRY and found["no_match"] is False
    assert set(found["hits"][0]) == {
        "doc_id", "chunk_id", "course", "section", "question", "text", "score", "relevance"
    }  # fmt: skip
    failed, found = await call(client, "search_faq", query="xyzzy flarb quux blorptangle")
    assert not failed and found["hits"] == [] and found["no_match"] is True
    failed, found = await call(client, "search_faq", query="homework deadline", course="mlops-zoomcamp")
    assert not failed and {hit["course"] for hit in found["hits"]} == {"mlops-zoomcamp"}

    refusals = [
        ({"query": "   "}, "the query is blank"),
        ({"query": "x" * 1001}, "String should have at most 1000 characters"),
        ({"query": "join", "k": 0}, "Input should be greater than or equal to 1"),
        ({"query": "join", "k": 51}, "Input should be less than or equal to 50"),
        ({"query": "join", "course": "no-such-course"}, f"the index has: {', '.join(COURSES)}"),
    ]
    for arguments, message in refusals:
        failed, said = await call(client, "search_faq", **arguments)
        assert failed and message in said, (arguments, said)

    assert len((await client.call_tool("list_courses", {})).content) == 1  # one block, not one per course
    failed, courses = await call(client, "list_courses")
    assert not failed and [c["course"] for c in courses["courses"]] == COURSES
    failed, status = await call(client, "index_status")
    assert not failed and status["entries"] == 948 and status["courses"]["mlops-zoomcamp"] == 138
    assert status["published_at"] and status["search_mode"] == "features"


@pytest.mark.slow
def test_the_readme_configuration_starts_it_over_stdio(data_dir: Path) -> None:
    server = readme_mcp_config()["mcpServers"]["course-faq"]
    command = server["command"].replace("/path/to/rag-assets", str(ROOT))
    assert Path(command).exists(), command
    params = StdioServerParameters(
        command=command, args=server["args"], env=without_project_settings(**server.get("env", {}))
    )
    params.env["RAG_DATA_DIR"] = str(data_dir)  # the snippet's own points at a clone's .rag

    async def session() -> None:
        async with Client(params) as client:
            await check_tools(client)

    anyio.run(session)


@pytest.mark.slow
def test_http_asks_for_the_key_and_answers_with_it(data_dir: Path) -> None:
    with http_server(data_dir, RAG_API_KEY=API_KEY) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": API_KEY}):
            refused = httpx2.post(url, json={}, headers=headers, timeout=10)
            assert refused.status_code == 401 and API_KEY not in refused.text

        async def session() -> None:
            async with http_client(url, API_KEY) as client:
                await check_tools(client)

        anyio.run(session)


@pytest.fixture(scope="module")
def content_without_mlops(nlp: Language, documents_2025: pd.DataFrame) -> IndexContent:
    return index_content(nlp, documents_2025[documents_2025["course"] != "mlops-zoomcamp"])


@pytest.mark.slow
def test_searches_during_publishes_see_whole_versions(
    tmp_path: Path, content_2025: IndexContent, content_without_mlops: IndexContent
) -> None:
    """Two clients search while the index is published four times: every call answers, from
    one version or the next, and the server picks up the last one without a restart."""
    EmbeddedIndex(tmp_path).publish(content_2025)
    with http_server(tmp_path) as url:
        publishing = threading.Event()
        publishing.set()
        answers: list[tuple[bool, list[str]]] = []

        def publish() -> None:
            for content in (content_without_mlops, content_2025, content_without_mlops, content_2025):
                EmbeddedIndex(tmp_path).publish(content)
            EmbeddedIndex(tmp_path).publish(content_without_mlops)
            publishing.clear()

        async def searching() -> None:
            async with http_client(url) as client:
                while publishing.is_set():
                    failed, found = await call(client, "search_faq", query="homework deadline", k=10)
                    answers.append((failed, [] if failed else [hit["course"] for hit in found["hits"]]))

        async def clients() -> None:
            async with anyio.create_task_group() as group:
                group.start_soon(searching)
                group.start_soon(searching)
                await anyio.to_thread.run_sync(publish)

        anyio.run(clients)

        async def after() -> None:
            async with http_client(url) as client:
                failed, courses = await call(client, "list_courses")
                assert not failed and [c["course"] for c in courses["courses"]] == COURSES[:2]

        anyio.run(after)
    assert len(answers) > 10 and not any(failed for failed, _ in answers)
