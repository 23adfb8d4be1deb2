"""Reading the three source shapes over real HTTP and from files, and rejecting broken sources."""

from __future__ import annotations

import codecs
import json
import socket
import time
from pathlib import Path
from typing import ClassVar

import pytest

from rag_assets.ingest.sources import (
    DOCUMENT_COLUMNS,
    Fetcher,
    SourceError,
    faq_base_url,
    load_documents,
    redact,
)

from .conftest import DATA, EVAL, DataHandler, QuietHandler, entry, serving, write_json


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


def test_a_byte_order_mark_and_any_unicode_are_read(tmp_path: Path) -> None:
    entries = [entry("c", "Emoji? 😀", "Yes: «ça marche» — 中文 too"), entry("c", "Plain?", "Plain.")]
    source = tmp_path / "bom.json"
    source.write_bytes(codecs.BOM_UTF8 + json.dumps(entries).encode())
    frame = load_documents(str(source), Fetcher()).frame
    assert frame["question"].tolist() == ["Emoji? 😀", "Plain?"]
    assert frame["answer"][0] == "Yes: «ça marche» — 中文 too"


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
            entry("c", "empty question", "an answer") | {"question": "  "},
            "not an object",
            {"course": "c", "section": 3, "question": "q", "text": "a"},
            entry("c", "another good one", "yes"),
            entry("c", "an empty answer", "   "),
        ],
    )
    loaded = load_documents(str(source), Fetcher())
    # an empty answer is no malformed entry: the course's content check judges how many there are
    assert loaded.frame["question"].tolist() == ["good question", "another good one", "an empty answer"]
    assert loaded.frame["answer"].tolist()[-1] == ""
    reasons = [str(d) for d in loaded.dropped]
    assert reasons == [
        f"{source} entry #1: missing field 'question'",
        f"{source} entry #2: field 'question' is empty",
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


class Trickle(QuietHandler):
    """One byte every 0.25 s: each read is quick, the whole body takes a minute."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "240")
        self.end_headers()
        try:
            for _ in range(240):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.25)
        except OSError:
            pass  # the client gave up


def test_a_trickling_server_fails_at_the_fetch_deadline() -> None:
    with serving(Trickle) as base:
        url = f"{base}/documents.json"
        started = time.monotonic()
        with pytest.raises(SourceError) as raised:
            Fetcher(timeout_s=5, deadline_s=2).read_json(url)
        elapsed = time.monotonic() - started
    assert elapsed < 6
    assert f"{url}: not read within the fetch deadline of 2 s (RAG_FETCH_DEADLINE_S" in str(raised.value)


class SlowDown(QuietHandler):
    """503 with Retry-After: 30 once, then the documents."""

    answered: ClassVar[int] = 0

    def do_GET(self) -> None:
        SlowDown.answered += 1
        if SlowDown.answered == 1:
            self.send_body(b"", status=503, headers={"Retry-After": "30"})
        else:
            self.send_body(json.dumps([entry("c", "Why?", "Because.")]).encode())


def test_retry_after_is_capped() -> None:
    with serving(SlowDown) as base:
        url = f"{base}/documents.json"
        started = time.monotonic()
        payload = Fetcher(max_retry_after_s=1).read_json(url)
        elapsed = time.monotonic() - started
    assert payload[0]["question"] == "Why?"
    assert SlowDown.answered == 2
    assert 0.9 < elapsed < 10  # waited the cap, not the 30 s asked for


def test_a_malformed_first_entry_is_dropped_not_the_source(tmp_path: Path) -> None:
    entries = [{"text": "no question here"}, *(entry("c", f"Question {n}?", "Answer.") for n in range(3))]
    loaded = load_documents(str(write_json(tmp_path / "flat.json", entries)), Fetcher())
    assert loaded.shape == "flat"
    assert len(loaded.frame) == 3
    assert [(d.position, d.reason) for d in loaded.dropped] == [(0, "missing field 'section'")]


def test_renaming_a_repeated_id_never_takes_an_existing_id(tmp_path: Path) -> None:
    entries = [
        entry("c", "First?", "a", id="X"),
        entry("c", "Second?", "b", id="X"),
        entry("c", "Third?", "c", id="X~2"),
    ]
    loaded = load_documents(str(write_json(tmp_path / "flat.json", entries)), Fetcher())
    assert set(loaded.frame["doc_id"]) == {"X", "X~3", "X~2"}
    assert loaded.renamed_ids == ["X~3"]


@pytest.mark.parametrize("with_ids", [False, True], ids=["derived ids", "repeated source ids"])
def test_ids_survive_a_reordered_source(tmp_path: Path, with_ids: bool) -> None:
    """Entries sharing a question (or a source id) keep their ids when the source reorders them,
    so a refresh of an unchanged source rewrites nothing."""
    extra = {"id": "X"} if with_ids else {}
    entries = [entry("c", "Same question?", f"Answer {n}.", **extra) for n in range(4)] + [
        entry("c", f"Question {n}?", "Answer.") for n in range(3)
    ]
    ids = {}
    for name, order in (("forward", entries), ("reversed", entries[::-1])):
        frame = load_documents(str(write_json(tmp_path / f"{name}.json", order)), Fetcher()).frame
        assert frame["doc_id"].is_unique
        ids[name] = dict(zip(frame["answer"] + frame["question"], frame["doc_id"], strict=True))
    assert ids["forward"] == ids["reversed"]


def test_an_oversized_entry_is_dropped_and_counted(tmp_path: Path) -> None:
    entries = [entry("c", "Huge?", "word " * 30_000), entry("c", "Small?", "Fine.")]
    loaded = load_documents(
        str(write_json(tmp_path / "flat.json", entries)), Fetcher(), max_entry_chars=100_000
    )
    assert list(loaded.frame["question"]) == ["Small?"]
    [dropped] = loaded.dropped
    assert dropped.position == 0
    assert dropped.reason == "150,012 characters, more than the limit of 100,000 (RAG_MAX_ENTRY_CHARS)"
