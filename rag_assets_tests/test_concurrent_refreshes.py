"""Two refreshes of one data directory, started as users start them, in real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from rag_assets.common.lock import LOCK_FILENAME
from rag_assets.index.embedded import EmbeddedIndex

from .conftest import DATA, QuietHandler, entry, serving, write_json

BIN = Path(sys.executable).parent
ENTRY_POINTS = {
    "make run": [sys.executable, "-m", "rag_assets.defs.refresh"],
    "dagster asset materialize": [
        str(BIN / "dagster"), "asset", "materialize", "--select", "*", "-m", "rag_assets.definitions"
    ],
    "dagster job execute": [
        str(BIN / "dagster"), "job", "execute", "-j", "faq_index_refresh", "-m", "rag_assets.definitions"
    ],
}  # fmt: skip


class HeldSource(QuietHandler):
    """Serves ../shared/data, holding `/held/...` answers until the test lets them go."""

    fetching: ClassVar[threading.Event] = threading.Event()  # a held request has arrived
    release: ClassVar[threading.Event] = threading.Event()

    def do_GET(self) -> None:
        path = self.path
        if path.startswith("/held/"):
            HeldSource.fetching.set()
            HeldSource.release.wait(timeout=120)
            path = path.removeprefix("/held")
        self.send_body((DATA / path.lstrip("/")).read_bytes())


@pytest.fixture(scope="module")
def source_url() -> Iterator[str]:
    with serving(HeldSource) as base:
        yield base
        HeldSource.release.set()


def start(entry_point: str, data_dir: Path, source: str, dagster_home: Path | None) -> subprocess.Popen[str]:
    env = {**os.environ, "RAG_DATA_DIR": str(data_dir), "DOCUMENTS_URL": source, "RAG_NLP_PROCESSES": "1"}
    env.pop("DAGSTER_HOME", None)
    if dagster_home is not None:
        dagster_home.mkdir(exist_ok=True)
        env["DAGSTER_HOME"] = str(dagster_home)
    return subprocess.Popen(
        ENTRY_POINTS[entry_point], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_until_fetching(process: subprocess.Popen[str], timeout_s: float = 120) -> None:
    """Until the first refresh is inside its run, reading the (held) source."""
    deadline = time.monotonic() + timeout_s
    while not HeldSource.fetching.wait(timeout=0.2):
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "the first refresh never fetched its source"


def lock_holder(data_dir: Path) -> str | None:
    """The run id the first refresh wrote into the lock file, if it took the lock."""
    try:
        return json.loads((data_dir / LOCK_FILENAME).read_text())["holder"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


@pytest.mark.slow
@pytest.mark.parametrize(
    ("first", "second"),
    [("make run", "make run"), ("dagster asset materialize", "dagster job execute")],
)
def test_a_second_refresh_fails_at_once_naming_the_run_that_holds_the_directory(
    tmp_path: Path, source_url: str, first: str, second: str
) -> None:
    data_dir = tmp_path / "data"
    small = write_json(tmp_path / "small.json", [entry("c", f"Question {n}?", "Answer.") for n in range(40)])
    HeldSource.fetching.clear()
    HeldSource.release.clear()
    holder = start(first, data_dir, f"{source_url}/held/documents-2025.json", tmp_path / "home")
    try:
        wait_until_fetching(holder)
        # The other entry point, without the first one's DAGSTER_HOME: only the lock can stop it.
        started = time.monotonic()
        late = start(second, data_dir, str(small), None)
        late_output, _ = late.communicate(timeout=300)
        assert late.returncode != 0, late_output
        run_id = lock_holder(data_dir)
        assert run_id is not None
        busy = f"{data_dir.resolve()} is being refreshed by run {run_id}"
        assert busy in late_output
        assert time.monotonic() - started < 120
        if second == "make run":  # its summary says why, in its last lines
            last = late_output.strip().splitlines()[-3:]
            assert last[0].startswith("refresh: run ") and last[0].endswith(" did not do everything:")
            assert last[1].startswith(f"refresh:   the run failed: {busy}")
            assert last[2].startswith("refresh: served: nothing")
    finally:
        HeldSource.release.set()
    output, _ = holder.communicate(timeout=600)
    assert holder.returncode == 0, output
    if first == "make run":  # the whole refresh: the first one's source, untouched by the second
        stats = EmbeddedIndex(data_dir).stats()
        assert stats.entries == 948
        assert len(stats.courses) == 3
        assert "refresh: published 948 entries (963 chunks) of 3 courses" in output
