"""Reading the three source shapes over real HTTP and from files, and rejecting broken sources."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from rag_assets.ingest.sources import (
    DOCUMENT_COLUMNS,
    Fetcher,
    SourceError,
    faq_base_url,
    load_documents,
    redact,
)

from .conftest import DATA, EVAL, DataHandler, entry, write_json


def test_zoomcamp_documents_over_http(http_base: str) -> None:
    loaded = load_documents(f"{http_base}/documents-2025.json", Fetcher())
    frame = loaded.frame
    assert loaded.shape == "zoomcamp"
    assert list(frame.columns) == DOCUMENT_COLUMNS
    assert len(frame) == 948
    assert frame["doc_id"].is_unique
    assert set(frame["course"]) == {
        "data-engineering-zoomcamp",
        "machine-learning-zoomcamp",
        "mlops-zoomcamp",
    }
    assert loaded.dropped == []


def test_faq_api_index_fetches_every_course_file(http_base: str) -> None:
    DataHandler.requests.clear()
    loaded = load_documents(f"{http_base}/faq-api/json/courses.json", Fetcher())
    assert loaded.shape == "faq_api"
    assert len(loaded.frame) == 1215
    assert len(loaded.locations) == 5
    assert "/faq-api/json/llm-zoomcamp.json" in DataHandler.requests
    # FAQ API entries carry ids; they are used as they are.
    api = json.loads((DATA / "faq-api/json/llm-zoomcamp.json").read_text())
    assert set(loaded.frame["doc_id"]) >= {item["id"] for item in api}
    assert loaded.frame.groupby("course").size().to_dict()["llm-zoomcamp"] == len(api)


def test_flat_entries_keep_source_ids_and_rename_repeats() -> None:
    loaded = load_documents(str(EVAL / "documents-with-ids.json"), Fetcher())
    frame = loaded.frame
    assert loaded.shape == "flat"
    assert len(frame) == 948
    assert frame["doc_id"].is_unique
    # The file repeats id 593f7569 for two different answers: both are kept.
    assert loaded.renamed_ids == ["593f7569~2"]
    assert {"593f7569", "593f7569~2"} <= set(frame["doc_id"])


def test_file_url_and_plain_path_give_the_same_documents() -> None:
    path = DATA / "documents-2024-06.json"
    by_path = load_documents(str(path), Fetcher()).frame
    by_url = load_documents(path.as_uri(), Fetcher()).frame
    assert len(by_path) == 1002
    assert by_path.equals(by_url)


def test_generated_ids_are_stable_and_unique_for_repeated_questions() -> None:
    first = load_documents(str(DATA / "documents-2025.json"), Fetcher()).frame
    second = load_documents(str(DATA / "documents-2025.json"), Fetcher()).frame
    assert first["doc_id"].tolist() == second["doc_id"].tolist()
    assert first["doc_id"].is_unique
    repeated = first[first.duplicated(["course", "question"], keep=False)]
    assert len(repeated) == 8  # 4 (course, question) pairs occur twice with different text
    assert repeated["doc_id"].is_unique


def test_ids_survive_an_answer_edit_and_the_removal_of_other_entries() -> None:
    old = load_documents(str(DATA / "documents-2024-06.json"), Fetcher()).frame
    new = load_documents(str(DATA / "documents-2025.json"), Fetcher()).frame
    key = ["course", "question"]
    both = old.drop_duplicates(key, keep=False).merge(new.drop_duplicates(key, keep=False), on=key)
    assert (both["doc_id_x"] == both["doc_id_y"]).all()
    edited = both[both["answer_x"] != both["answer_y"]]
    assert len(edited) > 0
    assert (edited["content_hash_x"] != edited["content_hash_y"]).all()


def test_malformed_entries_are_dropped_and_reported(tmp_path: Path) -> None:
    source = write_json(
        tmp_path / "flat.json",
        [
            entry("c", "good question", "good answer"),
            {"course": "c", "section": "s", "text": "no question"},
            entry("c", "empty answer", "   "),
            "not an object",
            {"course": "c", "section": 3, "question": "q", "text": "a"},
            entry("c", "another good one", "yes"),
        ],
    )
    loaded = load_documents(str(source), Fetcher())
    assert loaded.frame["question"].tolist() == ["good question", "another good one"]
    reasons = [str(d) for d in loaded.dropped]
    assert reasons == [
        f"{source} entry #1: missing field 'question'",
        f"{source} entry #2: field 'text' is empty",
        f"{source} entry #3: entry is str, not an object",
        f"{source} entry #4: field 'section' is not a string",
    ]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"course": "c"}', "expected a JSON list at the top level, got dict"),
        ("[]", "contains no entries"),
        ('[{"name": "x"}]', "unrecognised shape"),
        ('[{"course": "c", "documents": "oops"}]', "course group #0 has no 'documents' list"),
        ('[{"course": "c", "section": "s", "question": "q"}]', "no valid entries"),
    ],
)
def test_malformed_sources_fail_naming_the_location(tmp_path: Path, payload: str, message: str) -> None:
    source = tmp_path / "broken.json"
    source.write_text(payload)
    with pytest.raises(SourceError, match=message) as error:
        load_documents(str(source), Fetcher())
    assert str(source) in str(error.value)


def test_http_errors_name_the_url(http_base: str) -> None:
    with pytest.raises(SourceError, match=rf"{http_base}/missing.json answered HTTP 404"):
        load_documents(f"{http_base}/missing.json", Fetcher(retries=0))


def test_a_missing_course_file_fails_the_whole_faq_source(tmp_path: Path) -> None:
    (tmp_path / "json").mkdir()
    write_json(tmp_path / "json/courses.json", [{"course": "gone", "path": "/json/gone.json"}])
    with pytest.raises(SourceError, match=r"json/gone\.json: no such file"):
        load_documents(str(tmp_path / "json/courses.json"), Fetcher())


def test_unreachable_host_fails_after_retries() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/documents.json"
    with pytest.raises(SourceError, match=rf"could not fetch {url}"):
        Fetcher(timeout_s=2, retries=1, backoff_s=0).read_json(url)


def test_transient_http_failures_are_retried(http_base: str) -> None:
    url = f"{http_base}/flaky/2/documents-2025.json"
    assert len(Fetcher(retries=3, backoff_s=0).read_json(url)) == 3
    assert DataHandler.failures["/flaky/2/documents-2025.json"] == 2


def test_no_retry_budget_left_names_the_status(http_base: str) -> None:
    with pytest.raises(SourceError, match="answered HTTP 503"):
        Fetcher(retries=1, backoff_s=0).read_json(f"{http_base}/flaky/5/documents-2025.json")


def test_missing_file_and_unknown_scheme(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        Fetcher().read_json(str(tmp_path / "nope.json"))
    with pytest.raises(SourceError, match="unsupported scheme 'ftp'"):
        Fetcher().read_json("ftp://example.org/documents.json")


def test_credentials_never_reach_messages() -> None:
    assert redact("https://user:s3cret@example.org/x.json") == "https://***@example.org/x.json"
    assert redact("/plain/path.json") == "/plain/path.json"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(SourceError) as error:
        Fetcher(timeout_s=1, retries=0).read_json(f"http://user:s3cret@127.0.0.1:{port}/x.json")
    assert "s3cret" not in str(error.value)


def test_faq_base_url() -> None:
    assert faq_base_url("https://datatalks.club/faq/json/courses.json") == "https://datatalks.club/faq"
    assert faq_base_url("/data/faq-api/json/courses.json") == "/data/faq-api"
