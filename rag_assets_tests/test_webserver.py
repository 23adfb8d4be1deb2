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

from rag_assets.index.embedded import EmbeddedIndex

from .conftest import DATA, free_port

ROOT = Path(__file__).resolve().parents[1]
DATA_DIRS: dict[str, str] = {}  # webserver URL -> its RAG_DATA_DIR
LAUNCH = """
mutation($selector: JobOrPipelineSelector!) {
  launchPipelineExecution(executionParams: {selector: $selector, mode: "default"}) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
  }
}
"""
RUN = "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"
RUNS = "{ runsOrError { ... on Runs { results { runId } } } }"
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
    # runs the webserver launches start at once, without a daemon's queue
    coordinator = "run_coordinator:\n  module: dagster.core.run_coordinator\n  class: DefaultRunCoordinator\n"
    (home / "dagster.yaml").write_text((ROOT / "dagster-instance.yaml").read_text() + coordinator)
    port = free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "RAG_DATA_DIR": str(home / "data"),
        "DOCUMENTS_URL": str(DATA / "documents-2025.json"),
        "RAG_NLP_PROCESSES": "1",
    }
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
    DATA_DIRS[url] = str(home / "data")
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


def webserver_data_dir(url: str) -> str:
    return DATA_DIRS[url]


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
        "embeddings": ["lemmas"],
        "es_index": ["embeddings"],
    }
    assert {n["groupName"] for n in nodes.values()} == {"faq_index"}
    assert "spacy" in nodes["lemmas"]["kinds"]
    assert not any(n["isPartitioned"] for n in nodes.values())  # one run builds every course
    checks = {
        key: {c["name"]: c["blocking"] for c in n["assetChecksOrError"]["checks"]} for key, n in nodes.items()
    }
    assert checks == {
        "faq_source": {"faq_source_well_formed": True, "faq_source_count_guard": True},
        "raw_documents": {"raw_documents_content": True},
        "chunks": {"chunks_well_formed": True, "chunks_answer_churn": True},
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
    assert [s["name"] for s in repository["sensors"]] == ["initial_index_build"]
    assert {j["name"] for j in repository["jobs"]} == {"faq_index_refresh", "__ASSET_JOB"}


def test_materialize_all_in_the_ui_builds_and_publishes_in_one_run(webserver: str) -> None:
    """What the UI's *Materialize all* sends: one run of every asset, launched by the webserver."""
    data = graphql(webserver)
    keys = [n["assetKey"] for n in data["assetNodes"]]
    selector = {
        "repositoryLocationName": "rag_assets",
        "repositoryName": "__repository__",
        "pipelineName": "__ASSET_JOB",
        "assetSelection": keys,
    }
    answer = requests.post(
        f"{webserver}/graphql", json={"query": LAUNCH, "variables": {"selector": selector}}, timeout=60
    ).json()
    assert answer.get("data"), answer
    launched = answer["data"]["launchPipelineExecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline = time.monotonic() + 300
    while True:
        run = requests.post(
            f"{webserver}/graphql", json={"query": RUN, "variables": {"id": run_id}}, timeout=60
        ).json()["data"]["runOrError"]
        if run["status"] in ("SUCCESS", "FAILURE", "CANCELED") or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert run["status"] == "SUCCESS"
    runs = requests.post(f"{webserver}/graphql", json={"query": RUNS}, timeout=60).json()["data"]
    assert [r["runId"] for r in runs["runsOrError"]["results"]] == [run_id]  # nothing chained after it
    stats = EmbeddedIndex(Path(webserver_data_dir(webserver))).stats()
    assert (stats.entries, len(stats.courses)) == (948, 3)
