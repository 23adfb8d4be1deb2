"""Shared fixtures: the real data in ../shared, a real HTTP server on 127.0.0.1, the real model."""

from __future__ import annotations

import csv
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
from spacy.language import Language

from rag_assets.index.backend import LEMMA_FIELD_COLUMNS, IndexContent
from rag_assets.ingest.chunking import CHUNK_COLUMNS, ChunkingConfig, make_chunks
from rag_assets.ingest.sources import Fetcher, load_documents
from rag_assets.nlp.analysis import load_pipeline, model_fingerprint
from rag_assets.nlp.features import ChunkVectors, embed_chunks, lemmatize_chunks

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data"
EVAL = SHARED / "eval"


RAG = shutil.which("rag", path=str(Path(sys.executable).parent)) or "rag"


def rag(
    *args: str | bytes,
    data_dir: Path | None,
    prefix: Sequence[str] = (),
    cwd: Path | None = None,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    """`rag ARGS` in a subprocess; `prefix` runs it through another command (e.g. `setpriv`).

    `data_dir=None` leaves RAG_DATA_DIR unset, as a user who never set it would.
    """
    env = {k: v for k, v in os.environ.items() if k != "RAG_DATA_DIR"} | env
    if data_dir is not None:
        env["RAG_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [*prefix, RAG, *args], capture_output=True, text=True, env=env, timeout=300, cwd=cwd
    )


def without_project_settings(**env: str) -> dict[str, str]:
    """This process's environment without the project's settings (RAG_*, ELASTICSEARCH_*), plus
    `env`: a subprocess configured by the test alone, not by the shell that runs the suite."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(("ELASTICSEARCH_", "RAG_"))}
    return kept | env


def env_example() -> dict[str, str]:
    """The variables .env.example gives docker compose."""
    lines = (ROOT / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now, for a server a test starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (DATA / "documents-2025.json").exists():
        pytest.fail(f"the shared data is missing: expected it at {SHARED}")
    return SHARED


class DataHandler(SimpleHTTPRequestHandler):
    """Serves ../shared/data; `/flaky/N/<path>` answers 503 N times before serving <path>."""

    failures: ClassVar[dict[str, int]] = {}
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        DataHandler.requests.append(self.path)
        if self.path.startswith("/flaky/"):
            _, _, count, rest = self.path.split("/", 3)
            seen = DataHandler.failures.get(self.path, 0)
            if seen < int(count):
                DataHandler.failures[self.path] = seen + 1
                self.send_error(503, "try again")
                return
            self.path = "/" + rest
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


class QuietHandler(BaseHTTPRequestHandler):
    """A test server's handler: no access log, one call to answer with a body."""

    def send_body(self, body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 for the block; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def http_base(shared: Path) -> Iterator[str]:
    handler = functools.partial(DataHandler, directory=str(DATA))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def nlp() -> Language:
    return load_pipeline()


def write_json(path: Path, value: object) -> Path:
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def entry(course: str, question: str, answer: str, section: str = "General", **extra: object) -> dict:
    return {"course": course, "section": section, "question": question, "text": answer, **extra}


def index_content(
    nlp: Language, documents: pd.DataFrame, config: ChunkingConfig = ChunkingConfig()
) -> IndexContent:
    """What es_index publishes for `documents`, built with the assets' own functions."""
    chunks = make_chunks(documents, config)
    lemmas = lemmatize_chunks(nlp, chunks)
    return IndexContent.assemble(chunks, lemmas, embed_chunks(nlp, lemmas), model_fingerprint())


def content_rows(content: IndexContent) -> tuple[pd.DataFrame, np.ndarray]:
    """The rows (INDEX_COLUMNS) and vectors of `content`, whole: what the tests compare and edit."""
    blocks = list(content.blocks())
    return pd.concat([b.rows for b in blocks], ignore_index=True), np.concatenate([b.vectors for b in blocks])


def content_of(rows: pd.DataFrame, vectors: np.ndarray, fingerprint: str) -> IndexContent:
    """Content holding exactly these rows (INDEX_COLUMNS, their row hashes as given) and vectors."""
    lemmas = rows[["chunk_id", *LEMMA_FIELD_COLUMNS]]
    content = IndexContent.assemble(
        rows[CHUNK_COLUMNS], lemmas, ChunkVectors(list(rows.chunk_id), vectors), fingerprint
    )
    return replace(content, row_hashes=list(rows.row_hash))


def semantic_content(content: IndexContent, sentences: np.ndarray) -> IndexContent:
    """`content` for RAG_RERANKER=semantic, with these sentence vectors (its row hashes name the
    sentence model, as a refresh in that mode makes them)."""
    rows, vectors = content_rows(content)
    return IndexContent.assemble(
        rows[CHUNK_COLUMNS],
        rows[["chunk_id", *LEMMA_FIELD_COLUMNS]],
        ChunkVectors(list(rows.chunk_id), vectors, sentences),
        content.fingerprint,
        reranker="semantic",
    )


def subset(content: IndexContent, keep: np.ndarray) -> IndexContent:
    """The rows of `content` where `keep` holds."""
    rows, vectors = content_rows(content)
    return content_of(rows[keep].reset_index(drop=True), vectors[keep], content.fingerprint)


def load_file(path: Path | str) -> pd.DataFrame:
    return load_documents(str(path), Fetcher()).frame


@pytest.fixture(scope="session")
def documents_2025(shared: Path) -> pd.DataFrame:
    return load_file(DATA / "documents-2025.json")


@pytest.fixture(scope="session")
def content_2025(nlp: Language, documents_2025: pd.DataFrame) -> IndexContent:
    return index_content(nlp, documents_2025)


def eval_slice(directory: Path, entries: int = 60, questions: int = 80) -> tuple[Path, Path]:
    """A small documents file with ids and the ground-truth rows about it, from ../shared/eval."""
    documents = json.loads((EVAL / "documents-with-ids.json").read_text())
    kept = [d for d in documents if d["course"] == "data-engineering-zoomcamp"][:entries]
    ids = {d["id"] for d in kept}
    with open(EVAL / "ground-truth-dev.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["document"] in ids][:questions]
    documents_path = write_json(directory / "eval-documents.json", kept)
    ground_truth_path = directory / "eval-ground-truth.csv"
    with open(ground_truth_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["question", "course", "document"])
        writer.writeheader()
        writer.writerows(rows)
    return documents_path, ground_truth_path
