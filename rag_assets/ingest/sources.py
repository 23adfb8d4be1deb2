"""Reading FAQ sources: where they live (HTTP, file) and which of the known shapes they have.

A source is rejected as a whole when it cannot be read or has no recognisable shape, so a broken
upstream never reaches the index; a single bad entry is dropped and reported instead.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import orjson
import pandas as pd
import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

DEFAULT_DOCUMENTS_URL = "https://datatalks.club/faq/json/courses.json"
FAQ_INDEX_SUFFIX = "/json/courses.json"
# The key that marks an item of each shape.
_SHAPE_KEYS = {"documents": "zoomcamp", "question": "flat", "path": "faq_api"}
DEFAULT_MAX_ENTRY_CHARS = 100_000
DOCUMENT_COLUMNS = ["doc_id", "course", "section", "question", "answer", "content_hash"]


class SourceError(Exception):
    """The source as a whole is unusable; the message names the location and the problem."""


def redact(location: str) -> str:
    """Drop credentials embedded in a URL before it reaches a message or a log."""
    parts = urlsplit(location)
    if parts.username is None and parts.password is None:
        return location
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


class CappedRetry(Retry):
    """urllib3's Retry, honouring `Retry-After` only up to `max_retry_after_s`.

    An upstream asking for ten minutes between attempts would otherwise hold the run for half
    an hour; capped, the retries stay within the fetch deadline.
    """

    def __init__(self, *args: Any, max_retry_after_s: float = 60.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_retry_after_s = max_retry_after_s

    def new(self, **kwargs: Any) -> CappedRetry:
        retry = super().new(**kwargs)
        retry.max_retry_after_s = self.max_retry_after_s
        return retry

    def get_retry_after(self, response: Any) -> float | None:
        seconds = super().get_retry_after(response)
        return None if seconds is None else min(seconds, self.max_retry_after_s)


class Fetcher:
    """Reads JSON from http(s)://, file:// or a plain path.

    HTTP has a per-read timeout, retries (connection errors, 429, 5xx, `Retry-After` capped) and
    an overall deadline per URL, so neither a stalled nor a trickling server can hold a run.
    """

    def __init__(
        self,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        deadline_s: float = 300.0,
        max_retry_after_s: float = 60.0,
    ) -> None:
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        retry = CappedRetry(
            total=retries,
            backoff_factor=backoff_s,
            status_forcelist=(429, 500, 502, 503, 504),
            allowed_methods=frozenset({"GET"}),
            raise_on_status=False,
            max_retry_after_s=max_retry_after_s,
        )
        self._session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def read_json(self, location: str) -> Any:
        return parse_json(self.read_bytes(location), location)

    def read_bytes(self, location: str) -> bytes:
        scheme = urlsplit(location).scheme.lower()
        if scheme in ("http", "https"):
            return self._read_http(location)
        if scheme == "file":
            return _read_file(Path(unquote(urlsplit(location).path)), location)
        if scheme and len(scheme) > 1:  # a one-letter scheme is a Windows drive, not a URL
            raise SourceError(f"{redact(location)}: unsupported scheme {scheme!r}")
        return _read_file(Path(location), location)

    def _read_http(self, url: str) -> bytes:
        started = time.monotonic()
        try:
            with self._session.get(url, timeout=self.timeout_s, stream=True) as response:
                if response.status_code != 200:
                    raise SourceError(f"{redact(url)} answered HTTP {response.status_code}")
                body = bytearray()
                # read1 returns what one read of the socket brings, so the deadline is checked
                # however slowly the bytes come.
                while chunk := response.raw.read1(1 << 16, decode_content=True):
                    body += chunk
                    if time.monotonic() - started > self.deadline_s:
                        elapsed = time.monotonic() - started
                        raise SourceError(
                            f"{redact(url)}: not read within the fetch deadline of {self.deadline_s:g} s "
                            f"(RAG_FETCH_DEADLINE_S; {len(body):,} bytes in {elapsed:.0f} s)"
                        )
                return bytes(body)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise SourceError(
                f"could not fetch {redact(url)}: {_network_reason(exc)}; set DOCUMENTS_URL to a URL this "
                "machine can reach, or to a saved snapshot file (offline: "
                "DOCUMENTS_URL=../shared/data/documents-2025.json)"
            ) from exc


def _network_reason(exc: Exception) -> str:
    """The cause under requests' and urllib3's wrapping ("Failed to resolve 'host' (...)",
    "... Connection refused"), without the pool and retry details."""
    reason = exc.args[0] if isinstance(exc, requests.ConnectionError) and exc.args else exc
    reason = getattr(reason, "reason", reason)  # urllib3's MaxRetryError holds it
    if isinstance(reason, urllib3.exceptions.NewConnectionError):  # "HTTPConnection(host=…): Failed …"
        return str(reason).split("): ", 1)[-1]
    return str(reason)


def _read_file(path: Path, location: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise SourceError(f"{location}: no such file") from exc
    except OSError as exc:
        raise SourceError(f"{location}: cannot read ({exc})") from exc


@dataclass
class DroppedEntry:
    location: str
    position: int
    reason: str

    def __str__(self) -> str:
        return f"{self.location} entry #{self.position}: {self.reason}"


@dataclass
class LoadedDocuments:
    """One row per FAQ entry plus what was read and what was left out."""

    frame: pd.DataFrame
    shape: str
    locations: list[str]
    dropped: list[DroppedEntry] = field(default_factory=list)
    renamed_ids: list[str] = field(default_factory=list)


def parse_json(body: bytes, location: str) -> Any:
    """orjson parses the UTF-8 bytes directly. `json.loads` first decodes them into one str of
    the whole document, 4 bytes a character as soon as it holds one emoji: an 88 MB source took
    524 MB to parse with it, 270 MB with orjson, in half the time (docs/benchmarks.md, Parsing sources)."""
    try:
        return orjson.loads(body.removeprefix(codecs.BOM_UTF8))
    except json.JSONDecodeError as exc:  # orjson's error is one, invalid UTF-8 included
        raise SourceError(f"{redact(location)} is not valid JSON: {exc}") from exc


@dataclass(frozen=True)
class SourceFile:
    location: str
    course: str | None  # the course a FAQ API course file holds
    body: bytes


@dataclass(frozen=True)
class FetchedSource:
    """Every file of a source, read but not parsed: enough to tell whether it changed."""

    location: str
    shape: str | None  # 'faq_api' once its index was read; the others are known when parsed
    files: list[SourceFile]

    @property
    def digest(self) -> str:
        content = hashlib.sha256()
        for file in self.files:
            content.update(f"{redact(file.location)}\x1f{file.course}\x1f{len(file.body)}\x1f".encode())
            content.update(file.body)
        return content.hexdigest()


# An index of course files is small; a larger file is only parsed when it changed.
_INDEX_MAX_BYTES = 16 << 20


def fetch_source(location: str, fetcher: Fetcher) -> FetchedSource:
    """Read the source's files; a FAQ API index is parsed to find its course files."""
    top = fetcher.read_bytes(location)
    files = [SourceFile(location, None, top)]
    if len(top) > _INDEX_MAX_BYTES:
        return FetchedSource(location, None, files)
    index = parse_json(top, location)
    if detect_shape(index, location) != "faq_api":
        return FetchedSource(location, None, files)
    for course_location, course in _faq_course_files(index, faq_base_url(location), location):
        files.append(SourceFile(course_location, course, fetcher.read_bytes(course_location)))
    return FetchedSource(location, "faq_api", files)


def parse_source(fetched: FetchedSource, max_entry_chars: int = DEFAULT_MAX_ENTRY_CHARS) -> LoadedDocuments:
    top = fetched.files[0]
    payload = parse_json(top.body, top.location)
    shape = fetched.shape or detect_shape(payload, top.location)
    if shape == "zoomcamp":
        entries = _zoomcamp_entries(payload, top.location)
    elif shape == "faq_api":
        if fetched.shape is None:
            raise SourceError(
                f"{redact(top.location)}: an index of course files larger than {_INDEX_MAX_BYTES >> 20} MB"
            )
        entries = []
        for course_file in fetched.files[1:]:
            course_payload = parse_json(course_file.body, course_file.location)
            if not isinstance(course_payload, list):
                raise SourceError(
                    f"{redact(course_file.location)}: expected a list of entries, "
                    f"got {type(course_payload).__name__}"
                )
            entries.extend(_raw_entries(course_payload, redact(course_file.location), course_file.course))
    else:
        entries = _raw_entries(payload, redact(top.location), None)
    return build_documents(entries, shape, [file.location for file in fetched.files], max_entry_chars)


def load_documents(
    location: str, fetcher: Fetcher, max_entry_chars: int = DEFAULT_MAX_ENTRY_CHARS
) -> LoadedDocuments:
    return parse_source(fetch_source(location, fetcher), max_entry_chars)


def detect_shape(payload: Any, location: str) -> str:
    """Recognise the source by content: 'zoomcamp', 'faq_api' (an index of course files) or 'flat'."""
    where = redact(location)
    if not isinstance(payload, list):
        raise SourceError(f"{where}: expected a JSON list at the top level, got {type(payload).__name__}")
    objects = [item for item in payload if isinstance(item, dict)]
    if not objects:
        raise SourceError(f"{where}: contains no entries")
    # Each item votes by its marker key, so one malformed item (even the first) cannot decide the
    # shape; it is dropped later as a bad entry instead.
    votes = Counter(shape for item in objects for key, shape in _SHAPE_KEYS.items() if key in item)
    if not votes:
        raise SourceError(
            f"{where}: unrecognised shape; expected course groups with 'documents', a FAQ API index "
            f"with 'path', or entries with 'question' (first item has keys {sorted(objects[0])})"
        )
    return votes.most_common(1)[0][0]


def faq_base_url(index_location: str) -> str:
    """The FAQ base URL: the index URL without its trailing /json/courses.json."""
    if index_location.endswith(FAQ_INDEX_SUFFIX):
        return index_location[: -len(FAQ_INDEX_SUFFIX)]
    return index_location.rsplit("/", 2)[0]


@dataclass
class _RawEntry:
    location: str
    position: int
    item: Any
    course: str | None


def _zoomcamp_entries(payload: list[Any], location: str) -> list[_RawEntry]:
    where = redact(location)
    entries: list[_RawEntry] = []
    for group_position, group in enumerate(payload):
        if not isinstance(group, dict) or not isinstance(group.get("documents"), list):
            raise SourceError(f"{where}: course group #{group_position} has no 'documents' list")
        course = group.get("course")
        if not isinstance(course, str) or not course.strip():
            raise SourceError(f"{where}: course group #{group_position} has no 'course' name")
        entries.extend(_raw_entries(group["documents"], f"{where} [{course}]", course))
    return entries


def _faq_course_files(payload: list[Any], base: str, location: str) -> Iterator[tuple[str, str | None]]:
    where = redact(location)
    for position, item in enumerate(payload):
        path = item.get("path") if isinstance(item, dict) else None
        if not isinstance(path, str) or not path.strip():
            raise SourceError(f"{where}: course #{position} has no 'path'")
        course = item.get("course")
        yield f"{base.rstrip('/')}/{path.lstrip('/')}", course if isinstance(course, str) else None


def _raw_entries(items: Iterable[Any], location: str, course: str | None) -> list[_RawEntry]:
    return [_RawEntry(location, position, item, course) for position, item in enumerate(items)]


def _required_text(item: dict[str, Any], *names: str, may_be_empty: bool = False) -> str:
    for name in names:
        value = item.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"field '{name}' is {type(value).__name__}, not a string")
        if not value.strip() and not may_be_empty:
            raise ValueError(f"field '{name}' is empty")
        return value.strip()
    raise ValueError(f"missing field '{' or '.join(names)}'")


def _entry_fields(raw: _RawEntry, max_entry_chars: int) -> dict[str, Any]:
    item = raw.item
    if not isinstance(item, dict):
        raise ValueError(f"entry is {type(item).__name__}, not an object")
    course = item.get("course") or raw.course
    section = item.get("section")
    if not isinstance(section, str):
        raise ValueError("missing field 'section'" if section is None else "field 'section' is not a string")
    source_id = item.get("id")
    if source_id is not None and not isinstance(source_id, str | int):
        raise ValueError(f"field 'id' is {type(source_id).__name__}")
    size = sum(
        len(v)
        for v in (section, *(item.get(k) for k in ("question", "answer", "text")))
        if isinstance(v, str)
    )
    if size > max_entry_chars:
        # One huge entry would become thousands of chunks and crowd every ranking.
        raise ValueError(
            f"{size:,} characters, more than the limit of {max_entry_chars:,} (RAG_MAX_ENTRY_CHARS)"
        )
    return {
        "course": _required_text({"course": course}, "course"),
        "section": section.strip(),
        "question": _required_text(item, "question"),
        # An empty answer is kept: the course's content check judges how many it has, so a
        # course whose answers were all blanked stays as served instead of looking deleted.
        "answer": _required_text(item, "answer", "text", may_be_empty=True),
        "source_id": None if source_id is None else str(source_id).strip() or None,
    }


def build_documents(
    entries: list[_RawEntry],
    shape: str,
    locations: list[str],
    max_entry_chars: int = DEFAULT_MAX_ENTRY_CHARS,
) -> LoadedDocuments:
    columns: dict[str, list[Any]] = {}  # column lists, not a dict per row: a million entries
    dropped: list[DroppedEntry] = []
    for raw in entries:
        try:
            fields = _entry_fields(raw, max_entry_chars)
        except ValueError as exc:
            dropped.append(DroppedEntry(raw.location, raw.position, str(exc)))
            continue
        for name, value in fields.items():
            columns.setdefault(name, []).append(value)
    if not columns:
        raise SourceError(
            f"{redact(locations[0])}: no valid entries ({len(dropped)} dropped"
            + (f", first: {dropped[0]}" if dropped else "")
            + ")"
        )
    frame = pd.DataFrame(columns)
    renamed = assign_doc_ids(frame)
    return LoadedDocuments(
        frame=frame[DOCUMENT_COLUMNS].reset_index(drop=True),
        shape=shape,
        locations=[redact(loc) for loc in locations],
        dropped=dropped,
        renamed_ids=renamed,
    )


def stable_hash(*parts: str, length: int = 16) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:length]


def assign_doc_ids(frame: pd.DataFrame) -> list[str]:
    """Fill `doc_id`: the source id when given, else a hash of (course, question, occurrence).

    Keying on the question rather than the answer keeps an entry's id when its answer is edited,
    so a refresh updates it in place. Entries that share a question (or a source id) are told
    apart by their rank in content order, not by their position in the source, so a source that
    reorders its entries keeps every id: the first keeps the plain id, each other gets the first
    free `~n` suffix that no entry has as its own id. The renamed ids are returned.
    """
    content = [
        stable_hash(c, s, q, a)
        for c, s, q, a in zip(frame.course, frame.section, frame.question, frame.answer, strict=True)
    ]
    # Visiting in content order (position only among identical entries) makes the ranks
    # independent of the source's order.
    order = sorted(range(len(frame)), key=lambda row: (content[row], row))
    occurrences: Counter[tuple[str, str]] = Counter()
    taken = {source_id for source_id in frame.source_id if source_id}
    seen_ids: set[str] = set()
    doc_ids: list[str] = [""] * len(frame)
    renamed: list[str] = []
    courses, questions, source_ids = list(frame.course), list(frame.question), list(frame.source_id)
    for row in order:
        course, question, source_id = courses[row], questions[row], source_ids[row]
        occurrences[(course, question)] += 1
        if not source_id:
            doc_id = stable_hash(course, question, str(occurrences[(course, question)]))
        elif source_id not in seen_ids:
            doc_id = source_id
        else:
            suffix = 2
            while (doc_id := f"{source_id}~{suffix}") in taken:
                suffix += 1
            taken.add(doc_id)
            renamed.append(doc_id)
        seen_ids.add(doc_id)
        doc_ids[row] = doc_id
    frame["doc_id"] = doc_ids
    frame["content_hash"] = content
    return sorted(renamed)
