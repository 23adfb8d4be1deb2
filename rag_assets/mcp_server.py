"""`rag mcp`: the index as tools an assistant calls, over the Model Context Protocol.

Built on the official SDK (`mcp`), which speaks the protocol and both transports: stdio for a
desktop assistant that starts the command itself, Streamable HTTP for one in another process or
container. Searches go through the same `Retriever` as `rag search` and `rag serve`, in the
index's mode, with the same input rules; a refused input is a tool error whose text says what to
change, for the model to read. The tools are `async` for the reason `rag serve`'s handlers are:
one thread keeps the backend's per-version caches single-threaded, and a publish underneath is
picked up by the next call.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from importlib.metadata import version
from typing import Annotated, Any

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from rag_assets import settings
from rag_assets.common.errors import RagError
from rag_assets.index.backend import SearchBackend
from rag_assets.index.elasticsearch import CLIENT_ERRORS, describe_error
from rag_assets.nlp.analysis import load_pipeline
from rag_assets.retrieval import Retriever
from rag_assets.server import MAX_COURSE_CHARS, MAX_K, MAX_QUERY_CHARS, CourseEntries, SearchResults

INSTRUCTIONS = (
    "Answers questions about the DataTalks.Club courses (zoomcamps) from their FAQ. Call search_faq "
    "with the user's question before answering anything about a course's logistics, tools, "
    "homework or errors; answer from the returned entries and cite their questions. An empty hit "
    "list (no_match true) means the FAQ has no entry for it: say so rather than guess."
)


class Courses(BaseModel):
    """One object, not a list: a list result is one content block per item, and a client that
    reads the first block would see one course."""

    courses: list[CourseEntries]


@contextmanager
def said_to_the_model() -> Iterator[None]:
    """The project's and the cluster's errors (a blank query, an unknown course, no index, an
    unreachable cluster) as a tool error in their own words, for the model to read."""
    try:
        yield
    except (RagError, *CLIENT_ERRORS) as exc:
        raise ToolError(describe_error(exc)) from None


def create_server(backend: SearchBackend, build_retriever: Callable[[SearchBackend], Retriever]) -> MCPServer:
    """The MCP server over `backend`; the model loads before the first call is answered."""
    served: dict[str, Retriever] = {}

    @asynccontextmanager
    async def lifespan(server: MCPServer) -> AsyncIterator[dict[str, Any]]:
        served["retriever"] = build_retriever(backend)
        yield {}

    # WARNING: a refused input is the caller's to read, not a line in the assistant's log
    server = MCPServer(
        "rag-assets course FAQ",
        version=version("rag-assets"),
        instructions=INSTRUCTIONS,
        lifespan=lifespan,
        log_level="WARNING",
    )

    @server.tool()
    async def search_faq(
        query: Annotated[
            str,
            Field(
                max_length=MAX_QUERY_CHARS,
                description="the user's question in their own words, not blank",
            ),
        ],
        course: Annotated[
            str | None,
            Field(
                min_length=1,
                max_length=MAX_COURSE_CHARS,
                description=(
                    "only entries of this course (an id from list_courses, e.g. "
                    "'data-engineering-zoomcamp'); leave it out when the question names no course"
                ),
            ),
        ] = None,
        k: Annotated[int, Field(ge=1, le=MAX_K, description="how many entries to return")] = 5,
    ) -> SearchResults:
        """Search the course FAQ: the k entries that best answer the question, best first, each
        with its course, section, question, answer (`text`), rank score and `relevance` (0-1, how
        much of the query the entry matches). Hits below the index's relevance floor are left
        out; `no_match` true with no hits means no entry answers the question."""
        with said_to_the_model():
            hits = served["retriever"].search(query, course=course, k=k)
        return SearchResults(query=query, course=course, k=k, hits=hits, no_match=not hits)

    @server.tool()
    async def list_courses() -> Courses:
        """The courses the index holds (ids for search_faq's `course`) and their entry counts."""
        with said_to_the_model():
            stats = backend.stats()
        return Courses(courses=[CourseEntries(course=c, entries=n) for c, n in sorted(stats.courses.items())])

    @server.tool()
    async def index_status() -> dict[str, Any]:
        """What the index holds and how fresh it is: entries, chunks, courses, when its content
        was published and last confirmed current by a refresh, and the ranking mode searches use."""
        with said_to_the_model():
            stats = backend.stats()
        return {**dataclasses.asdict(stats), "search_mode": served["retriever"].reranker}

    return server


class BearerKey:
    """Asks every HTTP request for `Authorization: Bearer <key>`, compared in constant time; the
    key never reaches a log or a response."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                refusal = JSONResponse(
                    {"detail": "missing or wrong Authorization: Bearer header (RAG_API_KEY)"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def server_from_environment(env: Mapping[str, str]) -> MCPServer:
    return create_server(settings.open_backend(env), lambda b: Retriever(b, load_pipeline()))


def http_app(server: MCPServer, host: str, api_key: str | None) -> Starlette:
    """The Streamable HTTP endpoint at /mcp; with `api_key`, behind the bearer check."""
    app = server.streamable_http_app(host=host)
    if api_key:
        app.add_middleware(BearerKey, key=api_key)
    return app
