"""Dagster's own storage failing under `make run` (issue 26): a full disk, an unwritable
DAGSTER_HOME, a locked SQLite file. Each ends in one line naming the directory, the variable and
the cause; no run stays unfinished for the schedule to wait on; the served index stays served."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.test_utils import create_run_for_test

from rag_assets.defs.automation import JOB_NAME, daily_document_refresh
from rag_assets.defs.refresh import stopped_run
from rag_assets.index.embedded import EmbeddedIndex

from .conftest import DATA
from .test_definitions import materialize
from .test_entry_points import ENTRY_POINTS, ROOT
from .test_index_faults import read_only

UNFINISHED = {dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED}
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
NOBODY += ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]  # reads the venv in /root
# Holds a write lock on a SQLite file until its stdin closes, as a sqlite3 shell in a transaction does.
LOCKER = (
    "import sqlite3, sys; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
    "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read()"
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs and a read-only view (root)"),
]


def make_run(data: Path, home: Path, prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """`make run` on the real FAQ with this data directory and Dagster home."""
    env = os.environ | {
        "RAG_DATA_DIR": str(data),
        "DAGSTER_HOME": str(home),
        "DOCUMENTS_URL": str(DATA / "documents-2025.json"),
        "RAG_NLP_PROCESSES": "1",
    }
    return subprocess.run(
        [*prefix, *ENTRY_POINTS["make run"]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def runs(home: Path) -> dict[str, dg.DagsterRunStatus]:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return {run.run_id: run.status for run in instance.get_runs()}


def served(data: Path) -> tuple[int, str | None]:
    stats = EmbeddedIndex(data).stats()
    return stats.entries, stats.published_at


def stopped(done: subprocess.CompletedProcess[str], home: Path, code: int) -> str:
    """The one line a refresh the storage stopped ends with (on stderr): it names DAGSTER_HOME."""
    output = done.stdout + done.stderr
    assert done.returncode == code and "Traceback" not in output, output[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"refresh: error: Dagster's storage in DAGSTER_HOME={home} cannot be written: "), (
        line
    )
    return line


def recovers(
    data: Path, home: Path, before: dict[str, dg.DagsterRunStatus]
) -> subprocess.CompletedProcess[str]:
    """The next `make run`, the storage fixed: it runs and serves, and no run is left unfinished."""
    done = make_run(data, home)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("refresh: now served: 948 entries at ")
    after = runs(home)
    assert not UNFINISHED & set(after.values()), after
    assert list(after.values()).count(dg.DagsterRunStatus.SUCCESS) == len(before) + 1
    return done


@pytest.fixture(scope="module")
def refreshed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory serving the real FAQ (its NLP cache warm, so that each `make run` is quick)
    and the Dagster home of the refresh that built it; each test starts from a copy."""
    base = tmp_path_factory.mktemp("refreshed")
    (base / "dagster").mkdir()
    shutil.copy(ROOT / "dagster-instance.yaml", base / "dagster" / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(base / "dagster")) as instance:
        assert materialize(str(DATA / "documents-2025.json"), base / "data", instance).success
    return base


@pytest.fixture
def data(refreshed: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(refreshed / "data", tmp_path / "data"))


@contextmanager
def small_disk(path: Path) -> Iterator[Path]:
    """A tmpfs of its own at `path`, whose free space the test sets (`fill`)."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def fill(disk: Path, leave_kb: int) -> Path:
    """A file taking all of `disk`'s free space but `leave_kb`."""
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, shutil.disk_usage(disk).free - leave_kb * 1024)
    return filler


def test_a_full_disk_under_a_new_dagster_home_runs_nothing(data: Path, tmp_path: Path) -> None:
    """The instance's first tables do not fit: Dagster never opens, nothing is run."""
    served_before = served(data)
    with small_disk(tmp_path / "disk") as disk:
        home = disk / "dagster"
        home.mkdir()
        shutil.copy(ROOT / "dagster-instance.yaml", home / "dagster.yaml")
        filler = fill(disk, leave_kb=16)
        line = stopped(make_run(data, home), home, code=2)
        assert line.startswith(
            f"refresh: error: Dagster's storage in DAGSTER_HOME={home} cannot be written: its disk is full"
        )
        assert line.endswith(
            "free space on that disk, or set DAGSTER_HOME to another directory; "
            "nothing was run, the served index is unchanged"
        )
        assert served(data) == served_before
        filler.unlink()
        recovers(data, home, before={})


@pytest.mark.parametrize("leave_kb", [128, 384], ids=["while it creates the run", "while the run runs"])
def test_a_disk_filling_under_a_run_leaves_no_run_for_the_schedule_to_wait_on(
    refreshed: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, leave_kb: int
) -> None:
    """The run is recorded, then the storage cannot record even its failure: the line says so,
    and the next `make run` marks it failed before its own, so the daily schedule runs again."""
    served_before = served(data)
    monkeypatch.setenv("RAG_DATA_DIR", str(data))  # the schedule's view of the data directory
    with small_disk(tmp_path / "disk") as disk:
        home = Path(shutil.copytree(refreshed / "dagster", disk / "dagster"))
        before = runs(home)
        filler = fill(disk, leave_kb)
        line = stopped(make_run(data, home), home, code=1)
        assert "cannot be written: its disk is full" in line
        assert "the next `make run` marks it failed" in line and "the served index is unchanged" in line
        assert served(data) == served_before
        filler.unlink()
        (left,) = set(runs(home)) - set(before)
        assert runs(home)[left] in UNFINISHED
        with dg.DagsterInstance.from_config(str(home)) as instance:  # as the daemon would see it
            skip = daily_document_refresh(dg.build_schedule_context(instance=instance))
            assert isinstance(skip, dg.SkipReason) and left in skip.skip_message
        done = recovers(data, home, before)
        assert f"refresh: marked run {left} failed:" in done.stdout
        assert runs(home)[left] == dg.DagsterRunStatus.FAILURE
        with dg.DagsterInstance.from_config(str(home)) as instance:
            assert isinstance(
                daily_document_refresh(dg.build_schedule_context(instance=instance)), dg.RunRequest
            )


@pytest.mark.parametrize("how", ["read-only file system", "another user"])
def test_an_unwritable_dagster_home_runs_nothing(
    refreshed: Path, data: Path, tmp_path: Path, how: str
) -> None:
    """Dagster cannot open its SQLite files for writing: nothing is run, and the line says which
    path this user may not write, or that the file system is read-only."""
    served_before = served(data)
    home = Path(shutil.copytree(refreshed / "dagster", tmp_path / "dagster"))
    before = runs(home)
    if how == "another user":
        if not shutil.which("setpriv"):
            pytest.skip("needs setpriv (util-linux) to run as nobody")
        shutil.chown(data, "nobody")  # the refresh could write its own data
        for path in data.rglob("*"):
            shutil.chown(path, "nobody")
        line = stopped(make_run(data, home, prefix=NOBODY), home, code=2)
        assert f"cannot be written: {home} is not writable by user nobody (" in line
        assert line.endswith(
            "make it writable, or set DAGSTER_HOME to another directory; nothing was run, "
            "the served index is unchanged"
        )
    else:
        with read_only(home) as view:
            line = stopped(make_run(data, view), view, code=2)
        assert "cannot be written: its file system is read-only (" in line
    assert served(data) == served_before and runs(home) == before
    recovers(data, home, before)


def test_a_locked_dagster_database_runs_nothing(refreshed: Path, data: Path, tmp_path: Path) -> None:
    """Another process holds the run database's write lock past SQLite's wait: nothing is run."""
    served_before = served(data)
    home = Path(shutil.copytree(refreshed / "dagster", tmp_path / "dagster"))
    before = runs(home)
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(home / "history" / "runs.db")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        line = stopped(make_run(data, home), home, code=2)
    finally:
        holder.communicate("")
    assert "cannot be written: another process holds a lock on its SQLite files (database is locked)" in line
    assert line.endswith("nothing was run, the served index is unchanged")
    assert served(data) == served_before and runs(home) == before
    recovers(data, home, before)


@pytest.mark.parametrize("status", [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.SUCCESS])
def test_the_run_a_storage_fault_stopped_is_marked_failed_when_the_storage_allows(
    tmp_path: Path, status: dg.DagsterRunStatus
) -> None:
    """The storage takes writes again by the time the refresh stops (its lock released, space
    freed): the run it stopped is marked failed at once; a run that had ended keeps its end."""
    shutil.copy(ROOT / "dagster-instance.yaml", tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        started = datetime.now(UTC)
        run = create_run_for_test(instance, job_name=JOB_NAME, status=status)  # as `make run` records it
        told = stopped_run(instance, started, "the storage failed")
        after = instance.get_run_by_id(run.run_id)
    if status == dg.DagsterRunStatus.SUCCESS:
        assert (told, after.status) == (f"run {run.run_id} ended SUCCESS", status)
    else:
        assert (told, after.status) == (
            f"run {run.run_id} stopped, marked failed",
            dg.DagsterRunStatus.FAILURE,
        )
