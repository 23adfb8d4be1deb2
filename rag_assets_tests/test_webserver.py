"""The Dagster UI: a real dagster-webserver on 127.0.0.1 serving the project's workspace.yaml."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
QUERY = """
{
  assetNodes {
    assetKey { path }
    groupName
    kinds
    dependencyKeys { path }
    isPartitioned
    assetChecksOrError { ... on AssetChecks { checks { name blocking } } }
  }
  repositoriesOrError {
    ... on RepositoryConnection {
      nodes {
        location { name }
        jobs { name }
        schedules { name cronSchedule executionTimezone scheduleState { status } }
        sensors { name sensorState { status } }
      }
    }
  }
}
"""


@pytest.fixture(scope="module")
def webserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("dagster_home")
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "RAG_DATA_DIR": str(home / "data")}
    binary = Path(sys.executable).parent / "dagster-webserver"
    process = subprocess.Popen(
        [str(binary), "-h", "127.0.0.1", "-p", str(port), "-w", "workspace.yaml"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"dagster-webserver exited: {process.stderr.read()[-2000:]}")
            try:
                if requests.get(f"{url}/server_info", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("dagster-webserver did not answer within 180 s")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def graphql(url: str) -> dict:
    deadline = time.monotonic() + 120
    while True:  # the code location loads in the background after the server answers
        response = requests.post(f"{url}/graphql", json={"query": QUERY}, timeout=60)
        response.raise_for_status()
        data = response.json()["data"]
        if data["assetNodes"] or time.monotonic() > deadline:
            return data
        time.sleep(1)


def test_the_ui_shows_the_lineage_checks_and_schedule(webserver: str) -> None:
    data = graphql(webserver)
    nodes = {"/".join(n["assetKey"]["path"]): n for n in data["assetNodes"]}
    assert set(nodes) == {"faq_source", "raw_documents", "chunks", "lemmas", "embeddings", "es_index"}
    lineage = {key: sorted("/".join(d["path"]) for d in n["dependencyKeys"]) for key, n in nodes.items()}
    assert lineage == {
        "faq_source": [],
        "raw_documents": ["faq_source"],
        "chunks": ["raw_documents"],
        "lemmas": ["chunks"],
        "embeddings": ["chunks", "lemmas"],
        "es_index": ["chunks", "embeddings", "lemmas"],
    }
    assert {n["groupName"] for n in nodes.values()} == {"faq_index"}
    assert "spacy" in nodes["lemmas"]["kinds"]
    partitioned = {key for key, n in nodes.items() if n["isPartitioned"]}
    assert partitioned == {"raw_documents", "chunks", "lemmas", "embeddings"}  # by course
    checks = {
        key: {c["name"]: c["blocking"] for c in n["assetChecksOrError"]["checks"]} for key, n in nodes.items()
    }
    assert checks == {
        "faq_source": {"faq_source_well_formed": True, "faq_source_count_guard": True},
        "raw_documents": {},
        "chunks": {"chunks_well_formed": True},
        "lemmas": {"lemmas_well_formed": True},
        "embeddings": {"embeddings_well_formed": True},
        "es_index": {"es_index_matches_chunks": False, "es_index_smoke_query": False},
    }
    [repository] = data["repositoriesOrError"]["nodes"]
    assert repository["location"]["name"] == "rag_assets"  # as [tool.dg.project] names it
    [schedule] = repository["schedules"]
    assert (schedule["name"], schedule["cronSchedule"], schedule["executionTimezone"]) == (
        "daily_document_refresh",
        "0 0 * * *",
        "UTC",
    )
    assert schedule["scheduleState"]["status"] == "RUNNING"
    assert sorted(s["name"] for s in repository["sensors"]) == [
        "course_runs_after_source",
        "initial_index_build",
        "publish_after_courses",
    ]
    assert {"faq_index_refresh", "course_refresh", "index_publish"} <= {j["name"] for j in repository["jobs"]}
