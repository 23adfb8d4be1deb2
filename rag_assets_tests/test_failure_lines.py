"""A failure a user causes or meets ends `make run` and the `rag` commands in a few lines that name
the cause and the setting to change, never in a traceback (issue 28)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ROOT, entry, free_port, rag, without_project_settings, write_json
from .fake_elasticsearch import FakeElasticsearch

MAKE_RUN = [sys.executable, "-m", "rag_assets.defs.refresh"]  # what `make run` runs


def make_run(tmp_path: Path, **env: str) -> tuple[int, list[str], str]:
    """`make run`'s exit status, its summary (its own last lines) and all it printed."""
    home = tmp_path / "dagster"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text((ROOT / "dagster-instance.yaml").read_text())
    source = write_json(tmp_path / "faq.json", [entry("a", "How do I join?", "Register on the site.")])
    defaults = {
        "DAGSTER_HOME": str(home),
        "RAG_DATA_DIR": str(tmp_path / "data"),
        "DOCUMENTS_URL": str(source),
        "RAG_NLP_PROCESSES": "1",
    }
    environment = without_project_settings(**(defaults | env))  # a test's own settings win
    done = subprocess.run(MAKE_RUN, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    summary = [
        line for line in done.stdout.splitlines() if line.startswith("refresh:")
    ]  # Dagster's log: stderr
    return done.returncode, summary, done.stdout + done.stderr


@pytest.fixture
def refusing_cluster() -> Iterator[FakeElasticsearch]:
    cluster = FakeElasticsearch()
    cluster.api_key = "the-right-key"
    yield cluster
    cluster.close()


@pytest.mark.slow
def test_an_unreachable_cluster_is_named_in_the_summary(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    status, summary, printed = make_run(tmp_path, ELASTICSEARCH_URL=url)
    assert status == 1 and "Traceback" not in printed
    assert len(summary) == 3, summary
    assert summary[1].startswith(
        "refresh:   faq_source_faq_source_count_guard failed: cannot reach Elasticsearch"
    )
    assert summary[2].startswith("refresh: served: nothing (cannot reach Elasticsearch")
    assert all("check ELASTICSEARCH_URL and that the cluster is up" in line for line in summary[1:])


@pytest.mark.slow
def test_refused_credentials_name_the_variables(tmp_path: Path, refusing_cluster: FakeElasticsearch) -> None:
    status, summary, printed = make_run(
        tmp_path, ELASTICSEARCH_URL=refusing_cluster.url, ELASTICSEARCH_API_KEY="a-wrong-key"
    )
    assert status == 1 and "Traceback" not in printed and "a-wrong-key" not in printed
    assert len(summary) == 3, summary
    for line in summary[1:]:
        assert "Elasticsearch answered 401: unable to authenticate" in line
        assert "check ELASTICSEARCH_API_KEY (or ELASTICSEARCH_USERNAME and ELASTICSEARCH_PASSWORD)" in line
    assert all(call.method == "GET" for call in refusing_cluster.requests)  # nothing was written


@pytest.mark.slow
def test_an_unreachable_source_suggests_documents_url_and_a_snapshot(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/courses.json"
    status, summary, printed = make_run(tmp_path, DOCUMENTS_URL=url, RAG_FETCH_RETRIES="0")
    assert status == 1 and "Traceback" not in printed
    assert summary == [
        summary[0],
        f"refresh:   faq_source failed: could not fetch {url}: Failed to establish a new connection: "
        "[Errno 111] Connection refused; set DOCUMENTS_URL to a URL this machine can reach, or to a saved "
        "snapshot file (offline: DOCUMENTS_URL=../shared/data/documents-2025.json)",
        f"refresh: served: nothing yet, no refresh has published to {tmp_path / 'data' / 'index.sqlite'}",
    ]


@pytest.mark.slow
def test_rag_commands_name_the_cluster_setting(tmp_path: Path, refusing_cluster: FakeElasticsearch) -> None:
    unreachable = rag("stats", data_dir=tmp_path, ELASTICSEARCH_URL=f"http://127.0.0.1:{free_port()}")
    refused = rag(
        "search", "join", data_dir=tmp_path, ELASTICSEARCH_URL=refusing_cluster.url, ELASTICSEARCH_API_KEY="x"
    )
    for done, setting in ((unreachable, "ELASTICSEARCH_URL"), (refused, "ELASTICSEARCH_API_KEY")):
        assert done.returncode == 1 and done.stdout == ""
        assert len(done.stderr.splitlines()) == 1 and setting in done.stderr, done.stderr
