"""The `rag` console script, run as users run it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rag_assets.index.backend import IndexContent
from rag_assets.index.embedded import EmbeddedIndex

from .conftest import EVAL, eval_slice, rag
from .fake_elasticsearch import FakeElasticsearch

HIT_KEYS = {"doc_id", "chunk_id", "course", "section", "question", "text", "score", "relevance"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, content_2025: IndexContent) -> Path:
    path = tmp_path_factory.mktemp("published")
    EmbeddedIndex(path).publish(content_2025)
    return path


def test_search_json(data_dir: Path) -> None:
    result = rag(
        "search",
        "I just discovered the course, can I still join?",
        "--course",
        "data-engineering-zoomcamp",
        "--json",
        data_dir=data_dir,
    )
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)
    # the default floor leaves the two entries that hold most of the query's idf-weighted words
    assert len(hits) == 2 and all(hit["relevance"] >= 0.4 for hit in hits)
    assert all(set(hit) == HIT_KEYS for hit in hits)
    # the features mode (the default) ranks "When will the course start?" first: its answer holds
    # "join" and "course" too (docs/retrieval.md, The default mode); the fused order had it second
    assert {hit["question"] for hit in hits} == {
        "Course - Can I still join the course after the start date?",
        "Course - When will the course start?",
    }


@pytest.mark.parametrize(
    "query", ["xyzzy flarb quux blorptangle", "Who painted the Mona Lisa?", "gantry mantic murine doctrine"]
)
def test_a_query_nothing_answers_says_no_entry_matches(data_dir: Path, query: str) -> None:
    said = rag("search", query, data_dir=data_dir)
    assert said.returncode == 0, said.stderr
    assert said.stdout.strip().splitlines()[-1] == (
        "no entry matches the query (none relevant enough; --min-relevance 0 shows the closest)"
    )
    assert json.loads(rag("search", query, "--json", data_dir=data_dir).stdout) == []
    closest = json.loads(rag("search", query, "--json", "--min-relevance", "0", data_dir=data_dir).stdout)
    assert all(hit["relevance"] < 0.25 for hit in closest)  # below the lexical floor: left out
    if query != "xyzzy flarb quux blorptangle":  # no word of it is in the FAQ: nothing is found at all
        assert len(closest) == 5


def test_search_text_and_k(data_dir: Path) -> None:
    result = rag("search", "kafka consumer", "--k", "2", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("1. [")
    assert "\n2. [" in result.stdout and "\n3. [" not in result.stdout


def test_stats(data_dir: Path) -> None:
    stats = json.loads(rag("stats", "--json", data_dir=data_dir).stdout)
    assert stats["backend"] == "embedded"
    assert stats["entries"] == 948
    assert stats["courses"]["mlops-zoomcamp"] == 138
    assert stats["published_at"]
    text = rag("stats", data_dir=data_dir).stdout
    assert "entries:      948" in text


def test_errors_exit_non_zero_with_a_message(data_dir: Path, tmp_path: Path) -> None:
    unknown = rag("search", "docker", "--course", "nope", data_dir=data_dir)
    assert unknown.returncode == 1
    assert "rag: error: unknown course 'nope'" in unknown.stderr
    empty = rag("search", " ", data_dir=data_dir)
    assert empty.returncode == 1 and "the query is blank" in empty.stderr
    missing = rag("stats", data_dir=tmp_path / "none")
    assert missing.returncode == 1 and "no index at" in missing.stderr


def test_eval_on_a_slice_of_the_ground_truth(tmp_path: Path) -> None:
    documents, ground_truth = eval_slice(tmp_path)
    result = rag(
        "eval", "--documents", str(documents), "--ground-truth", str(ground_truth), "--json",
        data_dir=tmp_path / "unused",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert set(metrics) == {"reranker", "hit_rate", "mrr", "questions", "p50_ms"}
    assert (metrics["questions"], metrics["reranker"]) == (80, "features")  # the default mode
    assert 0.85 <= metrics["hit_rate"] <= 1.0
    assert 0 < metrics["mrr"] <= metrics["hit_rate"]
    assert not (tmp_path / "unused").exists()  # eval never touches the served index


@pytest.mark.parametrize("mode", ["features", "semantic"])
def test_eval_runs_and_names_the_mode_of_rag_reranker(tmp_path: Path, mode: str) -> None:
    documents, ground_truth = eval_slice(tmp_path)
    arguments = ("eval", "--documents", str(documents), "--ground-truth", str(ground_truth))
    result = rag(*arguments, data_dir=None, RAG_RERANKER=mode)
    assert result.returncode == 0, result.stderr
    assert f"reranker: {mode} (RAG_RERANKER)" in result.stdout
    assert "hit rate@5: " in result.stdout and "semantic searches fell back" not in result.stdout


def test_an_unknown_reranker_mode_is_named(tmp_path: Path) -> None:
    documents, ground_truth = eval_slice(tmp_path)
    arguments = ("eval", "--documents", str(documents), "--ground-truth", str(ground_truth))
    result = rag(*arguments, data_dir=None, RAG_RERANKER="smart")
    assert result.returncode == 1
    assert "RAG_RERANKER='smart' is not one of none, features, semantic" in result.stderr


def test_eval_reports_a_bad_ground_truth(tmp_path: Path) -> None:
    (tmp_path / "gt.csv").write_text("q,c\n1,2\n")
    result = rag(
        "eval",
        "--documents",
        str(EVAL / "documents-with-ids.json"),
        "--ground-truth",
        str(tmp_path / "gt.csv"),
        data_dir=tmp_path,
    )
    assert result.returncode == 1
    assert "lacks column(s) course, document, question" in result.stderr


def test_eval_refuses_documents_without_the_ground_truths_ids(tmp_path: Path) -> None:
    documents, ground_truth = eval_slice(tmp_path)
    without_ids = json.loads(documents.read_text())
    for document in without_ids:
        del document["id"]
    documents.write_text(json.dumps(without_ids))
    result = rag("eval", "--documents", str(documents), "--ground-truth", str(ground_truth), data_dir=None)
    assert result.returncode == 1
    assert "none of the" in result.stderr and f"is an entry of {documents}" in result.stderr
    assert result.stdout == ""


def test_a_query_may_start_with_a_dash(data_dir: Path) -> None:
    for argv in (["search", "-v flag", "--k", "1"], ["search", "--k", "1", "-v", "flag"]):
        result = rag(*argv, data_dir=data_dir)
        assert result.returncode == 0, (argv, result.stderr)
        assert result.stdout.startswith("1. [")


def test_a_query_with_invalid_utf8_is_refused_in_one_line(data_dir: Path) -> None:
    result = rag("search", b"caf\xe9 latte", data_dir=data_dir)
    assert result.returncode == 1
    assert result.stderr == "rag: error: the query is not valid UTF-8 (character 4 of 10)\n"


def test_rag_finds_the_index_from_a_subdirectory_of_the_project(data_dir: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "docs" / "deep").mkdir(parents=True)
    shutil.copytree(data_dir, project / ".rag")
    found = rag("stats", "--json", data_dir=None, cwd=project / "docs" / "deep")
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["location"] == str(project / ".rag" / "index.sqlite")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    missing = rag("stats", data_dir=None, cwd=elsewhere)
    assert missing.returncode == 1
    assert f"no index at {elsewhere / '.rag' / 'index.sqlite'}" in missing.stderr


def test_versions_json(tmp_path: Path) -> None:
    fake = FakeElasticsearch()
    try:
        names = ["faq-20261101000000000000-aaaaaa", "faq-20261102000000000000-bbbbbb"]
        for name in names:
            fake.create(name, {})
        fake.aliases["faq"] = names[1]
        result = rag(
            "versions", "--json", data_dir=tmp_path, ELASTICSEARCH_URL=fake.url, ELASTICSEARCH_ALIAS="faq"
        )
    finally:
        fake.close()
    assert result.returncode == 0, result.stderr
    versions = json.loads(result.stdout)
    assert [(v["name"], v["live"], v["documents"]) for v in versions] == [
        (names[1], True, 0),
        (names[0], False, 0),
    ]
    keys = {"name", "documents", "created_at", "live", "complete", "completed_documents"}
    assert all(set(v) == keys for v in versions)
