"""Faults around the embedded index: damaged files, a full disk, a read-only directory, and
searches running while a publish commits. Each case is one a user hit (issue 10)."""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from spacy.language import Language

from rag_assets.index.backend import IndexContent, PublishError
from rag_assets.index.embedded import INDEX_FILENAME, EmbeddedIndex
from rag_assets.nlp.cache import CACHE_FILENAME, NlpCache, cached_lemmas
from rag_assets.retrieval import Retriever

from .conftest import content_rows, entry, index_content, write_json
from .test_cli import rag
from .test_definitions import materialize


@pytest.fixture(scope="module")
def small(nlp: Language, documents_2025: pd.DataFrame) -> IndexContent:
    return index_content(nlp, documents_2025.head(120))


def damage(path: Path, how: str) -> None:
    size = path.stat().st_size
    noise = random.Random(how).randbytes  # the same damage on every run
    if how == "random bytes":
        path.write_bytes(noise(size))
    elif how == "truncated":
        with open(path, "r+b") as handle:
            handle.truncate(size // 3)
    else:  # pages in the middle overwritten, the header intact
        with open(path, "r+b") as handle:
            handle.seek(size // 2)
            handle.write(noise(min(16384, size // 4)))


@pytest.mark.parametrize("how", ["random bytes", "truncated", "damaged pages"])
def test_a_damaged_index_is_reported_in_one_line_and_rebuilt_by_the_next_publish(
    tmp_path: Path, small: IndexContent, how: str
) -> None:
    EmbeddedIndex(tmp_path).publish(small)
    damage(tmp_path / INDEX_FILENAME, how)

    result = rag("search", "docker", data_dir=tmp_path)
    if result.returncode:  # damaged pages may lie outside what one query reads
        assert "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert "is damaged" in result.stderr and "make run" in result.stderr

    progress: list[str] = []
    report = EmbeddedIndex(tmp_path, log=progress.append).publish(small)
    assert report.upserted == len(small)
    assert len(report.warnings) == 1 and "set aside as index.sqlite.corrupt-" in report.warnings[0]
    assert progress[-1].startswith(f"index rows: {len(small)}/{len(small)} ")  # progress, not warnings
    assert EmbeddedIndex(tmp_path).stats().chunks == len(small)
    assert len(list(tmp_path.glob(f"{INDEX_FILENAME}.corrupt-*"))) == 1
    assert EmbeddedIndex(tmp_path).publish(small).warnings == ()  # healed: nothing set aside again


def test_the_next_refresh_heals_a_damaged_index(tmp_path: Path) -> None:
    """Through the real job: the guard cannot read the damaged index, so it has nothing to compare
    with, and the publish sets the file aside and builds a complete index."""
    source = str(
        write_json(tmp_path / "faq.json", [entry("c", f"Question {n}?", f"Answer {n}.") for n in range(40)])
    )
    first = materialize(source, tmp_path / "data", dg.DagsterInstance.ephemeral())
    assert first.success
    damage(tmp_path / "data" / INDEX_FILENAME, "random bytes")
    second = materialize(source, tmp_path / "data", dg.DagsterInstance.ephemeral())
    assert second.success
    guard = second.checks()["faq_source_count_guard"]
    assert guard.passed and guard.metadata["served_entries"].value == "unreadable (damaged)"
    assert "set aside as index.sqlite.corrupt-" in second.metadata("es_index")["warnings"]
    assert EmbeddedIndex(tmp_path / "data").stats().entries == 40


def test_a_cache_with_damaged_pages_is_set_aside_once(
    nlp: Language, small: IndexContent, tmp_path: Path
) -> None:
    chunks = content_rows(small)[0].drop(columns=["row_hash"])
    cache = NlpCache(tmp_path, "fp")
    cached_lemmas(lambda: nlp, chunks, cache)
    cache.close()
    damage(tmp_path / CACHE_FILENAME, "damaged pages")

    logged: list[str] = []
    first = NlpCache(tmp_path, "fp", log=logged.append)
    cached_lemmas(lambda: nlp, chunks, first)
    first.close()
    assert any("is damaged" in line for line in logged), logged
    assert len(list(tmp_path.glob(f"{CACHE_FILENAME}.corrupt-*"))) == 1

    logged.clear()
    second = NlpCache(tmp_path, "fp", log=logged.append)
    _, reuse = cached_lemmas(lambda: nlp, chunks, second)
    assert logged == []
    assert reuse.computed == 0  # the rebuilt cache serves the next run


def test_a_full_disk_is_named_and_the_served_index_survives(
    tmp_path: Path, nlp: Language, documents_2025: pd.DataFrame, small: IndexContent
) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    try:
        EmbeddedIndex(mount).publish(small)
        large = index_content(nlp, documents_2025)
        with pytest.raises(PublishError) as raised:
            EmbeddedIndex(mount).publish(large)
        message = str(raised.value)
        assert f"the disk holding {mount / INDEX_FILENAME} is full" in message, message
        assert "the served index is unchanged" in message
        assert EmbeddedIndex(mount).stats().chunks == len(small)
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


@contextmanager
def read_only(directory: Path) -> Iterator[Path]:
    """`directory` seen through a read-only bind mount (root ignores permission bits)."""
    if os.geteuid() != 0:
        os.chmod(directory, 0o555)
        try:
            yield directory
        finally:
            os.chmod(directory, 0o755)
        return
    view = directory.with_name(directory.name + "-read-only")
    view.mkdir()
    subprocess.run(["mount", "--bind", str(directory), str(view)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
        yield view
    finally:
        subprocess.run(["umount", "--lazy", str(view)], check=True)


def test_search_in_a_read_only_directory(tmp_path: Path, small: IndexContent) -> None:
    directory = tmp_path / "published"
    EmbeddedIndex(directory).publish(small)
    with read_only(directory) as view:
        assert not os.access(view, os.W_OK) or os.geteuid() == 0
        result = rag("search", "docker", "--k", "1", data_dir=view)
        stats = rag("stats", data_dir=view)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("1. [")
    assert stats.returncode == 0 and f"chunks:       {len(small)}" in stats.stdout, stats.stderr


def test_searches_during_publishes_see_one_version(
    tmp_path: Path, nlp: Language, documents_2025: pd.DataFrame
) -> None:
    """Eight searchers while publishes swap every chunk: no search may lose a ranked chunk."""
    base = documents_2025.head(150)
    variants = [index_content(nlp, base.assign(doc_id=base["doc_id"] + suffix)) for suffix in ("a", "b")]
    directory = tmp_path
    EmbeddedIndex(directory).publish(variants[0])
    questions = list(base["question"].head(40))
    errors: list[str] = []
    searches = 0
    stop = threading.Event()

    def search() -> None:
        nonlocal searches
        retriever = Retriever(EmbeddedIndex(directory), nlp)
        while not stop.is_set():
            for question in questions:
                try:
                    retriever.search(question, k=5)
                    searches += 1
                except Exception as exc:
                    errors.append(repr(exc))

    searchers = [threading.Thread(target=search) for _ in range(8)]
    for thread in searchers:
        thread.start()
    publishes = 0
    deadline = time.monotonic() + 60  # a bound for a slow machine; 20 publishes take a few seconds
    while publishes < 20 and time.monotonic() < deadline:
        EmbeddedIndex(directory).publish(variants[publishes % 2 == 0])
        publishes += 1
    stop.set()
    for thread in searchers:
        thread.join()
    assert publishes == 20 and searches >= 200, (publishes, searches)
    assert errors == [], f"{len(errors)} of {searches} searches failed, first: {errors[0]}"
