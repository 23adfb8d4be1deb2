"""`rag serve`: retrieval over HTTP, for an assistant in another process, container or language.

The process loads the model once and answers from the configured backend through the same
`Retriever` as the CLI, so answers are the CLI's. Every search reads one published version (the
backend's snapshot), so a publish underneath is picked up by the next request, never half of it.
The model loads before a worker accepts connections; readiness then waits for a usable index.

The handlers are `async` on purpose: a search is about a millisecond of CPU, less than a hop to
the thread pool would add, and one thread keeps the backend's per-version caches single-threaded.
"""

import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, Field

from rag_assets import settings
from rag_assets.common.errors import RagError
from rag_assets.index.backend import IndexStats, SearchBackend, UnknownCourseError
from rag_assets.index.elasticsearch import CLIENT_ERRORS, describe_error
from rag_assets.nlp.analysis import load_pipeline
from rag_assets.retrieval import Hit, QueryError, Retriever

MAX_QUERY_CHARS = 1000
MAX_COURSE_CHARS = 200
MAX_K = 50
# A character that is not white space to any reader of the schema. `\s` differs between regex
# engines: ECMAScript's (the schema's clients) has U+FEFF, Rust's (pydantic) has U+0085, neither
# has \x1c-\x1f, which Python's str.strip() removes; so all of them are named.
NOT_BLANK = r"[^\s\x1c-\x1f\x85\ufeff]"
API_KEY_HEADER = "X-API-Key"
KEY_HEADER = APIKeyHeader(
    name=API_KEY_HEADER, auto_error=False, description="required when RAG_API_KEY is set"
)
log = logging.getLogger("rag.serve")


class SearchResults(BaseModel):
    query: str
    course: str | None
    k: int
    hits: list[Hit]  # each entry at its best chunk: the fields of `rag search --json`
    no_match: bool  # no entry is relevant enough: an assistant should say it has no answer


class CourseEntries(BaseModel):
    course: str
    entries: int


class Readiness(BaseModel):
    ready: bool
    reason: str | None = None
    model: str | None = None
    index: str | None = None
    chunks: int | None = None


class ErrorBody(BaseModel):
    detail: Any = Field(description="what was wrong; for a bad parameter, FastAPI's list naming it")


def parameter_error(status: int, name: str, message: str, kind: str) -> HTTPException:
    """An error about one query parameter, shaped like FastAPI's own validation errors, so
    clients parse one format."""
    return HTTPException(status, [{"loc": ["query", name], "msg": message, "type": kind}])


def create_app(
    backend: SearchBackend,
    build_retriever: Callable[[SearchBackend], Retriever],
    api_key: str | None = None,
) -> FastAPI:
    """The HTTP service over `backend`; with `api_key`, every route but the probes and the
    documentation asks for it in the X-API-Key header."""
    served: dict[str, Retriever] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A worker accepts connections only after this: with several workers, none answers
        # before its model is loaded, while the others serve.
        served["retriever"] = build_retriever(backend)
        log.info("model loaded (%s)", served["retriever"].fingerprint)
        yield

    app = FastAPI(
        title="rag-assets retrieval",
        summary="Search the course FAQ index the Dagster pipeline publishes.",
        version="1",
        lifespan=lifespan,
    )
    expected_key = api_key.encode() if api_key else None

    async def require_key(given: Annotated[str | None, Depends(KEY_HEADER)]) -> None:
        # Compared in constant time; the key itself never reaches a log or a response.
        if given is None or not secrets.compare_digest(given.encode(), expected_key or b""):
            raise HTTPException(
                401, f"missing or wrong {API_KEY_HEADER} header", {"WWW-Authenticate": "APIKey"}
            )

    # The schema declares the key only when the server asks for it.
    protected = [Depends(require_key)] if expected_key else []
    errors: dict[int | str, dict[str, Any]] = {
        401: {"model": ErrorBody, "description": "API key missing or wrong"},
        503: {"model": ErrorBody, "description": "no usable index is published"},
    }

    @app.exception_handler(RagError)
    async def served_index_unavailable(request: Request, exc: RagError) -> JSONResponse:
        # No index yet, a damaged one, or one analysed differently: the server's state, not the
        # request's; the message says what to do.
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameters(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422, but a blank query is said in words, not as the schema's pattern
        errors = [
            {**error, "msg": "the query is blank", "type": "value_error"}
            if error["type"] in ("string_pattern_mismatch", "string_too_short")
            and error["loc"] == ("query", "query")
            else error
            for error in exc.errors()
        ]
        return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)

    async def cluster_unavailable(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": describe_error(exc)}, status_code=503)

    for error in CLIENT_ERRORS:
        app.add_exception_handler(error, cluster_unavailable)

    @app.get(
        "/search",
        dependencies=protected,
        responses={**errors, 404: {"model": ErrorBody, "description": "no such course in the served index"}},
        tags=["retrieval"],
    )
    async def search(
        query: Annotated[
            str,
            Query(
                min_length=1,
                max_length=MAX_QUERY_CHARS,
                pattern=NOT_BLANK,
                description="the question, not blank",
            ),
        ],
        course: Annotated[
            str | None, Query(min_length=1, max_length=MAX_COURSE_CHARS, description="only this course")
        ] = None,
        k: Annotated[int, Query(ge=1, le=MAX_K, description="entries to return")] = 5,
        min_relevance: Annotated[
            float | None,
            Query(
                ge=0,
                le=1,
                description="drop hits less relevant than this (default: the mode's; 0 keeps all)",
            ),
        ] = None,
    ) -> SearchResults:
        """The k best entries for the question: lexical and vector rankings fused, each entry
        shown at its best chunk. No hit means no entry matches the question well enough."""
        try:
            hits = served["retriever"].search(query, course=course, k=k, min_relevance=min_relevance)
        except QueryError as exc:  # passed the schema, but nothing to search for ("\x1f" is blank too)
            raise parameter_error(422, exc.parameter, str(exc), "value_error") from None
        except UnknownCourseError as exc:  # well-formed, but no such course is served
            raise parameter_error(404, "course", str(exc), "unknown_course") from None
        return SearchResults(query=query, course=course, k=k, hits=hits, no_match=not hits)

    @app.get("/courses", dependencies=protected, responses=errors, tags=["index"])
    async def courses() -> list[CourseEntries]:
        """The courses of the served index and their entries."""
        stats = backend.stats()
        return [CourseEntries(course=c, entries=n) for c, n in sorted(stats.courses.items())]

    @app.get("/stats", dependencies=protected, responses=errors, tags=["index"])
    async def stats() -> IndexStats:
        """What the served index holds and when it was published: the fields of `rag stats --json`."""
        return backend.stats()

    @app.api_route("/healthz", methods=["GET", "HEAD"], tags=["probes"])
    async def liveness() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "alive"}

    @app.api_route(
        "/readyz",
        methods=["GET", "HEAD"],
        tags=["probes"],
        responses={200: {"model": Readiness}, 503: {"model": Readiness}},
    )
    async def readiness() -> JSONResponse:
        """Readiness: an index the loaded model can query is published."""
        retriever = served["retriever"]
        try:
            retriever.search("readiness", k=1)  # reads the served version end to end, as a search does
            summary = backend.stats()
        except (RagError, *CLIENT_ERRORS) as exc:
            reason = describe_error(exc)
            return JSONResponse(Readiness(ready=False, reason=reason).model_dump(), status_code=503)
        ready = Readiness(
            ready=True, model=retriever.fingerprint, index=summary.location, chunks=summary.chunks
        )
        return JSONResponse(ready.model_dump())

    return app


def app_from_environment(env: Mapping[str, str] | None = None) -> FastAPI:
    """The service for the index the environment configures (uvicorn's factory)."""
    env = os.environ if env is None else env
    backend = settings.open_backend(env)
    return create_app(backend, lambda b: Retriever(b, load_pipeline()), settings.api_key(env))
